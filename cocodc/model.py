"""A decoder-only transformer: RMSNorm, rotary positions, SwiGLU, causal SDPA attention.

The model exposes `blocks` (an `nn.ModuleList`) so the outer sync can group them into fragments.
Given targets, its forward returns the loss, computed in chunks of tokens whose logits are
recomputed in backward, so the fp32 logits of the whole batch never exist at once. Its blocks may
recompute their activations in backward (`activation_checkpointing`): "full" keeps only each
block's input, "selective" keeps the matmuls' and attention's outputs and recomputes the rest
(norms, rotary, SiLU: cheap per byte).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from cocodc.config import ModelConfig, RopeScalingConfig


def ffn_hidden_size(config: ModelConfig) -> int:
    if config.ffn_hidden:
        return config.ffn_hidden
    return config.ffn_multiple_of * math.ceil(8 * config.d_model / 3 / config.ffn_multiple_of)


def kv_heads(config: ModelConfig) -> int:
    return config.n_kv_heads or config.n_heads


def rotary_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig) -> torch.Tensor:
    """The angle per position of each of the head's head_dim / 2 rotated pairs (float64); with
    Llama 3 scaling, long wavelengths slowed by `scaling.factor` and the middle band blended."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if not scaling.factor:
        return inv_freq
    wavelength = 2 * math.pi / inv_freq
    long_past = scaling.original_max_len / scaling.low_freq_factor
    short_below = scaling.original_max_len / scaling.high_freq_factor
    blend = (scaling.original_max_len / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - blend) * inv_freq / scaling.factor + blend * inv_freq
    scaled = torch.where(wavelength > long_past, inv_freq / scaling.factor, inv_freq)
    return torch.where((wavelength >= short_below) & (wavelength <= long_past), blended, scaled)


def rotary_tables(
    head_dim: int, max_len: int, theta: float, scaling: RopeScalingConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = rotary_frequencies(head_dim, theta, scaling or RopeScalingConfig())
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of the last dim; x is (batch, heads, seq, head_dim). (HF's
    Llama pairs x[i] with x[i + head_dim / 2]: the export permutes q's and k's rows to match.)"""
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Causal self-attention; with fewer key/value heads than query heads, grouped-query attention.
    One `qkv` projection: its rows are q's heads, then k's, then v's."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, kv_heads(config)
        self.head_dim = config.d_model // config.n_heads
        self.qkv = nn.Linear(config.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        heads = self.qkv(x).view(batch, seq, self.n_heads + 2 * self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = heads.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        grouped = self.n_kv_heads != self.n_heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
        return self.out(y.transpose(1, 2).reshape(batch, seq, dim))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_size(config)
        self.gate = nn.Linear(config.d_model, hidden, bias=False)
        self.up = nn.Linear(config.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.ffn = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """Built on the meta device (`with torch.device("meta")`), it holds no memory until
    `materialize(device, seed)`; built anywhere else, it is initialised at once, from `seed` or
    (None) torch's global generator. The same seed gives the same parameters on any device, bit for
    bit, whether built on the meta device or not."""

    def __init__(self, config: ModelConfig, vocab_size: int, max_seq_len: int, seed: int | None = None):
        super().__init__()
        self.config, self.max_seq_len = config, max_seq_len
        self.embed = nn.Embedding(vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.head = nn.Linear(config.d_model, vocab_size, bias=False)
        self._tie()
        self.register_buffer("rope_cos", torch.empty(max_seq_len, self.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(max_seq_len, self.head_dim // 2), persistent=False)
        self.activation_checkpointing = "none"  # "full" or "selective": see the module's docstring
        self.loss_chunk_tokens = 0  # the loss in chunks of this many tokens; 0: in one piece
        if self.embed.weight.device.type != "meta":
            self.reset_parameters(seed)

    def _tie(self) -> None:
        if self.config.tie_embeddings:
            self.head.weight = self.embed.weight

    @property
    def head_dim(self) -> int:
        return self.config.d_model // self.config.n_heads

    def materialize(self, device: torch.device, seed: int | None) -> Transformer:
        """A model built on the meta device, allocated on `device` and initialised from `seed`."""
        self.to_empty(device=device)
        self._tie()  # to_empty makes each module's parameters anew, the tied one twice
        self.reset_parameters(seed)
        return self

    @torch.no_grad()
    def reset_parameters(self, seed: int | None) -> None:
        """Every parameter drawn on the CPU, one at a time (so a model on any device starts from the
        same numbers), from a generator seeded with `seed` (None: torch's global one); the rotary
        tables computed."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        # Residual outputs are scaled down with depth so the residual stream keeps its variance.
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)
                continue
            std = residual_std if name.endswith(("attn.out.weight", "ffn.down.weight")) else 0.02
            param.copy_(torch.empty(param.shape).normal_(std=std, generator=generator))
        cos, sin = rotary_tables(self.head_dim, self.max_seq_len, self.config.rope_theta, self.config.rope_scaling)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The logits of `tokens` (batch, seq); with `targets` (batch, seq), the mean cross-entropy."""
        hidden = self.run_blocks(self.embed(tokens), 0, len(self.blocks))
        if targets is None:
            return self.logits(hidden)
        return chunked_cross_entropy(self.logits, hidden, targets, self.loss_chunk_tokens)

    def run_blocks(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Blocks start..end-1 on hidden states x (batch, seq, d_model): the pieces a cut model
        (split learning) runs on different machines."""
        seq = x.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        recompute = self.activation_checkpointing != "none" and torch.is_grad_enabled()
        context = _save_matmuls if self.activation_checkpointing == "selective" else None
        for block in self.blocks[start:end]:
            if recompute:
                x = checkpoint(block, x, cos, sin, use_reentrant=False, **({"context_fn": context} if context else {}))
            else:
                x = block(x, cos, sin)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _matmul_policy(_ctx: object, op: object, *_args: object, **_kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_save_matmuls = functools.partial(create_selective_checkpoint_contexts, _matmul_policy)


def chunked_cross_entropy(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Mean cross-entropy of `head(hidden)` against `targets`, in chunks of `chunk_tokens` tokens
    (0: one piece). Each chunk's logits are made in fp32, summed into the loss and dropped; backward
    recomputes them chunk by chunk."""
    rows, labels = hidden.flatten(0, 1), targets.flatten()
    if chunk_tokens <= 0 or len(rows) <= chunk_tokens:
        return F.cross_entropy(head(rows).float(), labels)
    total = sum(
        checkpoint(_summed_loss, head, part, part_labels, use_reentrant=False)
        for part, part_labels in zip(rows.split(chunk_tokens), labels.split(chunk_tokens), strict=True)
    )
    return total / len(labels)


def _summed_loss(
    head: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    return F.cross_entropy(head(rows).float(), labels, reduction="sum")


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (batch, seq_len + 1) token tensor (the model's forward
    takes the targets: a Transformer, or a wrapper of one)."""
    return model(batch[:, :-1], targets=batch[:, 1:])
