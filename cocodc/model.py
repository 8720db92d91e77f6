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

from cocodc.config import ModelConfig


def ffn_hidden_size(config: ModelConfig) -> int:
    if config.ffn_hidden:
        return config.ffn_hidden
    return 64 * math.ceil(8 * config.d_model / 3 / 64)


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of the last dim; x is (batch, heads, seq, head_dim)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, dim // self.n_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
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
        self.register_buffer("rope_cos", torch.empty(max_seq_len, self.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(max_seq_len, self.head_dim // 2), persistent=False)
        self.activation_checkpointing = "none"  # "full" or "selective": see the module's docstring
        self.loss_chunk_tokens = 0  # the loss in chunks of this many tokens; 0: in one piece
        if self.embed.weight.device.type != "meta":
            self.reset_parameters(seed)

    @property
    def head_dim(self) -> int:
        return self.config.d_model // self.config.n_heads

    def materialize(self, device: torch.device, seed: int | None) -> Transformer:
        """A model built on the meta device, allocated on `device` and initialised from `seed`."""
        self.to_empty(device=device)
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
        cos, sin = rotary_tables(self.head_dim, self.max_seq_len, self.config.rope_theta)
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
