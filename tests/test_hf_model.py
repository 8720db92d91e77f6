"""A transformers model trained as cocodc's own: its decoder layers found as blocks, tied weights in
one fragment, the outer sync in a user's loop, and a run with model.hf_config exported back. Real
transformers models, built offline from tiny configs."""

import json

import pytest
import torch

from cocodc import checkpoint
from cocodc.comm import CommEngine
from cocodc.config import ConfigError, SyncConfig, load_config
from cocodc.hf_model import build_hf_model
from cocodc.sync import OuterSync
from cocodc.sync.fragments import find_blocks, split_model, split_modules

from conftest import FAST, REPO, TINY, cocodc, overrides


def llama(tmp_path, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie)  # fmt: skip
    config.save_pretrained(tmp_path)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_transformers_llama_splits_into_fragments_of_its_decoder_layers(tmp_path, tie):
    model = llama(tmp_path, tie)
    assert find_blocks(model) is model.model.layers
    fragments = split_model(model, 2)
    names = [n for f in fragments for n in f.names]
    assert names[0] == "model.embed_tokens.weight" and fragments[0].names[0] == names[0]
    assert {n.split(".")[2] for n in fragments[0].names if ".layers." in n} == {"0", "2"}  # strided
    assert ("lm_head.weight" in fragments[1].names) != tie  # tied: the embedding, in fragment 0 only
    assert sum(f.numel for f in fragments) == sum(p.numel() for p in model.parameters())
    # A hand-made list of modules: a tied weight travels with the first module that has it.
    listed = split_modules([model.model.embed_tokens, *model.model.layers, model.model.norm, model.lm_head])
    assert sum(f.numel for f in listed) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="has no module 'model.blocks'"):
        find_blocks(model, "model.blocks")


@pytest.mark.parametrize("method", ["streaming", "cocodc"])
def test_the_outer_sync_runs_a_transformers_llama_in_a_user_loop(tmp_path, method):
    model = llama(tmp_path)
    outer = OuterSync(model, SyncConfig(method=method, fragments=2, sync_every=4, delay=1), CommEngine(None))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    outer.attach(optimizer)
    tokens = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(16):
        loss = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss  # transformers shifts: a toy target
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert outer.outer_steps == 16 // (4 // 2) and losses[-1] < losses[0]  # a fragment every H / P steps


@pytest.mark.slow
def test_a_run_of_a_transformers_config_trains_and_exports_as_it_was(tmp_path):
    from transformers import AutoModelForCausalLM

    llama(tmp_path / "llama")
    # Each region of 2 ranks sharded with FSDP2, the layers found as blocks.
    settings = [f"model.hf_config={tmp_path / 'llama'}", "sync.method=cocodc", "sync.fragments=2", "sync.delay=1",
                "sync.sync_every=4", "train.steps=8", "eval.every=0", "checkpoint.every=0",
                "topology.ranks_per_region=2", "topology.parallel=fsdp"]  # fmt: skip
    settings.append(f"run.dir={tmp_path}")
    result = cocodc("train", "-c", TINY, *overrides(*FAST, *settings), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] and summary["tflops"] > 0
    result = cocodc("export", str(run), "--hf", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    state = checkpoint.read_region(run / "checkpoints", 8, 0)["outer"]["global_params"]
    ours = build_hf_model(str(tmp_path / "llama"), 256, "", "none")
    ours.load_state_dict(state)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(theirs(tokens).logits, ours.eval()(tokens))


@pytest.mark.parametrize(
    "settings, message",
    [
        (["model.hf_config=/no/such/dir"], "model.hf_config: no config.json at /no/such/dir"),
        (["sync.method=streaming", "sync.fragments=8", "sync.sync_every=8"], "cannot exceed the 4 layers"),
        (["train.activation_checkpointing=selective"], "selective is for cocodc's own model"),
    ],
)
def test_bad_hf_settings_name_the_key(tmp_path, settings, message):
    llama(tmp_path)
    with pytest.raises(ConfigError, match=None) as err:
        load_config(TINY, [f"model.hf_config={tmp_path}", *settings])
    assert message in str(err.value)


@pytest.mark.slow
def test_a_transformers_model_fine_tuned_with_lora_in_the_federated_mode_exports_both_ways(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cocodc.federated.lora import add_lora

    llama(tmp_path / "llama").save_pretrained(tmp_path / "pretrained")  # weights to start from
    settings = [f"model.hf_config={tmp_path / 'llama'}", f"model.init_from={tmp_path / 'pretrained'}",
                "federated.lora_rank=2", "federated.clients=4", "federated.clients_per_round=2", "federated.rounds=3",
                "federated.local_steps=2", "eval.every=0", "checkpoint.every=0", f"run.dir={tmp_path}"]  # fmt: skip
    result = cocodc("train", "-c", str(REPO / "configs" / "federated.yaml"), *overrides(*FAST, *settings), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "federated"
    summary = json.loads((run / "summary.json").read_text())
    adapted = add_lora(build_hf_model(str(tmp_path / "llama"), 256, "", "none"), 2)
    assert summary["trained_parameters"] == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    adapted.load_state_dict(checkpoint.read_region(run / "checkpoints", 3, 0)["model"])
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    for flags in ([], ["--adapter"]):
        out = tmp_path / f"out{len(flags)}"
        result = cocodc("export", str(run), "--hf", str(out), *flags, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        theirs = AutoModelForCausalLM.from_pretrained(out)
        theirs = PeftModel.from_pretrained(theirs, out / "adapter") if flags else theirs
        with torch.no_grad():
            assert (theirs.eval()(tokens).logits - adapted.eval()(tokens)).abs().max() < 1e-5


def test_sync_blocks_names_a_transformers_models_layers(tmp_path):
    llama(tmp_path)
    wrapped = build_hf_model(str(tmp_path), 256, "model.layers", "none")
    assert wrapped.blocks is wrapped.hf.model.layers
    assert [len(f.names) for f in split_model(wrapped, 2, "strided", "model.layers")] == [19, 20]
    with pytest.raises(ConfigError, match="has no module 'model.blocks'"):
        build_hf_model(str(tmp_path), 256, "model.blocks", "none")
