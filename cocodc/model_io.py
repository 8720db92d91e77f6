"""Models out and in: a run's model as a Hugging Face checkpoint, pretrained models to start from, and
text from a model.

`cocodc export RUN --hf OUT` writes a directory that `transformers` loads with
`AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)`: a
LlamaForCausalLM (safetensors weights, config.json, generation_config.json) and the run's
tokenizer as a tokenizer.json (the byte tokenizer too, written as a byte-level BPE without merges,
so every id is the byte's). What is exported is the model the regions agree on: the outer sync's
global copy, or with sync.method ddp the (equal) replicas.

`model.init_from` reads the same three ways back in: a run directory (its global model), an
exported or transformers Llama directory, or a state-dict file.

`cocodc generate RUN|HF_DIR --prompt TEXT` continues a prompt with the exported model, through
transformers' own `generate`: what it prints is what any tool loading the export would see.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from cocodc import checkpoint
from cocodc.config import Config, ConfigError, ModelConfig, saved_config
from cocodc.data import BPETokenizer
from cocodc.hf_model import HFCausalLM, hf_config_file
from cocodc.model import ffn_hidden_size, kv_heads
from cocodc.run_dir import checkpoint_root


class ModelIOError(ValueError):
    """A run or directory that cannot be exported or loaded; the message names it."""


def llama_config(model: ModelConfig, vocab_size: int, max_seq_len: int, eos_id: int) -> Any:
    """The transformers LlamaConfig of our model."""
    from transformers import LlamaConfig

    rs = model.rope_scaling
    scaling = None
    if rs.factor:
        scaling = {
            "rope_type": "llama3",
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_len,
        }
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=model.d_model,
        intermediate_size=ffn_hidden_size(model),
        num_hidden_layers=model.n_layers,
        num_attention_heads=model.n_heads,
        num_key_value_heads=kv_heads(model),
        # A scaled model reaches factor x the length it was first trained for (Llama 3.1: 8 x 8192).
        max_position_embeddings=max(max_seq_len, int(rs.factor * rs.original_max_len)),
        rms_norm_eps=model.norm_eps,
        rope_theta=model.rope_theta,
        rope_scaling=scaling,
        tie_word_embeddings=model.tie_embeddings,
        bos_token_id=None,
        eos_token_id=eos_id,
        attention_bias=False,
        mlp_bias=False,
    )


def _half_split(rows: torch.Tensor, heads: int, undo: bool = False) -> torch.Tensor:
    """A projection's rows per head reordered from our rotary pairs (2i, 2i + 1) to HF Llama's
    (i, i + head_dim / 2), or back with `undo`: attention scores are unchanged when q and k are
    reordered alike."""
    head_dim = rows.shape[0] // heads
    order = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    return rows.view(heads, head_dim, -1)[:, order.argsort() if undo else order].reshape(rows.shape)


def llama_state(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameters (by name) as LlamaForCausalLM's state dict."""
    heads, kv = model.n_heads, kv_heads(model)
    head_dim = model.d_model // heads
    out = {
        "model.embed_tokens.weight": state["embed.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["embed.weight" if model.tie_embeddings else "head.weight"],
    }
    for i in range(model.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[ours + "attn.qkv.weight"].split([heads * head_dim, kv * head_dim, kv * head_dim])
        out |= {
            theirs + "self_attn.q_proj.weight": _half_split(q, heads),
            theirs + "self_attn.k_proj.weight": _half_split(k, kv),
            theirs + "self_attn.v_proj.weight": v,
        }
        out |= {theirs + name: state[ours + our_name] for our_name, name in _LAYER_NAMES.items()}
    return {name: tensor.detach().float().contiguous() for name, tensor in out.items()}


def from_llama_state(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's state dict as our parameters (by name): `llama_state` undone."""
    heads, kv = model.n_heads, kv_heads(model)
    theirs = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not model.tie_embeddings:
        theirs["head.weight"] = "lm_head.weight"
    for i in range(model.n_layers):
        for ours, name in _LAYER_NAMES.items():
            theirs[f"blocks.{i}.{ours}"] = f"model.layers.{i}.{name}"
    missing = [name for name in theirs.values() if name not in state]
    if missing:
        raise ModelIOError(f"it is not a Llama of this config's shape: it lacks {missing[0]}")
    out = {ours: state[name] for ours, name in theirs.items()}
    for i in range(model.n_layers):
        layer = f"model.layers.{i}.self_attn."
        q, k = (
            _half_split(state[layer + p], h, undo=True) for p, h in (("q_proj.weight", heads), ("k_proj.weight", kv))
        )
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat((q, k, state[layer + "v_proj.weight"]))
    return out


_LAYER_NAMES = {  # ours: LlamaDecoderLayer's, for the weights that map one to one
    "attn.out.weight": "self_attn.o_proj.weight",
    "ffn.gate.weight": "mlp.gate_proj.weight",
    "ffn.up.weight": "mlp.up_proj.weight",
    "ffn.down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


# Our settings that fix the parameters' shapes, and what a transformers LlamaConfig calls them.
_SHAPE_KEYS = {
    "n_layers": "num_hidden_layers",
    "d_model": "hidden_size",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "ffn_hidden": "intermediate_size",
    "tie_embeddings": "tie_word_embeddings",
    "vocab_size": "vocab_size",
}


def check_init_from(config: Config) -> None:
    """Before any rank starts: that model.init_from (a run or a transformers directory) holds a model
    of this config's shape, from their configs alone; a ConfigError names the first difference. (A
    .pt file is checked as each rank loads it.)"""
    source = Path(config.model.init_from)
    ours = _shape(config)
    if (source / "config.yaml").is_file():
        theirs, what = _shape(run_config(source)), "the run"
    elif (source / "config.json").is_file():
        try:
            settings = json.loads((source / "config.json").read_text())
        except ValueError:
            raise ModelIOError(f"{source / 'config.json'} is not JSON") from None
        theirs, what = _hf_shape(settings), "its config.json"
    else:
        return
    for key, value in ours.items():
        if key in theirs and theirs[key] != value:
            raise ConfigError(
                f"model.init_from {source}: {what} has {key}={theirs[key]!r} where this config has {value!r}"
            )


def _shape(config: Config) -> dict[str, Any]:
    """What fixes the parameters and what they mean: the shapes, the rotary base, and with the byte
    tokenizer the vocabulary (a BPE's is known once trained)."""
    m = config.model
    if m.hf_config:
        return _hf_shape(json.loads(hf_config_file(m.hf_config).read_text()))
    shape = {"n_layers": m.n_layers, "d_model": m.d_model, "n_heads": m.n_heads, "n_kv_heads": kv_heads(m)}
    shape |= {"ffn_hidden": ffn_hidden_size(m), "tie_embeddings": m.tie_embeddings, "rope_theta": m.rope_theta}
    return shape | ({"vocab_size": 256} if config.data.tokenizer == "bytes" else {})


def _hf_shape(settings: dict[str, Any]) -> dict[str, Any]:
    shape = {ours: settings[theirs] for ours, theirs in _SHAPE_KEYS.items() if theirs in settings}
    if shape.get("n_kv_heads") is None and "n_heads" in shape:
        shape["n_kv_heads"] = shape["n_heads"]  # transformers' default: as many as query heads
    theta = settings.get("rope_theta", (settings.get("rope_parameters") or {}).get("rope_theta"))
    return shape | ({"rope_theta": float(theta)} if theta is not None else {})


def load_pretrained(model: nn.Module, source: str) -> None:
    """model.init_from: `source` (a run directory, an exported or transformers Llama directory, or a
    .pt file of the model's state dict) loaded into `model`; a ConfigError names what does not fit."""
    path = Path(source)
    try:
        if (path / "config.yaml").is_file():
            params = global_model(run_config(path), None)[1]
        elif (path / "config.json").is_file() and isinstance(model, HFCausalLM):
            params = {f"hf.{name}": tensor for name, tensor in _safetensors(path).items()}
        elif (path / "config.json").is_file():
            params = from_llama_state(_safetensors(path), model.config)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            params = state.get("model", state)
        _load(model, params, assign=False)
    except Exception as err:  # torch, safetensors and pickle raise many kinds for a file that does not fit
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        first = next((line for line in lines if line.startswith("size mismatch")), lines[0])
        raise ConfigError(f"model.init_from {source}: cannot load it into this config's model ({first})") from None


def _load(model: nn.Module, params: dict[str, torch.Tensor], assign: bool) -> None:
    """`params` into `model`, which may lack only the second names of tied parameters."""
    result = model.load_state_dict(params, strict=False, assign=assign)
    extra = result.unexpected_keys or sorted(set(result.missing_keys) - set(tied_names(model)))
    if extra:
        raise ModelIOError(f"its parameters do not match this model's ({extra[0]})")


def tied_names(model: nn.Module) -> list[str]:
    """The state-dict names under which a parameter appears a second time (a tied output head)."""
    first: dict[int, str] = {}
    return [name for name, p in model.state_dict(keep_vars=True).items() if first.setdefault(id(p), name) != name]


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    state: dict[str, torch.Tensor] = {}
    for name in files or ["model.safetensors"]:
        if not (directory / name).is_file():
            raise ModelIOError(f"{directory / name} is missing")
        state |= load_file(directory / name)
    return state


def byte_unicode() -> list[str]:
    """The printable character that byte-level BPE (GPT-2's convention) writes for each byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(moved)) for b in range(256)]


def hf_tokenizer(config: Config, run: Path) -> Any:
    """The run's tokenizer as a transformers fast tokenizer, giving the ids the run trained on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if config.data.tokenizer == "bytes":
        vocab = {char: byte for byte, char in enumerate(byte_unicode())}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
        # Its end of document is byte 0, never part of text: no special token (the model's config
        # and generation config name id 0).
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    path = run / "tokenizer.json"
    if not path.is_file():
        raise ModelIOError(f"{path} is missing: the run's tokenizer is written there at its start")
    ours = BPETokenizer.load(path)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(path)), eos_token=ours.eos_text)


def run_config(run: Path) -> Config:
    """The config of the run in directory `run`, which is where its checkpoints are (wherever the
    run was started from, and under whatever run.dir it named then)."""
    path = run / "config.yaml"
    if not path.is_file():
        raise ModelIOError(f"{run} is not a cocodc run directory (no config.yaml)")
    try:
        config = saved_config(yaml.safe_load(path.read_text()))
    except (ConfigError, yaml.YAMLError, AttributeError) as err:
        raise ModelIOError(f"{path} is not a config cocodc can read ({str(err).splitlines()[0]})") from None
    config.run.dir, config.run.name = str(run.parent), run.name
    return config


def global_model(config: Config, step: int | None, merge: bool = True) -> tuple[int, dict[str, torch.Tensor]]:
    """(step, the parameters the regions agree on at it): the latest complete checkpoint's unless
    `step` names one; a federated LoRA run's with the adapters merged (unless not `merge`)."""
    if config.mode == "split":
        raise ModelIOError(
            "a split run's model lives in parts on its workers and server: export takes regions and federated runs"
        )
    root = checkpoint_root(config, 0)
    if step is None:
        step = checkpoint.latest_step(root)
    elif not (checkpoint.step_dir(root, step) / "meta.json").is_file():
        raise ModelIOError(f"the run has no complete checkpoint at step {step} in {root}")
    state = checkpoint.read_region(root, step, 0)
    if config.mode == "federated":  # the server's model: the global one, loaded after every round
        f = config.federated
        merged = f.lora_rank and merge
        return step, merged_lora(state["model"], f.lora_rank, f.lora_alpha) if merged else state["model"]
    return step, state["outer"]["global_params"] if "outer" in state else state["model"]


def merged_lora(state: dict[str, torch.Tensor], rank: int, alpha: float | None) -> dict[str, torch.Tensor]:
    """A LoRA model's state (peft's names) as the plain model's: each adapted weight W becomes
    W + alpha / rank x B A (alpha: 2 x rank unless set, as federated.lora_alpha)."""
    scale = (alpha if alpha is not None else 2 * rank) / rank
    plain = {}
    for name, tensor in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        layer, adapted, leaf = name.partition(".base_layer.")
        if adapted and leaf == "weight":
            a, b = state[f"{layer}.lora_A.default.weight"], state[f"{layer}.lora_B.default.weight"]
            tensor = tensor + scale * (b.float() @ a.float()).to(tensor.dtype)
        plain[f"{layer}.{leaf}" if adapted else name] = tensor
    return plain


def export_run(run: Path, out: Path, step: int | None = None, adapter: bool = False) -> int:
    """Write the run's model at `step` (default: its latest checkpoint) to `out`; returns the step.
    With `adapter` (a federated LoRA run): the base model to `out` and its LoRA adapters, as peft
    writes them, to `out/adapter`, rather than the adapters merged into the weights."""
    config = run_config(run)
    tokenizer = hf_tokenizer(config, run)
    if adapter and not (config.mode == "federated" and config.federated.lora_rank):
        raise ModelIOError(f"--adapter: {run} trained no LoRA adapters (federated.lora_rank)")
    step, params = global_model(config, step, merge=not adapter)
    if not adapter:
        save_hf(params, config, tokenizer, out)
        return step
    f = config.federated
    save_hf(merged_lora(params, f.lora_rank, 0.0), config, tokenizer, out)  # scale 0: the base alone
    save_adapter(params, config, out)
    return step


def save_adapter(state: dict[str, torch.Tensor], config: Config, base: Path) -> None:
    """The LoRA adapters of `state` (peft's names on our model) as a peft adapter of the transformers
    model exported to `base`, written to base/adapter: our qkv adapter becomes q_proj's, k_proj's
    and v_proj's, with A shared and B's rows split (q's and k's reordered as the weights are)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    m, f = config.model, config.federated
    if m.hf_config:  # the adapters sit on the transformers model's own layers already
        adapters = {f"base_model.model.{name.removeprefix('hf.')}": t for name, t in state.items() if ".lora_" in name}
    else:
        adapters = _llama_adapters(state, m)
    lora = LoraConfig(
        r=f.lora_rank,
        lora_alpha=f.lora_alpha if f.lora_alpha is not None else 2 * f.lora_rank,
        target_modules=sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapters}),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    missing = set(name for name in model.state_dict() if "lora_" in name) - set(adapters)
    if missing:
        raise ModelIOError(f"the run's adapters do not cover {sorted(missing)[0]}")
    model.load_state_dict(adapters, strict=False)
    model.save_pretrained(base / "adapter")


def _llama_adapters(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Our model's adapters by the names peft gives them on the exported LlamaForCausalLM."""
    heads, kv = m.n_heads, kv_heads(m)
    head_dim = m.d_model // heads
    adapters = {}
    for i in range(m.n_layers):
        ours, theirs = f"blocks.{i}.", f"base_model.model.model.layers.{i}."
        a, b = (state[f"{ours}attn.qkv.lora_{x}.default.weight"] for x in "AB")
        b_q, b_k, b_v = b.split([heads * head_dim, kv * head_dim, kv * head_dim])
        pairs = {
            "self_attn.q_proj": (a, _half_split(b_q, heads)),
            "self_attn.k_proj": (a, _half_split(b_k, kv)),
            "self_attn.v_proj": (a, b_v),
        }
        for our_name, their_name in _ADAPTED.items():
            pairs[their_name] = tuple(state[f"{ours}{our_name}.lora_{x}.default.weight"] for x in "AB")
        for their_name, (a_part, b_part) in pairs.items():
            adapters[f"{theirs}{their_name}.lora_A.default.weight"] = a_part
            adapters[f"{theirs}{their_name}.lora_B.default.weight"] = b_part
    return adapters


_ADAPTED = {  # our adapted Linear: its name in a LlamaDecoderLayer
    "attn.out": "self_attn.o_proj",
    "ffn.gate": "mlp.gate_proj",
    "ffn.up": "mlp.up_proj",
    "ffn.down": "mlp.down_proj",
}


def save_hf(params: dict[str, torch.Tensor], config: Config, tokenizer: Any, out: Path) -> None:
    """Our model's parameters (by name) and a tokenizer from `hf_tokenizer`, as a transformers
    directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # a bar for writing one small file is noise on the console

    if config.model.hf_config:  # the run's transformers model: its own names, its own config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(hf_config_file(config.model.hf_config).parent)
            )
        state = {name.removeprefix("hf."): tensor for name, tensor in params.items()}
    else:
        eos_id = 0 if config.data.tokenizer == "bytes" else tokenizer.eos_token_id
        max_seq_len = config.model.max_seq_len or config.train.seq_len
        with torch.device("meta"):
            model = LlamaForCausalLM(llama_config(config.model, params["embed.weight"].shape[0], max_seq_len, eos_id))
        state = llama_state(params, config.model)
    _load(model, state, assign=True)
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def generate(source: Path, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
    """`prompt` and its continuation by the model in `source` (a run, exported on the way, or an
    export): greedy with temperature 0, else sampled."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as exported:
        if (source / "config.yaml").is_file():
            export_run(source, Path(exported))
            source = Path(exported)
        if not (source / "config.json").is_file():
            raise ModelIOError(f"{source} is neither a cocodc run directory nor an exported model (no config.json)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source).eval()
        except (OSError, ValueError) as err:
            raise ModelIOError(f"{source}: transformers cannot load it ({str(err).splitlines()[0][:200]})") from None
    ids = torch.tensor([tokenizer(prompt).input_ids])  # its special tokens as training had them (a BOS)
    if ids.shape[1] == 0:
        raise ModelIOError("--prompt is empty")
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, **sampling)
    return tokenizer.decode(tokens[0], skip_special_tokens=True)


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cocodc export", description="Write a run's model for transformers.")
    parser.add_argument("run", type=Path, help="the run directory")
    parser.add_argument("--hf", type=Path, required=True, metavar="OUT", help="the directory to write")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint to export (default: the latest)")
    parser.add_argument(
        "--adapter",
        action="store_true",
        help="a federated LoRA run: the base model, and its adapters as a peft adapter in OUT/adapter (not merged)",
    )
    return parser


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cocodc generate", description="Continue a prompt with a run's model.")
    parser.add_argument("source", type=Path, help="a run directory, or a directory `cocodc export` wrote")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    parser.add_argument("--seed", type=int, default=0, help="the sampling's seed")
    return parser
