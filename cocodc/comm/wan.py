"""The link model: how long a transfer over the WAN takes, so that a handle completes no earlier.

Links are one-way and per pair of group ranks: `latency_s[i][j]` and `bandwidth_Bps[i][j]` from
rank i to rank j (0 bandwidth: unlimited). Collectives are timed as ring algorithms over ranks
0 -> 1 -> ... -> n-1 -> 0: each ring step moves one chunk over every ring link at once and lasts as
long as the slowest link takes; jitter adds a uniform draw from [-jitter, +jitter] to the latency
of every step (never below zero).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

Matrix = list[list[float]]


def _matrix(value: float | Sequence[Sequence[float]], size: int, what: str) -> Matrix:
    if isinstance(value, int | float):
        return [[0.0 if i == j else float(value) for j in range(size)] for i in range(size)]
    rows = [[float(v) for v in row] for row in value]
    if len(rows) != size or any(len(row) != size for row in rows):
        raise ValueError(f"{what} must be a number or a {size} x {size} matrix, one row per region")
    return rows


@dataclass
class LinkModel:
    latency_s: Matrix
    bandwidth_Bps: Matrix
    jitter_s: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    @classmethod
    def build(
        cls,
        regions: int,
        latency_ms: float | Sequence[Sequence[float]],
        bandwidth_mbps: float | Sequence[Sequence[float]],
        jitter_ms: float = 0.0,
        *,
        seed: int = 0,
    ) -> LinkModel:
        """Links between `regions` regions from the config's units (ms, Mbit/s)."""
        latency = _matrix(latency_ms, regions, "'wan.latency_ms'")
        bandwidth = _matrix(bandwidth_mbps, regions, "'wan.bandwidth_mbps'")
        return cls(
            [[v / 1e3 for v in row] for row in latency],
            [[v * 1e6 / 8 for v in row] for row in bandwidth],
            jitter_ms / 1e3,
            random.Random(seed),
        )

    def for_ranks(self, region_of: Sequence[int]) -> LinkModel:
        """The same links seen by a group whose rank r lives in region `region_of[r]`; ranks of
        one region talk over an unmodelled (instant) local link."""

        def expand(m: Matrix) -> Matrix:
            return [[m[a][b] if a != b else 0.0 for b in region_of] for a in region_of]

        return LinkModel(expand(self.latency_s), expand(self.bandwidth_Bps), self.jitter_s, self.rng)

    @property
    def size(self) -> int:
        return len(self.latency_s)

    def _latency(self, src: int, dst: int) -> float:
        latency = self.latency_s[src][dst]
        if self.jitter_s:
            latency = max(0.0, latency + self.rng.uniform(-self.jitter_s, self.jitter_s))
        return latency

    def _serialise(self, src: int, dst: int, nbytes: float) -> float:
        bandwidth = self.bandwidth_Bps[src][dst]
        return nbytes / bandwidth if bandwidth > 0 else 0.0

    def transfer_s(self, src: int, dst: int, nbytes: float) -> float:
        """One message from `src` to `dst`: latency (with jitter) plus serialisation."""
        return 0.0 if src == dst else self._latency(src, dst) + self._serialise(src, dst, nbytes)

    def ring_s(self, steps: int, chunk_bytes: float) -> float:
        """`steps` ring steps, each moving `chunk_bytes` over every link i -> i+1 at once."""
        n = self.size
        return sum(max(self.transfer_s(i, (i + 1) % n, chunk_bytes) for i in range(n)) for _ in range(steps))

    def all_reduce_s(self, nbytes: int) -> float:
        n = self.size
        return self.ring_s(2 * (n - 1), nbytes / n) if n > 1 else 0.0

    def all_gather_s(self, nbytes: int) -> float:
        return self.ring_s(self.size - 1, nbytes)

    def broadcast_s(self, nbytes: int, src: int) -> float:
        """A pipeline along the ring from `src`: every hop's latency, the payload once at the
        bottleneck bandwidth."""
        n = self.size
        hops = [((src + h) % n, (src + h + 1) % n) for h in range(n - 1)]
        if not hops:
            return 0.0
        return sum(self._latency(a, b) for a, b in hops) + max(self._serialise(a, b, nbytes) for a, b in hops)
