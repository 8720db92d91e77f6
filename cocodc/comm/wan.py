"""The link model: when a transfer over the WAN arrives, so that a handle completes no earlier.

Links are one-way and per pair of group ranks: `latency_s[i][j]` and `bandwidth_Bps[i][j]` from
rank i to rank j (0 bandwidth: unlimited). Transfers that share a directed link queue FIFO at its
rate: a message of B bytes handed to link (i, j) at time t starts serialising at
max(t, busy_until(i, j)), occupies the link for B / bandwidth, and arrives latency (+ jitter)
after it has been serialised. Jitter adds a uniform draw from [-jitter, +jitter] to the latency of
every message (never below zero).

Collectives are timed as ring algorithms over ranks 0 -> 1 -> ... -> n-1 -> 0: each ring step
moves one chunk over every ring link at once (each queued behind what those links already carry)
and ends when the last chunk has arrived. An all-to-all sends one chunk over every link at once.
A broadcast is a pipeline along the ring from its source: it starts when every hop is free, takes
every hop's latency and the payload once at the bottleneck bandwidth.

Every method takes the model's clock `now` (seconds, any origin: the engine passes
`time.perf_counter()`), reserves the links it uses and returns when the last byte has arrived.
Each rank holds its own model and reserves in it the links of what it takes part in: every link
a collective uses (every member runs the same collectives, so their queues agree; with jitter
each rank draws its own, so their arrival times differ by it), and a message's one link, at the
sender when it sends and at the receiver from the send's time on.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cocodc.config import WanConfig

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
    # The physical link each pair of ranks uses: ranks of two regions share their regions' link.
    region_of: list[int] | None = None
    busy_until: dict[tuple[int, int], float] = field(default_factory=dict)

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

    @staticmethod
    def slowest(wan: WanConfig, regions: int) -> tuple[float, float] | None:
        """(latency in s, bandwidth in bytes/s) of the config's slowest link between `regions`
        regions, however it is emulated (a transfer's deadline allows for it); None for an ideal WAN."""
        if not wan.enabled:
            return None
        latency = [v for row in _matrix(wan.latency_ms, regions, "'wan.latency_ms'") for v in row]
        bandwidth = [v for row in _matrix(wan.bandwidth_mbps, regions, "'wan.bandwidth_mbps'") for v in row if v > 0]
        return max(latency) / 1e3 + wan.jitter_ms / 1e3, min(bandwidth, default=0.0) * 1e6 / 8

    @classmethod
    def of_config(cls, wan: WanConfig, regions: int, seed: int) -> LinkModel | None:
        """The config's link between `regions` regions, where the comm engine models it (none when
        the WAN is ideal or netem delays the real packets)."""
        if not (wan.enabled and wan.emulation == "model"):
            return None
        return cls.build(regions, wan.latency_ms, wan.bandwidth_mbps, wan.jitter_ms, seed=seed)

    def for_ranks(self, region_of: Sequence[int]) -> LinkModel:
        """The same links seen by a group whose rank r lives in region `region_of[r]`; ranks of
        one region talk over an unmodelled (instant) local link. Transfers between two regions
        queue on their one link, whichever ranks send them."""

        def expand(m: Matrix) -> Matrix:
            return [[m[a][b] if a != b else 0.0 for b in region_of] for a in region_of]

        regions = [self.region_of[r] if self.region_of else r for r in region_of]
        return LinkModel(
            expand(self.latency_s), expand(self.bandwidth_Bps), self.jitter_s, self.rng, regions, self.busy_until
        )

    @property
    def size(self) -> int:
        return len(self.latency_s)

    def _latency(self, src: int, dst: int) -> float:
        latency = self.latency_s[src][dst]
        if self.jitter_s and latency > 0:  # a local (unmodelled) link stays instant
            latency = max(0.0, latency + self.rng.uniform(-self.jitter_s, self.jitter_s))
        return latency

    def _link(self, src: int, dst: int) -> tuple[int, int]:
        return (self.region_of[src], self.region_of[dst]) if self.region_of else (src, dst)

    def _free_at(self, src: int, dst: int, now: float) -> float:
        if self.bandwidth_Bps[src][dst] <= 0:
            return now
        return max(now, self.busy_until.get(self._link(src, dst), now))

    def _serialise(self, src: int, dst: int, nbytes: float, now: float) -> float:
        """Queue `nbytes` on link src -> dst at `now`; when its last byte has left."""
        bandwidth = self.bandwidth_Bps[src][dst]
        if bandwidth <= 0:
            return now
        done = self._free_at(src, dst, now) + nbytes / bandwidth
        self.busy_until[self._link(src, dst)] = done
        return done

    def transfer(self, src: int, dst: int, nbytes: float, now: float) -> float:
        """One message from `src` to `dst` handed to the link at `now`: when it has arrived."""
        if src == dst:
            return now
        return self._serialise(src, dst, nbytes, now) + self._latency(src, dst)

    def ring(self, steps: int, chunk_bytes: float, now: float) -> float:
        """`steps` ring steps, each moving `chunk_bytes` over every link i -> i+1 at once."""
        n = self.size
        for _ in range(steps):
            now = max(self.transfer(i, (i + 1) % n, chunk_bytes, now) for i in range(n))
        return now

    def all_reduce(self, nbytes: float, now: float) -> float:
        n = self.size
        return self.ring(2 * (n - 1), nbytes / n, now) if n > 1 else now

    def all_gather(self, nbytes: float, now: float) -> float:
        """Every rank's `nbytes` to every other rank."""
        return self.ring(self.size - 1, nbytes, now)

    def all_to_all(self, nbytes: float, now: float) -> float:
        """A chunk of `nbytes` from every rank to every other rank, over every link at once."""
        n = self.size
        return max([self.transfer(i, j, nbytes, now) for i in range(n) for j in range(n) if i != j], default=now)

    def broadcast(self, nbytes: float, src: int, now: float) -> float:
        n = self.size
        hops = [((src + h) % n, (src + h + 1) % n) for h in range(n - 1)]
        if not hops:
            return now
        start = max(self._free_at(a, b, now) for a, b in hops)
        serialised = max(self._serialise(a, b, nbytes, start) for a, b in hops)
        return serialised + sum(self._latency(a, b) for a, b in hops)


@dataclass
class AccessLinks:
    """Nodes on a star: each has its own access link (one-way latency, a bandwidth each way) to a
    core without contention. A message from a to b queues FIFO at a's uplink and, at the same
    time, at b's downlink, each serialising it at its own rate; it arrives when the later of the
    two is done, plus both latencies. So a server's link is shared by every client that talks to
    it at once, and a client's own link still limits it. 0 bandwidth: unlimited (never busy)."""

    latency_s: list[float]
    bandwidth_Bps: list[float]
    up_busy: dict[int, float] = field(default_factory=dict)
    down_busy: dict[int, float] = field(default_factory=dict)

    @classmethod
    def build(cls, latency_ms: Sequence[float], bandwidth_mbps: Sequence[float]) -> AccessLinks:
        return cls([v / 1e3 for v in latency_ms], [v * 1e6 / 8 for v in bandwidth_mbps])

    def _queue(self, busy: dict[int, float], node: int, nbytes: float, now: float) -> float:
        rate = self.bandwidth_Bps[node]
        if rate <= 0:
            return now
        busy[node] = max(now, busy.get(node, now)) + nbytes / rate
        return busy[node]

    def transfer(self, src: int, dst: int, nbytes: float, now: float) -> float:
        """A message of `nbytes` handed over at `now`: when it has arrived at `dst`."""
        sent = self._queue(self.up_busy, src, nbytes, now)
        received = self._queue(self.down_busy, dst, nbytes, now)
        return max(sent, received) + self.latency_s[src] + self.latency_s[dst]
