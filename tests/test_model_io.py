"""Models out: our model exported as a transformers LlamaForCausalLM gives our logits, and the
run's tokenizer exported gives our ids. transformers runs for real, offline, on tiny configs."""

import dataclasses
import json

import pytest
import torch
import yaml

from cocodc import checkpoint
from cocodc.config import ConfigError, RopeScalingConfig, load_config
from cocodc.data import BPETokenizer, ByteTokenizer, load_domains
from cocodc.model import Transformer
from cocodc.model_io import (
    byte_unicode,
    check_init_from,
    hf_tokenizer,
    merged_lora,
    run_config,
    save_adapter,
    save_hf,
)
from cocodc.sync.fragments import split_model

from conftest import FAST, TINY, cocodc, one_line_error, overrides


def exported(tmp_path, **model):
    config = load_config(TINY, ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "train.seq_len=32"])
    config.model = dataclasses.replace(config.model, **model)
    ours = Transformer(config.model, 256, 32, seed=3)
    save_hf(dict(ours.named_parameters()), config, hf_tokenizer(config, tmp_path), tmp_path / "hf")
    return ours


@pytest.mark.parametrize(
    "model",
    [
        {},
        {"n_kv_heads": 2, "tie_embeddings": True},  # grouped-query attention, one embedding matrix
        {"n_kv_heads": 1, "rope_scaling": RopeScalingConfig(factor=8.0, original_max_len=16)},  # Llama 3 rope
    ],
    ids=["mha-untied", "gqa-tied", "mqa-llama3-rope"],
)
def test_transformers_loads_the_export_and_gives_our_logits(tmp_path, model):
    from transformers import AutoModelForCausalLM

    ours = exported(tmp_path, **model)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours(tokens), theirs(tokens).logits
    assert (got - expected).abs().max() < 1e-5
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())


def test_the_exported_tokenizers_give_our_ids(tmp_path):
    from transformers import AutoTokenizer

    texts = [text for _, text in load_domains(load_config(TINY).data)]
    paragraph = texts[0][:3000] + " ünïcödé — ✓"
    ours = BPETokenizer.train(texts[:3], 400)
    ours.save(tmp_path / "tokenizer.json")
    bpe = load_config(TINY, ["data.tokenizer=bpe", "data.vocab_size=400"])
    for config, tokenizer in ((load_config(TINY), ByteTokenizer()), (bpe, ours)):
        hf_tokenizer(config, tmp_path).save_pretrained(tmp_path / config.data.tokenizer)
        theirs = AutoTokenizer.from_pretrained(tmp_path / config.data.tokenizer)
        ids = theirs(paragraph, add_special_tokens=False).input_ids
        assert ids == tokenizer.encode([paragraph])[0].tolist()
        assert theirs.decode(ids) == paragraph


def test_the_byte_alphabet_is_one_printable_character_per_byte():
    alphabet = byte_unicode()
    assert len(set(alphabet)) == 256 and all(c.isprintable() and not c.isspace() for c in alphabet)
    assert alphabet[ord("A")] == "A" and alphabet[0] == "Ā" and alphabet[ord(" ")] == "Ġ"


