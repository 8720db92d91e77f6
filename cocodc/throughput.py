"""What an inner step achieves: model FLOPs per token, TFLOP/s, MFU against the device's peak, and
peak memory per rank.

FLOPs per token follow the usual convention (PaLM's appendix, torchtitan's): 6 N for the forward
and backward matmuls over the N parameters that multiply (all but the input embedding, a lookup),
plus 12 L d T for attention's score and value products over a sequence of T tokens (counted whole,
though causal attention needs half of them). MFU compares the achieved rate with the device's bf16
dense peak, so it is given only for a run in bf16 on a device in `PEAK_BF16_TFLOPS`.
"""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

from cocodc.sync.fragments import find_blocks

# Dense bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets (no sparsity).
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.4,  # SXM
    "H200": 989.4,
    "A100": 312.0,
    "L4": 121.0,
}


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Training FLOPs per token: 6 x the parameters a token meets (all but an input embedding that
    is only looked up; a tied one is the output head too) + attention's 12 x layers x width x seq_len."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    multiplied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    looked_up = sum(m.weight.numel() for m in embeddings if id(m.weight) not in multiplied)
    params = sum(p.numel() for p in model.parameters())
    return 6 * (params - looked_up) + 12 * len(find_blocks(model)) * embeddings[0].embedding_dim * seq_len


def peak_tflops(device: torch.device, bf16: bool) -> float | None:
    """The device's bf16 dense peak, if it is known and the run computes in bf16."""
    if device.type != "cuda" or not bf16:
        return None
    return peak_of(torch.cuda.get_device_name(device))


def peak_of(device_name: str) -> float | None:
    """The bf16 dense peak of a device by its name ("NVIDIA H100 80GB HBM3"), or None if unknown."""
    words = device_name.replace("-", " ").split()
    for model, peak in PEAK_BF16_TFLOPS.items():  # the most specific name first
        if all(word in words for word in model.split()):
            return peak
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this rank has held: CUDA's allocator peak, or on the CPU the process's peak
    resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes * (1 if sys.platform == "darwin" else 1024)  # macOS reports bytes


class Throughput:
    """Per rank: TFLOP/s and MFU from tokens/s, and peak memory."""

    def __init__(self, model: nn.Module, seq_len: int, device: torch.device, bf16: bool, ranks: int):
        self.flops_per_token = flops_per_token(model, seq_len)
        self.peak = peak_tflops(device, bf16)
        self.device, self.ranks = device, ranks

    def at(self, tokens_per_s: float) -> dict[str, float | int | None]:
        """`tokens_per_s` over the job's `ranks`: each rank's TFLOP/s, MFU and peak memory."""
        tflops = self.flops_per_token * tokens_per_s / self.ranks / 1e12
        return {
            "tflops": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "peak_memory_bytes": peak_memory_bytes(self.device),
        }
