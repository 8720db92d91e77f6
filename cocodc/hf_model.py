"""A transformers causal LM (model.hf_config) behind the interface the trainer gives cocodc's own
model: `forward(tokens, targets=)` returns the logits, or with targets the mean next-token
cross-entropy; `blocks` are its decoder layers (found as the fragments find them, or named by
sync.blocks). It is built from a config.json alone: no weights, no download (model.init_from loads
weights into it). Its parameters are named `hf.<the transformers name>`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cocodc.config import ConfigError
from cocodc.sync.fragments import find_blocks


def hf_config_file(path: str) -> Path:
    """The config.json model.hf_config names (the file, or the one in the directory)."""
    found = Path(path).expanduser()
    return found / "config.json" if found.is_dir() else found


def hf_layer_count(path: str) -> int | None:
    """The decoder layers a config.json declares (None if it names them otherwise)."""
    settings = json.loads(hf_config_file(path).read_text())
    return settings.get("num_hidden_layers", settings.get("n_layer"))


class HFCausalLM(nn.Module):
    def __init__(self, hf: nn.Module, blocks_path: str = ""):
        super().__init__()
        self.hf, self.blocks_path = hf, blocks_path

    @property
    def blocks(self) -> nn.ModuleList:
        return find_blocks(self.hf, self.blocks_path)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.hf(input_ids=tokens, use_cache=False).logits
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def build_hf_model(path: str, vocab_size: int, blocks_path: str, activation_checkpointing: str) -> HFCausalLM:
    """The transformers model of the config.json at `path`, initialised by transformers from
    torch's generator (seed it first), in fp32 (autocast computes in bf16 where asked)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    file = hf_config_file(path)
    try:
        settings = AutoConfig.from_pretrained(file.parent)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model.hf_config {file}: transformers cannot read it ({first})") from None
    if getattr(settings, "vocab_size", vocab_size) < vocab_size:
        raise ConfigError(
            f"model.hf_config {file}: its vocab_size ({settings.vocab_size}) is below the tokenizer's ({vocab_size})"
        )
    hf = AutoModelForCausalLM.from_config(settings, dtype=torch.float32)
    if activation_checkpointing == "full":
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        find_blocks(hf, blocks_path)
    except ValueError as err:
        raise ConfigError(f"model.hf_config {file}: {err}") from None
    return HFCausalLM(hf, blocks_path)
