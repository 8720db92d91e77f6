"""Virtual clients: who takes part in a round, who hosts them, what their devices and links are,
and when their updates reach the server. Plain numbers, no processes; every rank computes the same."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from cocodc.comm.wan import AccessLinks
from cocodc.devices import DeviceProfiles


def sample_clients(clients: int, per_round: int, seed: int, server_round: int, stream: int | None = None) -> list[int]:
    """The clients of round `server_round` (1-based): rounds take consecutive slices of a stream of
    seeded permutations of all clients, so over any stretch of rounds every client is sampled as
    often as any other, give or take one. A slice that straddles two permutations would draw a
    client twice: the next permutation puts the clients of that slice's first part last.
    `stream`: an independent stream of draws (a group's, numbering its own members)."""
    start = (server_round - 1) * per_round
    key = [seed, 0xC11E] if stream is None else [seed, 0xC11E, stream]
    order = _epoch(clients, per_round, key, start // clients)
    offset = start % clients
    if offset + per_round <= clients:
        return order[offset : offset + per_round]
    following = _epoch(clients, per_round, key, start // clients + 1)
    return order[offset:] + following[: offset + per_round - clients]


def _epoch(clients: int, per_round: int, key: list[int], epoch: int) -> list[int]:
    order: list[int] = []
    for e in range(epoch + 1):
        drawn = np.random.default_rng([*key, e]).permutation(clients).tolist()
        tail = order[len(order) - (e * clients) % per_round :] if e and (e * clients) % per_round else []
        # The round that straddles epochs e-1 and e began with `tail`: those go to the back.
        order = [c for c in drawn if c not in tail] + [c for c in drawn if c in tail]
    return order


def executor_of(position: int, executors: int) -> int:
    """The executor (1-based rank) that trains the round's `position`-th sampled client."""
    return 1 + position % executors


@dataclass
class Arrival:
    client: int
    trained_at: float  # modelled seconds from the round's start: download and local steps done
    arrived_at: float  # the update is in at the server


def round_arrivals(
    profiles: DeviceProfiles,
    sampled: Sequence[int],
    *,
    download_bytes: int | Sequence[int],
    upload_bytes: Sequence[int],
    local_steps: int,
    step_s: float,
    server_bandwidth_mbps: float,
) -> list[Arrival]:
    """When each sampled client's update reaches the server, on the modelled links: the server
    sends the global model to the clients in sampling order (queued at its uplink), each trains
    `local_steps` steps at its speed, and the uploads queue at the server's downlink in the order
    they are handed over. Node 0 is the server, node 1 + i the i-th sampled client.
    `download_bytes`: the same for every client, or each client's."""
    if isinstance(download_bytes, int | float):
        download_bytes = [download_bytes] * len(sampled)
    links = AccessLinks.build(
        [0.0] + [profiles.latency_ms[c] for c in sampled],
        [server_bandwidth_mbps] + [profiles.bandwidth_mbps[c] for c in sampled],
    )
    trained = [
        links.transfer(0, 1 + i, download_bytes[i], 0.0) + local_steps * step_s / profiles.speed[c]
        for i, c in enumerate(sampled)
    ]
    arrived = [0.0] * len(sampled)
    for i in sorted(range(len(sampled)), key=lambda i: (trained[i], i)):
        arrived[i] = links.transfer(1 + i, 0, upload_bytes[i], trained[i])
    return [Arrival(c, t, a) for c, t, a in zip(sampled, trained, arrived, strict=True)]


def server_wait_s(arrivals: Sequence[Arrival], failed: Collection[int], deadline_s: float) -> float:
    """How long the server waits in a round: for every update (a non-finite one is known as such
    only once received), to the deadline at most (`deadline_s` 0: none). A client that failed
    sends nothing the server could see: it waits for it to the deadline, or, with none, until the
    update was due (its arrival as if it had been sent)."""
    last = max((a.arrived_at for a in arrivals), default=0.0)
    if not deadline_s:
        return last
    return deadline_s if failed else min(last, deadline_s)
