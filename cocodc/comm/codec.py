"""Payload codecs: how a flat fp32 tensor is put on the wire, and read back as fp32.

`fp32` and `bf16` cast. `fp8` (e4m3), `int8` and `e3m0` (4 bits: a sign and a 3-bit exponent, no
mantissa) scale each block of 128 values by the block's largest magnitude, sent as one fp32 per
block. The encoded payload is one uint8 tensor, [block scales | codes], so its size is the byte
count on the wire. Decoding always returns fp32, so means are accumulated in fp32.
"""

from __future__ import annotations

import math

import torch

BLOCK = 128


class Codec:
    name: str
    bits: int  # per value, before the block scales
    scaled: bool  # one fp32 scale per BLOCK values

    def encoded_bytes(self, numel: int) -> int:
        scales = 4 * math.ceil(numel / BLOCK) if self.scaled else 0
        return scales + math.ceil(numel * self.bits / 8)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """A flat fp32 tensor -> a flat uint8 payload of `encoded_bytes(values.numel())` bytes."""
        raise NotImplementedError

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        """The payload of `numel` values -> a flat fp32 tensor."""
        raise NotImplementedError


class CastCodec(Codec):
    scaled = False

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype
        self.bits = torch.finfo(dtype).bits

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(self.dtype).view(torch.uint8)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return payload.view(self.dtype).float()


class BlockCodec(Codec):
    """Codes scaled per block: value ~= decode_code(code) * scale, scale = block absmax / `top`."""

    scaled = True
    top: float  # the largest code magnitude

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        numel = values.numel()
        blocks = torch.nn.functional.pad(values.float(), (0, -numel % BLOCK)).view(-1, BLOCK)
        scales = blocks.abs().amax(dim=1, keepdim=True) / self.top
        # An all-zero block gets scale 1; a block holding NaN or inf keeps it, so it decodes non-finite.
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)
        codes = self.to_codes(blocks / scales).reshape(-1)[: self.code_count(numel)]
        return torch.cat([scales.view(-1).view(torch.uint8), codes])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        n_blocks = math.ceil(numel / BLOCK)
        scales = payload[: 4 * n_blocks].view(torch.float32).view(-1, 1)
        padding = self.code_count(n_blocks * BLOCK) - self.code_count(numel)
        codes = torch.nn.functional.pad(payload[4 * n_blocks :], (0, padding)).view(n_blocks, -1)
        return (self.from_codes(codes) * scales).view(-1)[:numel]

    def code_count(self, numel: int) -> int:
        return math.ceil(numel * self.bits / 8)

    def to_codes(self, scaled: torch.Tensor) -> torch.Tensor:
        """Blocks of values in [-top, top] -> uint8 codes, `code_count(BLOCK)` per block."""
        raise NotImplementedError

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Codec(BlockCodec):
    name, bits, top = "int8", 8, 127.0

    def to_codes(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled.round().clamp(-127, 127).to(torch.int8).view(torch.uint8)

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.view(torch.int8).float()


class Fp8Codec(BlockCodec):
    name, bits = "fp8", 8
    top = torch.finfo(torch.float8_e4m3fn).max

    def to_codes(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled.to(torch.float8_e4m3fn).view(torch.uint8)

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.view(torch.float8_e4m3fn).float()


class E3M0Codec(BlockCodec):
    """4 bits per value: bit 3 the sign, bits 0-2 a magnitude code k: 0 is zero, k in 1..7 is
    2^(k - 7) of the block's absmax. Magnitudes round to the nearest of these (ties up, zero below
    2^-7); two codes a byte, the even-indexed value in the low nibble."""

    name, bits, top = "e3m0", 4, 1.0

    def to_codes(self, scaled: torch.Tensor) -> torch.Tensor:
        magnitude = scaled.abs()
        # k counts the midpoints between neighbouring powers of two, 0.75 * 2^j, at or below the
        # magnitude: comparisons, so exact (a log2 would round near the midpoints).
        k = torch.ones_like(magnitude, dtype=torch.uint8)
        for j in range(-5, 1):
            k += magnitude >= 0.75 * 2.0**j
        k = torch.where(magnitude >= 2.0**-7, k, 0)
        nibbles = k | (scaled < 0).to(torch.uint8) << 3
        return nibbles[:, 0::2] | nibbles[:, 1::2] << 4

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        nibbles = torch.stack([codes & 0x0F, codes >> 4], dim=-1).view(codes.shape[0], -1)
        k = (nibbles & 7).float()
        magnitude = torch.where(k > 0, torch.exp2(k - 7), torch.zeros_like(k))
        return torch.where(nibbles >= 8, -magnitude, magnitude)


CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        CastCodec("fp32", torch.float32),
        CastCodec("bf16", torch.bfloat16),
        Fp8Codec(),
        Int8Codec(),
        E3M0Codec(),
    )
}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}") from None
