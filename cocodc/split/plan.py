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


def regulate_batches(total: int, per_sequence_s: Sequence[float], capacity: Sequence[int]) -> list[int]:
    """Batch sizes summing to `total`, proportional to each worker's speed (1 / its seconds per
    sequence, compute and link), at least 1 each and at most its shard's `capacity` sequences, so
    every worker's activations arrive together. A worker at its capacity leaves the rest to the
    others, shared as before. Largest remainders go first; ties to the lower index."""
    count = len(per_sequence_s)
    if total < count:
        raise ValueError(f"a merged batch of {total} cannot give {count} workers a sequence each")
    if total > sum(capacity):
        raise ValueError(f"a merged batch of {total} sequences is more than the workers' shards hold ({sum(capacity)})")
    sizes = [0] * count
    open_workers = list(range(count))
    while True:
        left = total - sum(sizes[w] for w in range(count) if w not in open_workers)
        rates = {w: 1.0 / per_sequence_s[w] for w in open_workers}
        shares = {w: (left - len(open_workers)) * rates[w] / sum(rates.values()) for w in open_workers}
        for w in open_workers:
            sizes[w] = 1 + int(shares[w])
        by_remainder = sorted(open_workers, key=lambda w: (-(shares[w] - int(shares[w])), w))
        for w in by_remainder[: left - sum(sizes[w] for w in open_workers)]:
            sizes[w] += 1
        full = [w for w in open_workers if sizes[w] >= capacity[w]]
        if not [w for w in full if sizes[w] > capacity[w]]:
            return sizes
        for w in full:
            sizes[w] = capacity[w]
        open_workers = [w for w in open_workers if w not in full]


def serving_order(arrivals: Sequence[float]) -> list[int]:
    """The order in which SplitFed v2's server takes the workers: as their activations arrive,
    ties to the lower index."""
    return sorted(range(len(arrivals)), key=lambda w: (arrivals[w], w))


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


def part_sync(done: Sequence[float], links: AccessLinks, senders: Sequence[int], part_bytes: int) -> list[float]:
    """When each worker holds the synced workers' part (the gradient mean, or the parameters'
    every k steps), modelled through the server as FedAvg's exchange is: each of `senders` sends
    its part (`part_bytes`) once its step is done, queued at the server's downlink; once the last
    is in, the server sends the mean to every worker."""
    if not senders:
        return list(done)
    gathered = max(links.transfer(1 + w, 0, part_bytes, done[w]) for w in sorted(senders, key=lambda w: (done[w], w)))
    return [links.transfer(0, 1 + w, part_bytes, gathered) for w in range(len(done))]
