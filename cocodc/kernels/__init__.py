"""Fused kernels for the outer sync, imported as `cocodc.kernels` (pyproject maps this folder
there; the folder is not a top-level package named `kernels`: that name belongs to another library).

Each operation here runs a Triton kernel (`triton_ops`) on CUDA tensors when triton is importable
and the backend is "auto", else its torch reference (`cocodc.comm.codec`, `reference`),
which defines the semantics. `set_backend` (the config key `train.kernels`) forces one or the
other for the whole process.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch

from cocodc.comm.codec import Codec
from cocodc.kernels import reference

BACKENDS = ("auto", "torch", "triton")
_backend = "auto"
_triton_ops = None


def set_backend(name: str) -> None:
    """The backend: "auto", the Triton kernels on CUDA tensors where triton is importable, else the reference;
    "torch": the reference everywhere; "triton": the kernels for every tensor (a CPU tensor needs
    TRITON_INTERPRET=1 in the environment before the first kernel runs: tests do this)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; use {', '.join(BACKENDS)}")
    if name == "triton" and not triton_available():
        raise ValueError("the triton kernel backend needs triton installed (pip install 'cocodc[kernels]')")
    _backend = name


def serving(device: torch.device) -> str:
    """What runs the outer sync's arithmetic for tensors on `device`: "triton" or "torch"."""
    return "triton" if _kernels_for(torch.empty(0, device=device)) is not None else "torch"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernels_for(tensor: torch.Tensor):
    """The Triton module where it runs this tensor, else None (the reference runs)."""
    global _triton_ops
    wanted = _backend == "triton" or (_backend == "auto" and tensor.is_cuda and triton_available())
    if not wanted:
        return None
    if _triton_ops is None:
        from cocodc.kernels import triton_ops

        _triton_ops = triton_ops
    return _triton_ops


def encode(codec: Codec, values: torch.Tensor, minus: torch.Tensor | None = None) -> torch.Tensor:
    """codec.encode(values - minus): with a kernel, one pass that never writes the difference."""
    ops = _kernels_for(values)
    if ops is not None and ops.supports(codec):
        return ops.encode(codec, values, minus)
    return codec.encode(values - minus if minus is not None else values)


def decode(codec: Codec, payload: torch.Tensor, numel: int) -> torch.Tensor:
    ops = _kernels_for(payload)
    if ops is not None and ops.supports(codec):
        return ops.decode_sum(codec, payload.view(1, -1), numel, None, None)
    return codec.decode(payload, numel)


def decode_sum(codec: Codec, rows: torch.Tensor, numel: int, weights: Sequence[float], mean: bool) -> torch.Tensor:
    """sum_m w_m decode(rows[m]) in member order, in fp32 (each row holds its payload first), over
    the rows of weight != 0 (the others are never read); divided by sum_m w_m with `mean` (zeros
    if every weight is 0)."""
    total = sum(weights)
    ops = _kernels_for(rows)
    if ops is not None and ops.supports(codec):
        on_device = torch.tensor(weights, dtype=torch.float32, device=rows.device)
        return ops.decode_sum(codec, rows, numel, on_device, total if mean and total > 0 else None)
    result = torch.zeros(numel, dtype=torch.float32, device=rows.device)
    code_bytes = codec.encoded_bytes(numel)
    for row, weight in zip(rows, weights, strict=True):
        if weight:
            result += weight * codec.decode(row[:code_bytes], numel)
    return result / total if mean and total > 0 else result


def square_sums(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """[sum((a - b)^2) for each pair] in fp32, on the device: the drift of several fragments with
    one host sync when read."""
    ops = _kernels_for(pairs[0][0])
    if ops is not None:
        return ops.square_sums(list(pairs))
    return torch.stack([torch.sub(a, b).float().square_().sum() for a, b in pairs])


def outer_apply(
    grad: torch.Tensor, global_: torch.Tensor, momentum: torch.Tensor | None, live: torch.Tensor, **options: Any
) -> tuple[float, float]:
    """A fragment's outer step and merge, on its flat buffers (every one fp32 but `live`):

    global_ <- SGD step on `grad` (lr, momentum mu, Nesterov or not; momentum None: plain SGD;
    `first`: the momentum starts as grad, as torch.optim.SGD's does); then the merge into `live`:
    "replace" (live <- global_), "lerp" (`merge_alpha`, `alpha`) or "compensate"
    (`merge_compensated` with `sent`, `dc_lambda`, `alpha`, and `normaliser` updated first with
    `beta`, or normalised per tensor of the sizes in `per_tensor`, or w from `curvature`).
    Keywords as `reference.outer_apply`. Returns w's mean and the fraction of elements at its cap
    ("compensate"; else zeros).
    """
    ops = _kernels_for(global_)
    if ops is None:
        return reference.outer_apply(grad, global_, momentum, live, **options)
    per_tensor = options.pop("per_tensor", None)
    if options["merge"] != "compensate" or per_tensor is None:
        if options.get("normaliser") is not None:
            options["cap"] = 1.0
        elif options.get("curvature") is not None:
            options["cap"] = reference.W_MAX
        stats = ops.outer_apply(grad, global_, momentum, live, **options)
    else:
        # The per-tensor mean of delta^2 is a reduction ahead of the one pass, so that pass runs per tensor.
        sizes = list(per_tensor)
        views = [t.split(sizes) if t is not None else [None] * len(sizes)
                 for t in (grad, global_, momentum, live, options.pop("sent"))]  # fmt: skip
        counts = torch.tensor(sizes, dtype=torch.float32, device=grad.device)
        means = ops.square_sums(list(zip(views[3], views[4], strict=True))) / counts
        tiny = torch.finfo(torch.float32).tiny
        stats = sum(
            ops.outer_apply(g, gl, m, li, sent=s, divisor=max(mean, tiny), cap=reference.W_MAX, **options)
            for g, gl, m, li, s, mean in zip(*views, means.tolist(), strict=True)
        )
    w_sum, capped = stats.tolist()
    return w_sum / live.numel(), capped / live.numel()
