"""Triton kernels for the outer sync: each one pass over memory where the torch reference makes
several. The references (`cocodc.comm.codec`, `reference`) define what they compute.

Kernels are launched with `enable_fp_fusion=False`: a multiply and an add round twice, as the
reference's separate torch ops do, and `tl.fma` stands where torch's own kernels fuse (`add` with
`alpha`, `lerp`). Under `TRITON_INTERPRET=1` (set before this module is imported) they run on CPU
tensors.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from cocodc.comm.codec import BLOCK, Codec

# Codec ids inside the kernels.
BF16, FP8, INT8, E3M0 = 1, 2, 3, 4
_CODEC_IDS = {"bf16": BF16, "fp8": FP8, "int8": INT8, "e3m0": E3M0}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Quantization blocks per program of the codec kernels: tuned per size on a GPU (each element's
# result is the same whatever the tile), fixed in the interpreter.
ROWS = 8
_tune_blocks = (
    (lambda kernel: kernel)
    if INTERPRETED
    else triton.autotune(
        [triton.Config({"ROWS": rows}, num_warps=warps) for rows in (4, 8, 16, 32) for warps in (4, 8)],
        key=["numel", "CODEC"],
    )
)
_TILE_ARGS = {"ROWS": ROWS} if INTERPRETED else {}
TILE = 1024  # elements per program in the elementwise kernels
TINY = torch.finfo(torch.float32).tiny
_LAUNCH = {"enable_fp_fusion": False}


def supports(codec: Codec) -> bool:
    return codec.name in _CODEC_IDS


@triton.jit
def _e3m0_nibble(y):
    """4-bit code of y in [-1, 1]: the sign in bit 3, k in bits 0-2 (the power of two nearest to
    |y| is 2^(k - 7), ties up; 0 below 2^-7): k counts the midpoints 0.75 * 2^j at or below |y|."""
    m = tl.abs(y)
    k = (
        1
        + (m >= 0.0234375).to(tl.int32)
        + (m >= 0.046875).to(tl.int32)
        + (m >= 0.09375).to(tl.int32)
        + (m >= 0.1875).to(tl.int32)
        + (m >= 0.375).to(tl.int32)
        + (m >= 0.75).to(tl.int32)
    )
    k = tl.where(m >= 0.0078125, k, 0)
    return (k | ((y < 0).to(tl.int32) << 3)).to(tl.uint8)


@triton.jit
def _e3m0_value(nibble):
    k = (nibble & 7).to(tl.int32)
    magnitude = tl.where(k > 0, ((k + 120) << 23).to(tl.float32, bitcast=True), 0.0)
    return tl.where(nibble >= 8, -magnitude, magnitude)


@triton.jit
def _round_half_even(y):
    # Exact for |y| < 2^22: adding 1.5 * 2^23 leaves no fraction bits, and IEEE addition rounds to even.
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _e4m3_code(y):
    """fp8 e4m3fn bits of y (|y| <= 448), rounded to nearest even by integer arithmetic, so the
    interpreter (whose own fp8 cast misrounds subnormals) and the GPU agree with torch's cast."""
    bits = y.to(tl.uint32, bitcast=True)
    sign = (bits >> 31) << 7
    magnitude = tl.abs(y)
    # Subnormal (below 2^-6): steps of 2^-9; 8 steps is the smallest normal's code, 0x08.
    small = _round_half_even(magnitude * 512.0).to(tl.uint32)
    # Normal: keep 3 of fp32's 23 mantissa bits, rounding half to even (a carry moves the exponent),
    # and re-bias the exponent from 127 to 7.
    wide = magnitude.to(tl.uint32, bitcast=True)
    normal = ((wide + 0x7FFFF + ((wide >> 20) & 1)) >> 20) - 960
    code = tl.minimum(tl.where(magnitude < 0.015625, small, normal), 126)
    return (code | sign).to(tl.uint8)


