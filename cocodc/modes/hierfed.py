"""The hierarchical federated mode (HierFedLoRA, `federated.groups` > 0): groups of clients, each
aggregated at its edge, the groups' models averaged at the cloud parameter by parameter.

A global round: the cloud (rank 0) holds the global model; group g's edge is executor 1 + g % E.
The edge runs the group's `rounds` edge rounds. In each it samples its share of clients_per_round
among the group's members, trains each from the group model on the group's top `depth` blocks
(the rest frozen: the backward stops below them), times the round on the device tier (the
members' links, the edge's link shared) and averages the updates that count into the group model
(FedAvg, weighted by examples). It then sends the cloud the group's update (the part it tuned,
through the upload codec) and what became of each client; the cloud times the edges' uploads on
the cloud tier, averages each parameter over the groups that tuned it (federated.groups.
layerwise_mean), steps the strategy and broadcasts the new global model.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from cocodc.comm.codec import get_codec
from cocodc.config import Config
from cocodc.data import ClientShards
from cocodc.federated.clients import round_arrivals, sample_clients, server_wait_s
from cocodc.federated.groups import (
    Group,
    cloud_arrivals,
    layerwise_mean,
    partition_clients,
    plan_groups,
    step_cost,
    total_variation,
    tuned_at_depth,
)
from cocodc.federated.strategies import weighted_mean
from cocodc.modes.federated import FAILED, OK, SERVER, FederatedMode, judge_updates
from cocodc.sync.fragments import find_blocks
from cocodc.topology import Topology
from cocodc.trainer import Trainer

HEADER = 96  # bytes of a message's header on the comm engine (CommEngine.send)
INFO = HEADER + 4 * 8  # a client's info message: examples, loss, status, eval loss (float64)
# What became of a client at its edge, in the table an edge sends the cloud.
STATUSES = ("accepted", "failed", "not_finite", "late")


class HierarchicalMode(FederatedMode):
    def __init__(self, config: Config, topology: Topology, model: nn.Module, shards: ClientShards):
        super().__init__(config, topology, model, shards)
        f = self.federation
        blocks = find_blocks(model, config.sync.blocks)
        self.layers = len(blocks)
        block_of = {id(p): index for index, block in enumerate(blocks) for p in block.parameters()}
        # An input embedding is tuned at full depth only; one tied to the head is the head too.
        heads = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
        embeddings = {
            id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters() if id(p) not in heads
        }
        self.tuned = {
            depth: tuned_at_depth(
                [block_of.get(id(p)) for p in self.params],
                [id(p) in embeddings for p in self.params],
                depth,
                self.layers,
            )
            for depth in range(1, self.layers + 1)
        }
        self.masks = {
            depth: torch.cat([torch.full((p.numel(),), trains) for p, trains in zip(self.params, tuned, strict=True)])
            for depth, tuned in self.tuned.items()
        }
        self.codec = get_codec(f.quantize)
        histograms = shards.domain_histograms()
        partition = partition_clients(histograms, f.groups, f.group_by, config.seed)
        overall = histograms.sum(axis=0)
        divergence = [total_variation(histograms[members].sum(axis=0), overall) for members in partition]
        self.groups: list[Group] = plan_groups(
            partition,
            divergence,
            self.profiles,
            layers=self.layers,
            bytes_at_depth=[0.0] + [float(self._upload_bytes(d)) for d in range(1, self.layers + 1)],
            local_steps=f.local_steps,
            step_s=config.devices.step_s,
            rounds_max=f.group_rounds_max,
            fixed_rounds=f.group_rounds,
            fixed_depth=f.group_depth,
        )
        self.totals.update(edge_bytes_up=0, edge_bytes_down=0)

    def _upload_bytes(self, depth: int) -> int:
        """A client's upload at `depth`: its info and its update's tuned part through the codec."""
        return INFO + HEADER + self.codec.encoded_bytes(int(self.masks[depth].sum()))

    def _edge_of(self, group: Group) -> int:
        return 1 + group.index % (self.topology.world_size - 1)

    def _share(self, group: Group) -> int:
        """The group's clients per edge round: its share of clients_per_round, by its size."""
        f = self.federation
        return max(1, round(f.clients_per_round * len(group.members) / f.clients))

    def _sampled(self, group: Group, server_round: int, edge_round: int) -> list[int]:
        """The clients of the group's `edge_round`-th edge round of `server_round`, drawn fairly
        among its members."""
        index = (server_round - 1) * group.rounds + edge_round
        drawn = sample_clients(len(group.members), self._share(group), self.config.seed, index, group.index + 1)
        return [group.members[i] for i in drawn]

    def _advance(self, sampled: list[int]) -> None:
        """The sampled clients' data positions moved past the batches they trained on."""
        for client in sampled:
            self.shards.batches_done[client] += self.federation.local_steps

    # ------------------------------------------------------------------ the global round

    def step(self, trainer: Trainer) -> tuple[float, float]:
        began, server_round = time.perf_counter(), trainer.step
        if self.is_server:
            loss, compute_s = self._serve_groups(server_round), 0.0
            for group in self.groups:  # the clients' data positions, as the edges moved them
                for edge_round in range(1, group.rounds + 1):
                    self._advance(self._sampled(group, server_round, edge_round))
        else:
            loss, compute_s = self._run_edges(trainer, server_round)
        self.wan.broadcast(self.global_model.vector, SERVER).wait()
        self.global_model.load_into_model()
        if self.is_server:
            self.records[-1]["measured_s"] = time.perf_counter() - began
        return loss, compute_s

    def _run_edges(self, trainer: Trainer, server_round: int) -> tuple[float, float]:
        """Every group this executor is the edge of: its edge rounds, then its update to the cloud.
        Every rank moves each sampled client's data position on alike."""
        sends, losses, compute_s = [], [], 0.0
        for group in self.groups:
            mine = self._edge_of(group) == self.topology.rank
            vector, table, served = self.global_model.vector.clone(), [], set()
            edge_bytes, group_s = [0, 0], 0.0
            for edge_round in range(1, group.rounds + 1):
                sampled = self._sampled(group, server_round, edge_round)
                if mine:
                    rows, seconds, up, down, spent = self._edge_round(
                        trainer, server_round, group, vector, sampled, served
                    )
                    table += [[edge_round, *row] for row in rows]
                    losses += [row[3] for row in rows if row[1] == 0]
                    group_s, compute_s = group_s + seconds, compute_s + spent
                    edge_bytes = [edge_bytes[0] + up, edge_bytes[1] + down]
                self._advance(sampled)
            if not mine:
                continue
            # The group's weight at the cloud: the examples of its clients whose updates counted,
            # each once, however many of its edge rounds drew them.
            examples = sum({row[1]: row[3] for row in table if row[2] == 0}.values())
            mask = self.masks[group.depth]
            summary = torch.tensor([examples, group_s, *edge_bytes], dtype=torch.float64)
            delta = (vector - self.global_model.vector)[mask]
            sends.append(self.wan.send(summary, SERVER, tag=group.index))
            sends.append(
                self.wan.send(torch.tensor(table, dtype=torch.float64).reshape(-1, 6), SERVER, tag=group.index)
            )
            sends.append(self.wan.send(delta, SERVER, tag=group.index, codec=self.federation.quantize))
        for handle in sends:
            handle.wait()
        return (sum(losses) / len(losses) if losses else math.nan), compute_s

    def _edge_round(
        self,
        trainer: Trainer,
        server_round: int,
        group: Group,
        vector: torch.Tensor,
        sampled: list[int],
        served: set[int],
    ) -> tuple[list[list[float]], float, int, int, float]:
        """One edge round of `group` on `vector` (its model, updated in place): each sampled client
        trains and uploads through the codec; the round is timed on the device tier and what counts
        averaged in. `served`: the clients that hold this global round's model already (added to).
        Returns each client's row (client, status, examples, train loss, eval loss), the modelled
        seconds, the bytes up and down, and the compute seconds."""
        f, d = self.federation, self.config.devices
        mask, tuned = self.masks[group.depth], self.tuned[group.depth]
        infos, updates, compute_s = [], [], 0.0
        for client in sampled:
            try:
                update, loss, eval_loss, seconds = self._train_client(trainer, server_round, client, vector, tuned)
            except Exception as err:  # a client's failure is the edge round's news
                print(f"cocodc: round {server_round}: client {client} failed: {err}", file=sys.stderr, flush=True)
                infos.append([0.0, math.nan, FAILED, math.nan])
                updates.append(torch.empty(0))
                continue
            infos.append([float(self.shards.examples(client)), loss, OK, eval_loss])
            updates.append(self.codec.decode(self.codec.encode(update[mask]), int(mask.sum())))
            compute_s += seconds
        # A client new to this global round gets the whole trainable model (the other groups changed
        # what it freezes); one the group drew before, only what the group tunes. A failed client's
        # upload is timed as if sent (the edge cannot tell it from a slow one), not counted.
        downloads = [HEADER + 4 * (int(mask.sum()) if c in served else vector.numel()) for c in sampled]
        served.update(sampled)
        upload = self._upload_bytes(group.depth)
        arrivals = round_arrivals(
            self.profiles,
            sampled,
            download_bytes=downloads,
            upload_bytes=[upload] * len(sampled),
            local_steps=f.local_steps,
            step_s=d.step_s * step_cost(group.depth, self.layers),
            server_bandwidth_mbps=d.edge_bandwidth_mbps,
        )
        accepted, failed, not_finite, late = judge_updates(sampled, infos, updates, arrivals, f.deadline_s)
        if accepted:
            vector[mask] += weighted_mean([u for _, _, u in accepted], [n for _, n, _ in accepted])
        left_out = {"failed": failed, "not_finite": not_finite, "late": late}
        status = {c: STATUSES.index(why) for why, clients in left_out.items() for c in clients}
        rows = [[c, status.get(c, 0), info[0], info[1], info[3]] for c, info in zip(sampled, infos, strict=True)]
        seconds = server_wait_s(arrivals, failed, f.deadline_s)
        return rows, seconds, upload * (len(sampled) - len(failed)), sum(downloads), compute_s

    def _serve_groups(self, server_round: int) -> float:
        """The cloud: every group's update and table, timed on the cloud tier, averaged per
        parameter over the groups that tuned it; one `group` record per group and the round's."""
        d, executors = self.config.devices, self.topology.world_size - 1
        pending = [[self.wan.recv(1 + g.index % executors, tag=g.index) for _ in range(3)] for g in self.groups]
        deltas, masks, weights, seconds, uploads, records = [], [], [], [], [], []
        rows: list[list[float]] = []
        for group, handles in zip(self.groups, pending, strict=True):
            summary, table, received = (h.wait() for h in handles)
            examples, group_s, edge_up, edge_down = summary.tolist()
            mask = self.masks[group.depth]
            delta = torch.zeros_like(self.global_model.vector)
            delta[mask] = received
            deltas.append(delta)
            masks.append(mask.float())
            weights.append(examples)  # 0 where every client failed: the group is left out
            seconds.append(group_s)
            uploads.append(sum(h.bytes_received for h in handles))
            table_rows = table.tolist()
            rows += table_rows
            clients = [int(r[1]) for r in table_rows]
            records.append(
                {
                    "kind": "group",
                    "round": server_round,
                    "step": server_round,
                    "group": group.index,
                    "clients": clients,
                    "accepted": [int(r[1]) for r in table_rows if r[2] == 0],
                    "depth": group.depth,
                    "edge_rounds": group.rounds,
                    "edge_bytes_up": int(edge_up),
                    "edge_bytes_down": int(edge_down),
                    "bytes_up": uploads[-1],
                    "edge_s": group_s,
                }
            )
        download = HEADER + 4 * self.global_model.vector.numel()
        arrivals = cloud_arrivals(
            seconds,
            download_bytes=[download] * len(self.groups),
            upload_bytes=uploads,
            edge_link_mbps=d.cloud_bandwidth_mbps,
            edge_latency_ms=d.cloud_latency_ms,
            cloud_link_mbps=d.server_bandwidth_mbps,
        )
        for record, arrived in zip(records, arrivals, strict=True):
            record.update(bytes_down=download, modelled_s=arrived)
        if any(weights):
            update = layerwise_mean(deltas, masks, weights)
            stepped = self.global_model.strategy.step(self.global_model.vector, update, server_round)
            # A parameter no group tuned keeps its value (a server optimizer's momentum would move it).
            covered = sum(w * m for w, m in zip(weights, masks, strict=True)) > 0
            self.global_model.vector = torch.where(covered, stepped, self.global_model.vector)
        accepted_rows = [r for r in rows if r[2] == 0]
        loss = sum(r[3] * r[4] for r in accepted_rows) / sum(r[3] for r in accepted_rows) if accepted_rows else math.nan
        by_status = {s: [int(r[1]) for r in rows if r[2] == i] for i, s in enumerate(STATUSES)}
        record = {
            "kind": "round",
            "round": server_round,
            "step": server_round,
            "sampled": [int(r[1]) for r in rows],
            **by_status,
            "bytes_up": sum(uploads),
            "bytes_down": download * len(self.groups),
            "edge_bytes_up": sum(r["edge_bytes_up"] for r in records),
            "edge_bytes_down": sum(r["edge_bytes_down"] for r in records),
            "modelled_s": max(arrivals),
            "train_loss": loss,
            # The global model's loss on each client's data (their first edge round's start), and
            # each client's training loss, the mean over the edge rounds that drew it.
            "client_eval_loss": {str(int(r[1])): r[5] for r in rows if r[0] == 1 and r[2] != 1},
            "client_train_loss": _means((int(r[1]), r[4]) for r in rows if r[2] != 1),
        }
        if server_round == 1:
            records.insert(0, self.plan_record())
        self.records += [*records, record]
        t = self.totals
        for key in ("bytes_up", "bytes_down", "edge_bytes_up", "edge_bytes_down", "modelled_s"):
            t[key] += record[key]
        t["accepted"] += len(by_status["accepted"])
        t["left_out"] += len(rows) - len(by_status["accepted"])
        return loss

    def plan_record(self) -> dict[str, Any]:
        """The groups as partitioned and planned (the rule's choice, or the config's), logged once."""
        f = self.federation
        return {
            "kind": "groups",
            "step": 1,
            "by": f.group_by,
            "rule": not (f.group_rounds and f.group_depth),
            "groups": [
                {
                    "group": g.index,
                    "members": g.members,
                    "divergence": g.divergence,
                    "depth": g.depth,
                    "edge_rounds": g.rounds,
                    "edge_round_s": g.edge_round_s,
                }
                for g in self.groups
            ],
        }

    def describe(self) -> str:
        shape = ", ".join(f"{len(g.members)} clients x{g.rounds} depth {g.depth}" for g in self.groups)
        return super().describe() + f" | {len(self.groups)} groups ({self.federation.group_by}): {shape}"

    def tokens_per_step(self) -> int:
        t = self.config.train
        trained = sum(g.rounds * self._share(g) for g in self.groups)  # client trainings per global round
        return trained * self.federation.local_steps * t.batch_size * t.seq_len

    def summary(self) -> dict[str, Any]:
        groups = [{"members": len(g.members), "depth": g.depth, "edge_rounds": g.rounds} for g in self.groups]
        return {**super().summary(), "groups": groups}


def _means(pairs: Iterable[tuple[int, float]]) -> dict[str, float]:
    """The mean of each key's values, keyed by its string."""
    values: dict[int, list[float]] = {}
    for key, value in pairs:
        values.setdefault(key, []).append(value)
    return {str(key): sum(v) / len(v) for key, v in values.items()}
