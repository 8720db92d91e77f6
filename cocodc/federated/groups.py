"""Hierarchical federated learning (HierFedLoRA): clients partitioned into groups whose pooled data
is close to the global mix, each group aggregated at its own edge a number of times per global
round and fine-tuning only its top blocks; the cloud averages each parameter over the groups that
tuned it. Plain numbers, no processes: every rank computes the same."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cocodc.comm.wan import AccessLinks
from cocodc.devices import DeviceProfiles


def total_variation(counts: np.ndarray, reference: np.ndarray) -> float:
    """Total-variation distance between two histograms (counts, each normalised to 1)."""
    return 0.5 * float(np.abs(counts / counts.sum() - reference / reference.sum()).sum())


def partition_clients(histograms: np.ndarray, groups: int, by: str, seed: int) -> list[list[int]]:
    """`groups` groups of the clients (rows of `histograms`: each client's sequences per domain),
    sizes within one of each other. `mix`: greedy, the clients with the most sequences first (ties
    to the lower index), each to the group, among those with the fewest members, whose pooled
    histogram would then be closest to the global mix (total variation; ties to the lower group).
    `random`: a seeded permutation dealt round-robin (the ablation)."""
    clients = len(histograms)
    if by == "random":
        order = np.random.default_rng([seed, 0x6E0]).permutation(clients).tolist()
        return [sorted(order[g::groups]) for g in range(groups)]
    overall = histograms.sum(axis=0)
    pooled = np.zeros((groups, histograms.shape[1]))
    members: list[list[int]] = [[] for _ in range(groups)]
    for client in sorted(range(clients), key=lambda c: (-histograms[c].sum(), c)):
        fewest = min(len(m) for m in members)
        open_groups = [g for g in range(groups) if len(members[g]) == fewest]
        best = min(open_groups, key=lambda g: (total_variation(pooled[g] + histograms[client], overall), g))
        pooled[best] += histograms[client]
        members[best].append(client)
    return [sorted(m) for m in members]


def step_cost(depth: int, layers: int) -> float:
    """A client step's compute at fine-tuning depth `depth` of `layers`, relative to a full step:
    the forward through every block (a third of a step), the backward through the top `depth`."""
    return (1 + 2 * depth / layers) / 3


@dataclass
class Group:
    index: int
    members: list[int]
    divergence: float  # total variation of the group's pooled data from the global mix
    depth: int  # the top blocks it fine-tunes
    rounds: int  # edge aggregations per global round
    edge_round_s: float  # the modelled seconds of one of its edge rounds at its depth (the rule's estimate)


def edge_round_s(
    profiles: DeviceProfiles,
    members: Sequence[int],
    *,
    depth: int,
    layers: int,
    local_steps: int,
    step_s: float,
    update_bytes: float,
) -> float:
    """The rule's estimate of one edge round: the median member's download of the group model, its
    local steps at `depth` and its upload, over its own link (the edge's link and the queue aside)."""
    times = []
    for c in members:
        transfer = update_bytes * 8 / (profiles.bandwidth_mbps[c] * 1e6) if profiles.bandwidth_mbps[c] > 0 else 0.0
        latency = profiles.latency_ms[c] / 1e3
        compute = local_steps * step_s * step_cost(depth, layers) / profiles.speed[c]
        times.append(2 * (transfer + latency) + compute)
    return float(np.median(times))


def plan_groups(
    partition: list[list[int]],
    divergence: Sequence[float],
    profiles: DeviceProfiles,
    *,
    layers: int,
    bytes_at_depth: Sequence[float],
    local_steps: int,
    step_s: float,
    rounds_max: int,
    fixed_rounds: int = 0,
    fixed_depth: int = 0,
) -> list[Group]:
    """Each group's depth and edge rounds (fixed by config where given, else our rule).

    Depth: the deepest at which the group's edge round is no slower than the fastest group's at
    full depth (at least 1 block): slow groups tune fewer blocks, so every group keeps pace. Rounds:
    `rounds_max` for the fastest group, fewer in proportion to a group's edge-round time (every
    group then takes about as long per global round), scaled by 1 - its divergence (a group whose
    data is further from the global mix drifts further between global rounds), at least 1.
    `bytes_at_depth[d]`: the bytes of a group model's update at depth d (index 0 unused)."""

    def time_at(g: int, depth: int) -> float:
        return edge_round_s(
            profiles,
            partition[g],
            depth=depth,
            layers=layers,
            local_steps=local_steps,
            step_s=step_s,
            update_bytes=bytes_at_depth[depth],
        )

    count = len(partition)
    if fixed_depth:
        depths = [fixed_depth] * count
    else:
        pace = min(time_at(g, layers) for g in range(count))
        depths = [max([d for d in range(1, layers + 1) if time_at(g, d) <= pace], default=1) for g in range(count)]
    times = [time_at(g, depths[g]) for g in range(count)]
    if fixed_rounds:
        rounds = [fixed_rounds] * count
    else:
        fastest = min(times)
        rounds = [
            min(rounds_max, max(1, round(rounds_max * fastest / times[g] * (1 - divergence[g])))) for g in range(count)
        ]
    return [Group(g, partition[g], divergence[g], depths[g], rounds[g], times[g]) for g in range(count)]


def tuned_at_depth(block_of: Sequence[int | None], embedding: Sequence[bool], depth: int, layers: int) -> list[bool]:
    """Which trainable parameters a group of `depth` tunes: those of the top `depth` blocks
    (`block_of`: each parameter's block, None outside the blocks), the others outside the blocks
    (taken to lie above them: the final norm, the head) always, and the input embedding
    (`embedding`: an untied one) only at full depth."""
    return [
        (block >= layers - depth) if block is not None else (depth >= layers or not is_embedding)
        for block, is_embedding in zip(block_of, embedding, strict=True)
    ]


def layerwise_mean(
    deltas: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """The cloud's mean of the groups' updates, each element over the groups that tuned it,
    weighted by `weights` (their examples); 0 where no group tuned it. `deltas[g]` is a whole
    vector (0 off its group's mask)."""
    total = torch.zeros_like(deltas[0])
    weight = torch.zeros_like(deltas[0])
    for delta, mask, w in zip(deltas, masks, weights, strict=True):
        total += w * delta * mask
        weight += w * mask
    return torch.where(weight > 0, total / weight.clamp_min(math.ulp(1.0)), torch.zeros_like(total))


def cloud_arrivals(
    group_seconds: Sequence[float],
    *,
    download_bytes: Sequence[int],
    upload_bytes: Sequence[int],
    edge_link_mbps: float,
    edge_latency_ms: float,
    cloud_link_mbps: float,
) -> list[float]:
    """When each group's update is in at the cloud: the cloud sends each edge the global model
    (queued at the cloud's link, groups in order), the group runs its edge rounds
    (`group_seconds`), and its edge uploads (queued at the cloud's link in the order they are
    handed over). Each edge's own link (`edge_link_mbps`, `edge_latency_ms` one way) to the cloud
    (`cloud_link_mbps`). Node 0 is the cloud, node 1 + g group g's edge."""
    count = len(group_seconds)
    links = AccessLinks.build([0.0] + [edge_latency_ms] * count, [cloud_link_mbps] + [edge_link_mbps] * count)
    ready = [links.transfer(0, 1 + g, download_bytes[g], 0.0) + group_seconds[g] for g in range(count)]
    arrived = [0.0] * count
    for g in sorted(range(count), key=lambda g: (ready[g], g)):
        arrived[g] = links.transfer(1 + g, 0, upload_bytes[g], ready[g])
    return arrived
