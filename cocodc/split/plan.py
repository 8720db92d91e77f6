"""Split learning without processes: which parameters live on the workers, how large each
worker's batch is, and when its tensors arrive on the modelled links."""

from __future__ import annotations

from collections.abc import Sequence

from cocodc.comm.wan import AccessLinks
from cocodc.devices import DeviceProfiles


def on_worker(name: str, cut: int, shape: str) -> bool:
    """Whether parameter `name` of the Transformer lives on the workers: the embedding and the
    first `cut` blocks; with the u shape also the final norm and the head (the labels stay)."""
    if name.startswith("embed."):
        return True
    if name.startswith("blocks."):
        return int(name.split(".")[1]) < cut
    return shape == "u"


def regulate_batches(total: int, per_sequence_s: Sequence[float]) -> list[int]:
    """Batch sizes summing to `total`, proportional to each worker's speed (1 / its seconds per
    sequence, compute and link), at least 1 each, so every worker's activations arrive together.
    Largest remainders go first; ties to the lower index."""
    count = len(per_sequence_s)
    if total < count:
        raise ValueError(f"a merged batch of {total} cannot give {count} workers a sequence each")
    rates = [1.0 / s for s in per_sequence_s]
    shares = [(total - count) * r / sum(rates) for r in rates]
    sizes = [1 + int(share) for share in shares]
    by_remainder = sorted(range(count), key=lambda w: (-(shares[w] - int(shares[w])), w))
    for w in by_remainder[: total - sum(sizes)]:
        sizes[w] += 1
    return sizes


def per_sequence_s(profiles: DeviceProfiles, batch_size: int, step_s: float, bytes_per_sequence: float) -> list[float]:
    """Each worker's modelled seconds per sequence: its part's compute at its speed (`step_s` per
    `batch_size` sequences on the median device) plus its activations over its link."""
    return [
        step_s / batch_size / speed + (bytes_per_sequence * 8 / (mbps * 1e6) if mbps > 0 else 0.0)
        for speed, mbps in zip(profiles.speed, profiles.bandwidth_mbps, strict=True)
    ]


def activation_arrivals(
    profiles: DeviceProfiles,
    sizes: Sequence[int],
    *,
    batch_size: int,
    step_s: float,
    sent_bytes: Sequence[int],
    server_bandwidth_mbps: float,
) -> tuple[list[float], AccessLinks]:
    """When each worker's activations are in at the server (node 0; worker w is node 1 + w):
    `sizes[w]` sequences through its part at its speed, then `sent_bytes[w]` over its link, queued
    at the server's downlink. Returns the links too, for the replies that follow."""
    links = AccessLinks.build([0.0, *profiles.latency_ms], [server_bandwidth_mbps, *profiles.bandwidth_mbps])
    computed = [size / batch_size * step_s / speed for size, speed in zip(sizes, profiles.speed, strict=True)]
    arrivals = [0.0] * len(sizes)
    for w in sorted(range(len(sizes)), key=lambda w: (computed[w], w)):
        arrivals[w] = links.transfer(1 + w, 0, sent_bytes[w], computed[w])
    return arrivals, links


def gradients_back(
    arrivals: Sequence[float],
    links: AccessLinks,
    timeline: Sequence[tuple[Sequence[int], float, float]],
    legs: dict[str, Sequence[int]],
    *,
    u_shape: bool,
) -> list[float]:
    """When each worker has its gradient back. The server takes the groups of `timeline` (members,
    forward seconds, the rest of its compute) in order, each once its members' activations are in
    and the server is free; in the u shape its output goes to the members (`legs["hidden"]` bytes)
    and their replies (`legs["reply"]`) come back between its forward and the rest (the workers'
    heads take no modelled time); then each member's gradient (`legs["gradient"]`) goes back. A
    worker in no group (left out) is done when its activations are in."""
    done = list(arrivals)
    server_free = 0.0
    for members, forward_s, rest_s in timeline:
        clock = max(server_free, *(arrivals[w] for w in members)) + forward_s
        if u_shape:
            clock = max(
                links.transfer(1 + w, 0, legs["reply"][w], links.transfer(0, 1 + w, legs["hidden"][w], clock))
                for w in members
            )
        server_free = clock + rest_s
        for w in members:
            done[w] = links.transfer(0, 1 + w, legs["gradient"][w], server_free)
    return done
