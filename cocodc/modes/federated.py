"""The federated mode: a server (rank 0) and executors (ranks 1..E) that train virtual clients.

A round: every rank draws the same K clients (clients.sample_clients) and deals them over the
executors; each executor trains its clients one after another from the global model (a fresh
AdamW each, `local_steps` steps on the client's own shard) and sends each update (client -
global, through the upload codec) and a few numbers (examples, loss, status) to the server as soon
as it is done. The server times the round on the modelled links (clients.round_arrivals), leaves
out the updates that failed, are not finite or arrive after the deadline, aggregates the rest with
the strategy and broadcasts the new global model, which every rank then holds: eval and
checkpoints see the global model everywhere.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from cocodc.comm import CommEngine, Handle
from cocodc.comm.codec import get_codec
from cocodc.config import Config, ConfigError
from cocodc.data import ClientShards
from cocodc.devices import DeviceProfiles
from cocodc.federated.clients import executor_of, round_arrivals, sample_clients, server_wait_s
from cocodc.federated.strategies import build_strategy, proximal_term, weighted_mean
from cocodc.memory import storage_bytes, tensors_in
from cocodc.model import lm_loss
from cocodc.modes.faults import FAULTS_ENV, parse_faults
from cocodc.topology import Topology
from cocodc.trainer import Stateful, Trainer, autocast_for, lr_at

SERVER = 0
OK, FAILED = 0.0, 1.0


class GlobalModel:
    """The trainable parameters' global values, a flat fp32 vector every rank holds the same, and
    the server's strategy state."""

    def __init__(self, params: list[nn.Parameter], strategy: Any):
        self.params, self.strategy = params, strategy
        self.vector = parameters_to_vector(params).detach().float().clone()

    def load_into_model(self, vector: torch.Tensor | None = None) -> None:
        """The parameters set to `vector` (the global one unless given)."""
        vector = self.vector if vector is None else vector
        # A copy: torch's vector_to_parameters would make the parameters views of the vector.
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(vector[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def state_dict(self) -> dict[str, Any]:
        return {"vector": self.vector, "strategy": self.strategy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vector = state["vector"].to(self.vector.device)
        self.strategy.load_state_dict(state["strategy"])
        self.load_into_model()


class FederatedMode:
    keeps_region_copies = False

    def __init__(self, config: Config, topology: Topology, model: nn.Module, shards: ClientShards):
        self.config, self.topology, self.shards = config, topology, shards
        f = config.federated
        self.federation = f
        self.method = f.strategy
        self.train_model = model
        self.is_server = topology.rank == SERVER
        members = ["server"] + [f"executor {e}" for e in range(1, topology.world_size)]
        self.wan = CommEngine(
            topology.world_group, name="federation", members=members, timeout_s=config.topology.timeout_s
        )
        try:
            strategy = build_strategy(
                f.strategy, lr=f.server_lr, beta1=f.server_beta1, beta2=f.server_beta2, tau=f.server_tau
            )
        except ValueError as err:
            raise ConfigError(f"federated.strategy {f.strategy}: {err}") from None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.global_model = GlobalModel(self.params, strategy)
        self.parts: dict[str, Stateful] = {"federated": self.global_model}
        self.profiles = DeviceProfiles.draw(f.clients, config.seed, config.devices)
        faults = parse_faults(os.environ.get(FAULTS_ENV, ""), {"raise": False, "nan": False})
        self.faults = {client: kind for client, (kind, _) in faults.items()}
        self.records: list[dict[str, Any]] = []
        self.totals = {"bytes_up": 0, "bytes_down": 0, "modelled_s": 0.0, "accepted": 0, "left_out": 0}
        self.parts["federated_totals"] = _Totals(self.totals)

    # ------------------------------------------------------------------ the round

    def step(self, trainer: Trainer) -> tuple[float, float]:
        began = time.perf_counter()
        server_round = trainer.step
        sampled = sample_clients(
            self.federation.clients, self.federation.clients_per_round, self.config.seed, server_round
        )
        if self.is_server:
            loss, compute_s = self._serve(server_round, sampled), 0.0
        else:
            loss, compute_s = self._train_clients(trainer, server_round, sampled)
        for client in sampled:
            self.shards.batches_done[client] += self.federation.local_steps
        self.wan.broadcast(self.global_model.vector, SERVER).wait()
        self.global_model.load_into_model()
        if self.is_server:
            self.records[-1]["measured_s"] = time.perf_counter() - began
        return loss, compute_s

    def _train_clients(self, trainer: Trainer, server_round: int, sampled: list[int]) -> tuple[float, float]:
        """Train this executor's share of the round's clients; send each update as it is done."""
        me, executors = self.topology.rank, self.topology.world_size - 1
        sends: list[Handle] = []
        losses, compute_s = [], 0.0
        for position, client in enumerate(sampled):
            if executor_of(position, executors) != me:
                continue
            try:
                update, loss, eval_loss, seconds = self._train_client(trainer, server_round, client)
            except Exception as err:  # a client's failure is the round's news, not the executor's end
                print(f"cocodc: round {server_round}: client {client} failed: {err}", file=sys.stderr, flush=True)
                info, update = torch.tensor([0.0, math.nan, FAILED, math.nan], dtype=torch.float64), torch.empty(0)
                codec = None
            else:
                info = torch.tensor([self.shards.examples(client), loss, OK, eval_loss], dtype=torch.float64)
                codec, compute_s = self.federation.quantize, compute_s + seconds
                losses.append(loss)
            sends.append(self.wan.send(info, SERVER, tag=position))
            sends.append(self.wan.send(update, SERVER, tag=position, codec=codec))
        for handle in sends:
            handle.wait()
        return (sum(losses) / len(losses) if losses else math.nan), compute_s

    def _train_client(
        self,
        trainer: Trainer,
        server_round: int,
        client: int,
        start: torch.Tensor | None = None,
        tuned: list[bool] | None = None,
    ) -> tuple[torch.Tensor, float, float, float]:
        """`local_steps` AdamW steps of `client` from `start` (the global model unless given), of
        the parameters `tuned` marks (all unless given): (update, mean loss, the starting model's
        loss on the client's first batch, compute s). That loss, taken before the client trains,
        is the client-side evaluation of the model it was given."""
        f = self.federation
        start = self.global_model.vector if start is None else start
        self.global_model.load_into_model(start)
        trainer.optimizer.state.clear()  # every client starts a fresh AdamW, as Flower's clients do
        loader = self.shards.loader(client)
        anchor = [p.detach().clone() for p in self.params] if f.proximal_mu else None
        fault = self.faults.get(client)
        losses, compute_s = [], 0.0
        first = loader.next_batch()
        self.train_model.eval()  # no dropout (a transformers model's or LoRA's) in the evaluation
        with torch.no_grad(), autocast_for(self.config, trainer.device):
            eval_loss = lm_loss(self.train_model, first.to(trainer.device)).item()
        self.train_model.train()
        with _frozen_except(self.params, tuned):
            for local in range(1, f.local_steps + 1):
                if fault == "raise":
                    raise RuntimeError(f"injected by {FAULTS_ENV}")
                lr = lr_at((server_round - 1) * f.local_steps + local, self.config, steps=f.rounds * f.local_steps)
                penalty = None
                if anchor is not None:
                    penalty = lambda: proximal_term(self.params, anchor, f.proximal_mu)  # noqa: E731
                if fault == "nan":  # a term whose gradient is NaN everywhere, as a diverging client's
                    penalty = lambda: math.nan * sum(p.sum() for p in self.params)  # noqa: E731
                loss, seconds = trainer.inner_step(
                    self.train_model,
                    self.wan,
                    batch=first if local == 1 else loader.next_batch(),
                    lr=lr,
                    penalty=penalty,
                )
                losses.append(loss)
                compute_s += seconds
        trainer.optimizer.state.clear()
        update = parameters_to_vector(self.params).detach().float() - start
        return update, sum(losses) / len(losses), eval_loss, compute_s

    def _serve(self, server_round: int, sampled: list[int]) -> float:
        """Receive the round's updates, time them on the modelled links, aggregate what counts."""
        f, executors = self.federation, self.topology.world_size - 1
        pending = []
        for position in range(len(sampled)):
            src = executor_of(position, executors)
            pending.append((self.wan.recv(src, tag=position), self.wan.recv(src, tag=position)))
        infos, updates, upload_bytes, timed_bytes = [], [], [], []
        # A failed client's update is timed as if it had been sent (the server cannot tell the
        # silence of a failure from a slow upload before the update was due), not counted as sent.
        update_bytes = get_codec(f.quantize).encoded_bytes(self.global_model.vector.numel())
        for info_handle, update_handle in pending:
            infos.append(info_handle.wait().tolist())
            updates.append(update_handle.wait())
            upload_bytes.append(info_handle.bytes_received + update_handle.bytes_received)
            timed_bytes.append(upload_bytes[-1] + (update_bytes if infos[-1][2] == FAILED else 0))
        download_bytes = self.global_model.vector.numel() * 4
        arrivals = round_arrivals(
            self.profiles,
            sampled,
            download_bytes=download_bytes,
            upload_bytes=timed_bytes,
            local_steps=f.local_steps,
            step_s=self.config.devices.step_s,
            server_bandwidth_mbps=self.config.devices.server_bandwidth_mbps,
        )
        accepted, failed, not_finite, late = judge_updates(sampled, infos, updates, arrivals, f.deadline_s)
        if accepted:
            mean_update = weighted_mean([u for _, _, u in accepted], [n for _, n, _ in accepted])
            self.global_model.vector = self.global_model.strategy.step(
                self.global_model.vector, mean_update, server_round
            )
        modelled_s = server_wait_s(arrivals, failed, f.deadline_s)
        losses = [(n, infos[sampled.index(c)][1]) for c, n, _ in accepted]
        loss = sum(n * value for n, value in losses) / sum(n for n, _ in losses) if losses else math.nan
        record = {
            "kind": "round",
            "round": server_round,
            "step": server_round,
            "sampled": sampled,
            "accepted": [c for c, _, _ in accepted],
            "late": late,
            "failed": failed,
            "not_finite": not_finite,
            "bytes_up": sum(upload_bytes),
            "bytes_down": download_bytes * len(sampled),
            "modelled_s": modelled_s,
            "train_loss": loss,
            # Each client's: the global model's loss on its data before it trained, and its training loss.
            "client_eval_loss": {str(c): info[3] for c, info in zip(sampled, infos, strict=True) if info[2] == OK},
            "client_train_loss": {str(c): info[1] for c, info in zip(sampled, infos, strict=True) if info[2] == OK},
        }
        self.records.append(record)
        t = self.totals
        t["bytes_up"] += record["bytes_up"]
        t["bytes_down"] += record["bytes_down"]
        t["modelled_s"] += modelled_s
        t["accepted"] += len(accepted)
        t["left_out"] += len(sampled) - len(accepted)
        return loss

    # ------------------------------------------------------------------ the rest of the Mode protocol

    def after_step(self) -> list[dict[str, Any]]:
        records, self.records = self.records, []
        return records

    def finish(self) -> list[dict[str, Any]]:
        return []

    def join(self, trainer: Trainer) -> None:
        """Its members do not come and go (no ft): nothing to join."""

    def global_view(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # every rank holds the global model between rounds

    def rescue_state(self) -> dict[str, Any]:
        return {"global_vector": self.global_model.vector}

    def state_bytes(self) -> dict[str, int]:
        # Its transfers complete within the step (a round) that starts them: none stay in flight.
        return {"outer": storage_bytes(tensors_in([p.state_dict() for p in self.parts.values()]))}

    def describe(self) -> str:
        f, c = self.federation, self.config
        return (
            f"{f.clients} clients, {f.clients_per_round} per round on {f.executors} executors | {f.rounds} rounds of "
            f"{f.local_steps} steps of {c.train.batch_size} x {c.train.seq_len} tokens"
            + (f" | LoRA rank {f.lora_rank}" if f.lora_rank else "")
        )

    def tokens_per_step(self) -> int:
        f, t = self.federation, self.config.train
        return f.clients_per_round * f.local_steps * t.batch_size * t.seq_len

    def summary(self) -> dict[str, Any]:
        f = self.federation
        # The server's totals (the executors hold none): sent to every rank by the same broadcast as a model.
        values = torch.tensor([float(v) for v in self.totals.values()], dtype=torch.float64)
        self.wan.broadcast(values, SERVER).wait()
        totals = dict(zip(self.totals, values.tolist(), strict=True))
        bytes_up, bytes_down, modelled_s = totals["bytes_up"], totals["bytes_down"], totals["modelled_s"]
        accepted, left_out = totals["accepted"], totals["left_out"]
        tiers = {key: int(value) for key, value in totals.items() if key.startswith("edge_")}  # hierarchical
        return {
            "clients": f.clients,
            "clients_per_round": f.clients_per_round,
            "rounds": f.rounds,
            "local_steps": f.local_steps,
            "trained_parameters": self.global_model.vector.numel(),
            "bytes_up": int(bytes_up),
            "bytes_down": int(bytes_down),
            "modelled_s": modelled_s,
            "updates_accepted": int(accepted),
            "updates_left_out": int(left_out),
            **tiers,
        }


def judge_updates(
    sampled: list[int], infos: list[list[float]], updates: list[torch.Tensor], arrivals: list[Any], deadline_s: float
) -> tuple[list[tuple[int, int, torch.Tensor]], list[int], list[int], list[int]]:
    """Which updates count: (accepted (client, examples, update), failed, not finite, late)."""
    failed, not_finite, late, accepted = [], [], [], []
    for client, info, update, arrival in zip(sampled, infos, updates, arrivals, strict=True):
        if info[2] == FAILED:
            failed.append(client)
        elif not torch.isfinite(update).all():
            not_finite.append(client)
        elif deadline_s and arrival.arrived_at > deadline_s:
            late.append(client)
        else:
            accepted.append((client, int(info[0]), update))
    return accepted, failed, not_finite, late


@contextlib.contextmanager
def _frozen_except(params: list[nn.Parameter], tuned: list[bool] | None) -> Iterator[None]:
    """Only the parameters `tuned` marks take gradients (all when None); the backward stops below
    the lowest of them."""
    if tuned is None:
        yield
        return
    for p, trains in zip(params, tuned, strict=True):
        p.requires_grad_(trains)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class _Totals:
    """The server's running totals over rounds, saved so a resumed run's summary covers them all."""

    def __init__(self, totals: dict[str, float]):
        self.totals = totals

    def state_dict(self) -> dict[str, float]:
        return dict(self.totals)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.totals.update(state)