@pytest.mark.slow
def test_a_trained_run_exports_generates_and_is_started_from(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A tokenizer from a file of its own (its end of text "</s>", found by name), grouped-query
    # attention and tied embeddings, trained by DiLoCo over 2 regions.
    vocab = tmp_path / "vocab"
    texts = [text for _, text in load_domains(load_config(TINY).data)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = trainers.BpeTrainer(
        vocab_size=301, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts[:2], trainer=special)
    vocab.mkdir()
    tokenizer.save(str(vocab / "tokenizer.json"))
    settings = [f"data.tokenizer=hf:{vocab}", "model.n_kv_heads=1", "model.tie_embeddings=true", "sync.sync_every=4",
                "train.steps=8", "eval.every=0", "checkpoint.every=0"]  # fmt: skip
    run, hf = tmp_path / "tiny", tmp_path / "hf"
    result = cocodc("train", "-c", TINY, *overrides(*FAST, *settings, f"run.dir={tmp_path}"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((run / "summary.json").read_text())
    assert trained["final_eval_loss"] < trained["initial_eval_loss"]
    result = cocodc("export", str(run), "--hf", str(hf), cwd=tmp_path)
    assert result.returncode == 0 and "exported step 8" in result.stdout, result.stderr[-3000:]
    # What is exported is the global copy the regions agree on.
    state = checkpoint.read_region(run / "checkpoints", 8, 0)["outer"]["global_params"]
    config = load_config(TINY, [*FAST, *settings])
    ours = Transformer(config.model, 301, config.train.seq_len)  # "</s>" (id 0) and 300 more
    assert ours.load_state_dict(state, strict=False).missing_keys == ["head.weight"]  # tied: the embedding
    theirs = AutoModelForCausalLM.from_pretrained(hf).eval()
    tokens = torch.randint(0, 301, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (theirs(tokens).logits - ours(tokens)).abs().max() < 1e-5
    exported_tokenizer = AutoTokenizer.from_pretrained(hf)
    assert exported_tokenizer.eos_token == "</s>" and theirs.generation_config.eos_token_id == 0
    paragraph = texts[5][:2000]
    assert (
        exported_tokenizer(paragraph).input_ids
        == BPETokenizer.load(vocab / "tokenizer.json").encode([paragraph])[0].tolist()
    )
    result = cocodc("generate", str(run), "--prompt", "And God said", "--max-new-tokens", "12", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("And God said") and len(result.stdout.rstrip("\n")) > len("And God said")
    # A new run from the export starts where the first ended: the same model, the same eval batches.
    again = [f"run.dir={tmp_path}", "run.name=again", f"model.init_from={hf}", "train.steps=1"]
    result = cocodc("train", "-c", TINY, *overrides(*FAST, *settings, *again), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["initial_eval_loss"] == pytest.approx(trained["final_eval_loss"], abs=1e-6)


def test_tied_embeddings_travel_in_one_fragment():
    config = load_config(TINY, ["model.tie_embeddings=true"])
    model = Transformer(config.model, 256, 32, seed=0)
    fragments = split_model(model, 2)
    assert fragments[0].names[0] == "embed.weight" and not any("head" in n for f in fragments for n in f.names)
    assert sum(f.numel for f in fragments) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "{tmp}", "--hf", "{tmp}/out"], "is not a cocodc run directory (no config.yaml)"),
        (["generate", "{tmp}", "--prompt", "x"], "is neither a cocodc run directory nor an exported model"),
    ],
)
def test_export_and_generate_refuse_what_is_not_a_model_in_one_line(tmp_path, args, message):
    result = cocodc(*[a.format(tmp=tmp_path) for a in args], cwd=tmp_path)
    assert message in one_line_error(result)


def test_merged_lora_adapters_give_the_adapted_models_logits():
    from cocodc.federated.lora import add_lora

    config = load_config(TINY, ["model.n_layers=2", "model.d_model=64", "model.n_heads=4"])
    adapted = add_lora(Transformer(config.model, 256, 32, seed=0), rank=2, alpha=3.0)
    with torch.no_grad():  # B starts at 0, which would hide a wrong scale or a transposed product
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    plain = Transformer(config.model, 256, 32)
    plain.load_state_dict(merged_lora(adapted.state_dict(), rank=2, alpha=3.0))
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (plain(tokens) - adapted(tokens)).abs().max() < 1e-5


def test_a_model_to_start_from_of_another_shape_is_named_before_any_rank_starts(tmp_path):
    exported(tmp_path, n_kv_heads=2)  # writes tmp_path / "hf": 2 layers, d_model 64, 4 heads, 2 of k/v
    shape = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "train.seq_len=32"]
    check_init_from(load_config(TINY, [*shape, "model.n_kv_heads=2", f"model.init_from={tmp_path / 'hf'}"]))
    with pytest.raises(ConfigError, match="its config.json has n_kv_heads=2 where this config has 4"):
        check_init_from(load_config(TINY, [*shape, f"model.init_from={tmp_path / 'hf'}"]))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(load_config(TINY, shape).to_dict()))
    with pytest.raises(ConfigError, match="the run has n_layers=2 where this config has 4"):
        check_init_from(load_config(TINY, [f"model.init_from={run}"]))
    result = cocodc(
        "train", "-c", TINY, "--set", f"model.init_from={run}", "--set", f"run.dir={tmp_path}", cwd=tmp_path
    )
    assert "the run has n_layers=2 where this config has 4" in one_line_error(result)


def test_lora_adapters_export_as_a_peft_adapter_of_the_exported_base(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cocodc.federated.lora import add_lora

    config = load_config(TINY, ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2"])
    config.federated = dataclasses.replace(config.federated, lora_rank=2, lora_alpha=3.0)
    adapted = add_lora(Transformer(config.model, 256, 32, seed=0), rank=2, alpha=3.0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    state = adapted.state_dict()
    save_hf(merged_lora(state, 2, 0.0), config, hf_tokenizer(config, tmp_path), tmp_path / "hf")
    save_adapter(state, config, tmp_path / "hf")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    theirs = PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").eval()
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (theirs(tokens).logits - adapted(tokens)).abs().max() < 1e-5


def test_a_run_is_read_where_it_lies_and_as_an_older_cocodc_wrote_it(tmp_path):
    saved = load_config(TINY).to_dict()
    saved["run"] = {"dir": "somewhere/else", "name": "old"}
    saved["federated"]["init_from"] = ""  # a key of the cocodc that wrote it, since moved
    saved["data"]["tokenizer"] = "hf:/gone/since"  # a file it named, moved since
    run = tmp_path / "moved"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    config = run_config(run)
    assert config.run_dir == run and config.model.init_from == ""


def test_a_model_to_start_from_with_another_rotary_base_is_named(tmp_path):
    exported(tmp_path)
    shape = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "train.seq_len=32"]
    with pytest.raises(ConfigError, match="its config.json has rope_theta=10000.0 where this config has 500000.0"):
        check_init_from(load_config(TINY, [*shape, "model.rope_theta=500000", f"model.init_from={tmp_path / 'hf'}"]))