@_tune_blocks
@triton.jit
def _encode_blocks_kernel(
    values, minus, scales, codes, numel, n_blocks, code_count,
    CODEC: tl.constexpr, TOP: tl.constexpr, HAS_MINUS: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    # A tile of ROWS blocks of 128 contiguous values: one coalesced pass in, one out.
    blocks = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    at = blocks[:, None] * 128 + tl.arange(0, 128)[None, :]
    x = tl.load(values + at, mask=at < numel, other=0.0).to(tl.float32)
    if HAS_MINUS:
        x = x - tl.load(minus + at, mask=at < numel, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), TOP)
    # tl.max may drop a NaN, which torch's amax keeps: a block holding one must decode non-finite.
    scale = tl.where(tl.max((x != x).to(tl.int32), axis=1) > 0, float("nan"), scale)
    scale = tl.where(scale == 0, 1.0, scale)
    tl.store(scales + blocks, scale, mask=blocks < n_blocks)
    y = tl.math.div_rn(x, scale[:, None])
    if CODEC == 4:
        even, odd = tl.split(tl.reshape(_e3m0_nibble(y), (ROWS, 64, 2)))
        pair = blocks[:, None] * 64 + tl.arange(0, 64)[None, :]
        tl.store(codes + pair, even | (odd << 4), mask=pair < code_count)
    else:
        if CODEC == 3:
            code = tl.minimum(tl.maximum(_round_half_even(y), -127.0), 127.0).to(tl.int8).to(tl.uint8, bitcast=True)
        else:
            code = _e4m3_code(y)
        tl.store(codes + at, code, mask=at < code_count)


@triton.jit
def _encode_cast_kernel(values, minus, out, numel, HAS_MINUS: tl.constexpr, TILE: tl.constexpr):
    i = tl.program_id(0) * TILE + tl.arange(0, TILE)
    x = tl.load(values + i, mask=i < numel, other=0.0).to(tl.float32)
    if HAS_MINUS:
        x = x - tl.load(minus + i, mask=i < numel, other=0.0).to(tl.float32)
    # Rounded to nearest even by hand: the interpreter's own bf16 cast truncates.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    tl.store(out + i, bits.to(tl.uint16), mask=i < numel)


def encode(codec: Codec, values: torch.Tensor, minus: torch.Tensor | None = None) -> torch.Tensor:
    numel = values.numel()
    payload = torch.empty(codec.encoded_bytes(numel), dtype=torch.uint8, device=values.device)
    other = minus if minus is not None else values
    if codec.name == "bf16":
        grid = (triton.cdiv(numel, TILE),)
        out = payload.view(torch.uint16)
        _encode_cast_kernel[grid](values, other, out, numel, HAS_MINUS=minus is not None, TILE=TILE, **_LAUNCH)
        return payload
    n_blocks = math.ceil(numel / BLOCK)
    scales = payload[: 4 * n_blocks].view(torch.float32)
    grid = lambda meta: (triton.cdiv(n_blocks, meta["ROWS"]),)  # noqa: E731
    _encode_blocks_kernel[grid](
        values, other, scales, payload[4 * n_blocks :], numel, n_blocks, codec.code_count(numel),
        CODEC=_CODEC_IDS[codec.name], TOP=float(codec.top), HAS_MINUS=minus is not None, **_TILE_ARGS, **_LAUNCH,
    )  # fmt: skip
    return payload


@_tune_blocks
@triton.jit
def _decode_blocks_kernel(
    codes, scales, weights, out, numel, n_blocks, code_stride, scale_stride, total,
    MEMBERS: tl.constexpr, CODEC: tl.constexpr, WEIGHTED: tl.constexpr, MEAN: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    blocks = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    at = blocks[:, None] * 128 + tl.arange(0, 128)[None, :]
    acc = tl.zeros((ROWS, 128), dtype=tl.float32)
    # Unrolled (the members are a handful of regions), so every member's loads are issued at once.
    for m in tl.static_range(MEMBERS):
        scale = tl.load(scales + m * scale_stride + blocks, mask=blocks < n_blocks, other=0.0)[:, None]
        row = codes + m * code_stride
        if CODEC == 4:
            # Each byte read once per pair of values: [ROWS, 64, 1] against the nibble shifts [0, 4].
            pair = blocks[:, None, None] * 64 + tl.arange(0, 64)[None, :, None]
            byte = tl.load(row + pair, mask=2 * pair < numel, other=0)
            nibble = (byte >> (tl.arange(0, 2) * 4).to(tl.uint8)[None, None, :]) & 15
            value = tl.reshape(_e3m0_value(nibble), (ROWS, 128))
        elif CODEC == 3:
            value = tl.load(row + at, mask=at < numel, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        else:
            value = tl.load(row + at, mask=at < numel, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        value = value * scale
        if WEIGHTED:
            w = tl.load(weights + m)
            acc = tl.where(w != 0, acc + w * value, acc)
        else:
            acc = value
    if MEAN:
        acc = tl.math.div_rn(acc, total)
    tl.store(out + at, acc, mask=at < numel)


@triton.jit
def _decode_cast_kernel(
    values, weights, out, numel, stride, total,
    MEMBERS: tl.constexpr, WEIGHTED: tl.constexpr, MEAN: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0) * TILE + tl.arange(0, TILE)
    acc = tl.zeros((TILE,), dtype=tl.float32)
    for m in tl.static_range(MEMBERS):
        v = tl.load(values + m * stride + i, mask=i < numel, other=0.0).to(tl.float32)
        if WEIGHTED:
            w = tl.load(weights + m)
            acc = tl.where(w != 0, acc + w * v, acc)
        else:
            acc = v
    if MEAN:
        acc = tl.math.div_rn(acc, total)
    tl.store(out + i, acc, mask=i < numel)


def _typed(rows: torch.Tensor, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Bytes [start, stop) of every row, read as `dtype` (one row need not start on a word)."""
    if rows.shape[0] == 1:
        return rows[0, start:stop].view(dtype).view(1, -1)
    return rows[:, start:stop].view(dtype)


def decode_sum(
    codec: Codec, rows: torch.Tensor, numel: int, weights: torch.Tensor | None, total: float | None
) -> torch.Tensor:
    """rows [M, >= encoded_bytes], each starting on a 4-byte word (as the engine's) ->
    sum_m w_m decode(row m) (rows of weight 0 never read), divided by `total` unless it is None;
    with `weights` None, M is 1 and the row is decoded as it is."""
    members = rows.shape[0]
    out = torch.empty(numel, dtype=torch.float32, device=rows.device)
    weighted = weights is not None
    weights = weights if weighted else out  # not read
    mean = total is not None
    total = float(total) if mean else 1.0
    if codec.name == "bf16":
        values = _typed(rows, 0, 2 * numel, torch.bfloat16)
        grid = (triton.cdiv(numel, TILE),)
        _decode_cast_kernel[grid](
            values, weights, out, numel, values.stride(0), total,
            MEMBERS=members, WEIGHTED=weighted, MEAN=mean, TILE=TILE, **_LAUNCH,
        )  # fmt: skip
        return out
    n_blocks = math.ceil(numel / BLOCK)
    scales = _typed(rows, 0, 4 * n_blocks, torch.float32)
    codes = rows[:, 4 * n_blocks :]
    grid = lambda meta: (triton.cdiv(n_blocks, meta["ROWS"]),)  # noqa: E731
    _decode_blocks_kernel[grid](
        codes, scales, weights, out, numel, n_blocks, codes.stride(0), scales.stride(0), total,
        MEMBERS=members, CODEC=_CODEC_IDS[codec.name], WEIGHTED=weighted, MEAN=mean, **_TILE_ARGS, **_LAUNCH,
    )  # fmt: skip
    return out


@triton.jit
def _square_sum_kernel(a, b, partials, numel, TILE: tl.constexpr):
    i = tl.program_id(0) * TILE + tl.arange(0, TILE)
    x = tl.load(a + i, mask=i < numel, other=0.0).to(tl.float32)
    d = x - tl.load(b + i, mask=i < numel, other=0.0).to(tl.float32)
    tl.store(partials + tl.program_id(0), tl.sum(d * d, axis=0))


def square_sums(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """[sum((a - b)^2) for each pair], fp32, on the device: per-program partial sums then a
    deterministic sum of them (no atomics, so every run adds in the same order)."""
    sums = []
    for a, b in pairs:
        partials = torch.empty(triton.cdiv(a.numel(), TILE), dtype=torch.float32, device=a.device)
        _square_sum_kernel[(partials.numel(),)](a, b, partials, a.numel(), TILE=TILE, **_LAUNCH)
        sums.append(partials.sum())
    return torch.stack(sums)


# Outer-step variants (constexpr ids).
NO_MOMENTUM, HEAVY_BALL, NESTEROV = 0, 1, 2
REPLACE, LERP, COMPENSATE = 0, 1, 2
CONSTANT, RUNNING, DIVISOR, CURVATURE = 0, 1, 2, 3


@triton.jit
def _lerp(start, end, weight):
    # torch.lerp's two forms (the one used depends on |weight| < 0.5), fused as torch's kernels fuse them.
    diff = end - start
    if tl.abs(weight) < 0.5:
        return tl.fma(weight, diff, start)
    return tl.fma(-diff, 1.0 - weight, end)


@triton.jit
def _outer_apply_kernel(
    grad, glob, buf, live, sent, norm, curv, stats, numel,
    lr, mu, alpha, lam, keep, divisor, cap,
    MOMENTUM: tl.constexpr, FIRST: tl.constexpr, MERGE: tl.constexpr, NORMALISE: tl.constexpr,
    CAPPED: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0) * TILE + tl.arange(0, TILE)
    inside = i < numel
    gr = tl.load(grad + i, mask=inside, other=0.0)
    g = tl.load(glob + i, mask=inside, other=0.0)
    # torch.optim.SGD's arithmetic: buf <- mu buf + grad (buf <- grad at the first step); Nesterov
    # steps along grad + mu buf; param <- param - lr step.
    if MOMENTUM == 0:
        step = gr
    else:
        b = gr if FIRST else tl.load(buf + i, mask=inside, other=0.0) * mu + gr
        tl.store(buf + i, b, mask=inside)
        step = tl.fma(mu, b, gr) if MOMENTUM == 2 else b
    g = tl.fma(-lr, step, g)
    tl.store(glob + i, g, mask=inside)
    if MERGE == 0:
        tl.store(live + i, g.to(live.dtype.element_ty), mask=inside)
    elif MERGE == 1:
        mine = tl.load(live + i, mask=inside, other=0.0).to(tl.float32)
        tl.store(live + i, _lerp(g, mine, alpha).to(live.dtype.element_ty), mask=inside)
    else:
        mine = tl.load(live + i, mask=inside, other=0.0).to(tl.float32)
        s = tl.load(sent + i, mask=inside, other=0.0)
        delta = mine - s
        square = delta * delta
        w = square * lam
        if NORMALISE == 1:
            v = _lerp(tl.load(norm + i, mask=inside, other=0.0), square, keep)
            tl.store(norm + i, v, mask=inside)
            w = tl.maximum(tl.math.div_rn(w, tl.maximum(v, 1.1754943508222875e-38)), 0.0)
        elif NORMALISE == 2:
            w = tl.math.div_rn(w, divisor)
        elif NORMALISE == 3:
            w = tl.load(curv + i, mask=inside, other=0.0) * lam
        at_cap = tl.zeros_like(w)
        if CAPPED:
            at_cap = (w >= cap).to(tl.float32)
            w = tl.minimum(w, cap)
        theta = (g + delta) - w * (g - s)
        tl.store(live + i, _lerp(theta, mine, alpha).to(live.dtype.element_ty), mask=inside)
        tl.store(stats + 2 * tl.program_id(0), tl.sum(tl.where(inside, w, 0.0), axis=0))
        tl.store(stats + 2 * tl.program_id(0) + 1, tl.sum(tl.where(inside, at_cap, 0.0), axis=0))


def outer_apply(
    grad: torch.Tensor,
    global_: torch.Tensor,
    momentum: torch.Tensor | None,
    live: torch.Tensor,
    *,
    lr: float,
    mu: float,
    nesterov: bool,
    first: bool,
    merge: str,
    alpha: float = 0.0,
    sent: torch.Tensor | None = None,
    dc_lambda: float = 0.0,
    normaliser: torch.Tensor | None = None,
    beta: float = 0.0,
    divisor: float | None = None,
    curvature: torch.Tensor | None = None,
    cap: float | None = None,
) -> torch.Tensor:
    """One pass: the outer step of global_ (and its momentum), then the merge into live ("replace",
    "lerp" or "compensate", with the running normaliser's update, a per-tensor divisor, or w from
    the per-element `curvature`).
    Returns [sum of w, elements at the cap], on the device (zeros unless compensating)."""
    numel = global_.numel()
    programs = triton.cdiv(numel, TILE)
    stats = torch.zeros(programs, 2, dtype=torch.float32, device=global_.device)
    kind = NO_MOMENTUM if momentum is None else NESTEROV if nesterov else HEAVY_BALL
    normalise = (
        RUNNING if normaliser is not None
        else DIVISOR if divisor is not None
        else CURVATURE if curvature is not None
        else CONSTANT
    )  # fmt: skip
    _outer_apply_kernel[(programs,)](
        grad, global_, momentum if momentum is not None else global_, live,
        sent if sent is not None else global_, normaliser if normaliser is not None else global_,
        curvature if curvature is not None else global_, stats, numel,
        lr, mu, alpha, dc_lambda, 1.0 - beta, divisor if divisor is not None else 1.0, cap if cap is not None else 0.0,
        MOMENTUM=kind, FIRST=first, MERGE={"replace": REPLACE, "lerp": LERP, "compensate": COMPENSATE}[merge],
        NORMALISE=normalise, CAPPED=cap is not None, TILE=TILE, **_LAUNCH,
    )  # fmt: skip
    return stats.sum(dim=0)
