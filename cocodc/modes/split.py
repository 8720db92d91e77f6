"""The split-learning mode: workers hold the data and the model's bottom, the server the rest.

A step: every worker (dealt over the executors, ranks 1..E) runs its batch through its bottom and
sends the activations (through the codec) to the server (rank 0), with its labels in the two-part
shape. The server takes the workers in groups, all of them at once with `merge` (MergeSFL-style
feature merging: one batch of every worker's features) or one after another without (SplitFed
v2), and for each group runs its part forward and backward and steps its optimizer once; each
worker gets back the gradient of its slice, scaled to the gradient of its own mean loss. In the u
shape the server's output goes back to the workers, whose heads compute the loss with labels that
never leave them, and their gradients come back before the server's backward. Then the workers'
parts step: as one model (`aggregate_every: 1`, gradients averaged by batch share, which is
exactly training on the merged batch) or each on its own and averaged every k steps (FedAvg).

Every rank holds a whole Transformer (the trainer's, for eval and checkpoints); the server trains
the part it owns in it, and each worker trains its own copy's part. A worker that fails or sends
a non-finite tensor (its activations or, in the u shape, its head's loss and gradient) is left out
of the step (with a line on the console), and the others go on.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cocodc.comm import CommEngine, Handle
from cocodc.comm.codec import get_codec
from cocodc.comm.wan import AccessLinks
from cocodc.config import Config, ConfigError
from cocodc.data import ClientShards, ShardLoader
from cocodc.devices import DeviceProfiles
from cocodc.federated.clients import executor_of
from cocodc.memory import storage_bytes, tensors_in
from cocodc.modes.faults import FAULTS_ENV, parse_faults
from cocodc.split.plan import (
    activation_arrivals,
    gradients_back,
    on_worker,
    part_sync,
    per_sequence_s,
    regulate_batches,
    serving_order,
)
from cocodc.topology import Topology
from cocodc.trainer import Stateful, Trainer, autocast_for, inner_optimizer, lr_at

SERVER = 0
EMPTY = torch.empty(0)


class Worker:
    """One worker: its copy of the model (of which it trains its part), optimizer and data."""

    def __init__(self, index: int, model: nn.Module, config: Config, loader: ShardLoader):
        self.index, self.model, self.loader = index, model, loader
        cut, shape = config.split.cut, config.split.shape
        for name, param in model.named_parameters():
            param.requires_grad_(on_worker(name, cut, shape))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = inner_optimizer(model, config)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data": self.loader.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["data"])


class SplitState:
    """What of the mode survives a resume: every local worker's state, the batch sizes and the
    server's running totals."""

    def __init__(self, mode: SplitMode):
        self.mode = mode

    def state_dict(self) -> dict[str, Any]:
        m = self.mode
        return {
            # String keys: a checkpoint's nested keys are strings (torch.distributed.checkpoint).
            "workers": {str(w): worker.state_dict() for w, worker in m.workers.items()},
            "sizes": list(m.sizes),
            "totals": dict(m.totals),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        m = self.mode
        for w, worker in m.workers.items():
            worker.load_state_dict(state["workers"][str(w)])
        m.sizes = [int(n) for n in state["sizes"]]
        m.regulated = None  # logged by the run that wrote the checkpoint
        m.totals.update(state["totals"])


class SplitMode:
    keeps_region_copies = False

    def __init__(self, config: Config, topology: Topology, model: nn.Module, shards: ClientShards):
        self.config, self.topology, self.model = config, topology, model
        sp = self.settings = config.split
        self.method = ("merged" if sp.merge else "splitfed") + ("-u" if sp.shape == "u" else "")
        self.is_server = topology.rank == SERVER
        members = ["server"] + [f"executor {e}" for e in range(1, topology.world_size)]
        self.wan = CommEngine(topology.world_group, name="split", members=members, timeout_s=config.topology.timeout_s)
        self.train_model = model
        self.layers = len(model.blocks)
        self.profiles = DeviceProfiles.draw(sp.workers, config.seed, config.devices)
        # head_nan: a u-shaped worker's head turns its loss to NaN.
        faults = parse_faults(os.environ.get(FAULTS_ENV, ""), {"raise": False, "nan": False, "head_nan": False})
        self.faults = {worker: kind for worker, (kind, _) in faults.items()}
        total = sp.workers * config.train.batch_size
        self.sizes = [config.train.batch_size] * sp.workers
        self.regulated: dict[str, Any] | None = None  # the regulation's inputs, until logged
        if sp.batch_regulation:
            per_sequence = per_sequence_s(
                self.profiles, config.train.batch_size, config.devices.step_s, self._activation_bytes(1)
            )
            capacity = [len(shards.shards[w]) for w in range(sp.workers)]
            try:
                self.sizes = regulate_batches(total, per_sequence, capacity)
            except ValueError as err:
                raise ConfigError(f"split.batch_regulation: {err}") from None
            self.regulated = {"per_sequence_s": per_sequence}
        self.workers: dict[int, Worker] = {}
        if self.is_server:
            for name, param in model.named_parameters():  # the trainer's optimizer then holds the server's part
                param.requires_grad_(not on_worker(name, sp.cut, sp.shape))
        else:
            for w in range(sp.workers):
                if executor_of(w, sp.executors) == topology.rank:
                    loader = ShardLoader(
                        shards.sequences,
                        shards.shards[w],
                        config.train.batch_size,
                        [config.seed, 0x5B, w],
                        owner=f"split worker {w}",
                    )
                    self.workers[w] = Worker(w, copy.deepcopy(model), config, loader)
        self.totals = {"bytes_up": 0, "bytes_down": 0, "modelled_s": 0.0, "left_out": 0}
        self.parts: dict[str, Stateful] = {"split": SplitState(self)}
        self.records: list[dict[str, Any]] = []

    def _activation_bytes(self, sequences: int) -> int:
        """Encoded bytes of `sequences` sequences' activations (what the codec sends per worker)."""
        numel = sequences * self.config.train.seq_len * self.config.model.d_model
        return get_codec(self.settings.quantize).encoded_bytes(numel)

    # ------------------------------------------------------------------ a step

    def step(self, trainer: Trainer) -> tuple[float, float]:
        lr = lr_at(trainer.step, self.config)
        if self.is_server:
            server_lr = lr * (self.settings.server_lr or self.config.train.lr) / self.config.train.lr
            return self._serve(trainer, server_lr)
        return self._work(trainer, lr)

    def _work(self, trainer: Trainer, lr: float) -> tuple[float, float]:
        """This executor's workers: bottoms forward, the round trip(s) with the server, parts step."""
        began, sp = time.perf_counter(), self.settings
        autocast = autocast_for(self.config, trainer.device)
        sends: list[Handle] = []
        activations, targets = {}, {}
        for w, worker in self.workers.items():
            batch = worker.loader.next_batch(self.sizes[w]).to(trainer.device)
            targets[w] = batch[:, 1:]
            try:
                if self.faults.get(w) == "raise":
                    raise RuntimeError(f"injected by {FAULTS_ENV}")
                with autocast:
                    x = worker.model.run_blocks(worker.model.embed(batch[:, :-1]), 0, sp.cut)
                if self.faults.get(w) == "nan":
                    x = x * math.nan
            except Exception as err:  # a worker's failure is the step's news, not the executor's end
                print(f"cocodc: step {trainer.step}: worker {w} failed: {err}", file=sys.stderr, flush=True)
                sends += [self.wan.send(EMPTY, SERVER, tag=w) for _ in range(2 if sp.shape == "two" else 1)]
                continue
            activations[w] = x
            sends.append(self.wan.send(x.detach().float(), SERVER, tag=w, codec=sp.quantize))
            if sp.shape == "two":
                sends.append(self.wan.send(targets[w], SERVER, tag=w))
        # Left out, a worker gets one empty message in place of the replies it waits for. All the
        # heads run before any gradient is awaited: the server replies only when the group is done.
        losses, waiting = {}, list(self.workers)
        if sp.shape == "u":
            waiting = []
            order = self.wan.recv(SERVER, tag=sp.workers).wait().tolist()  # the server's: see _serve
            for w in (w for w in order if w in self.workers):
                hidden = self.wan.recv(SERVER, tag=w, device=trainer.device).wait()
                if hidden.numel() == 0:
                    continue
                waiting.append(w)  # for a gradient, or, after a failed head, the server's empty reply
                try:
                    hidden.requires_grad_(True)
                    with autocast:
                        logits = self.workers[w].model.logits(hidden)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), targets[w].flatten())
                    if self.faults.get(w) == "head_nan":
                        loss = loss * math.nan
                    loss.backward()
                    if not (math.isfinite(loss.item()) and torch.isfinite(hidden.grad).all()):
                        raise FloatingPointError("its loss or gradient is not finite")
                except Exception as err:  # as a failed bottom: the step goes on without this worker
                    print(f"cocodc: step {trainer.step}: worker {w}'s head failed: {err}", file=sys.stderr, flush=True)
                    sends.append(self.wan.send(EMPTY, SERVER, tag=w))
                    sends.append(self.wan.send(torch.tensor([math.nan], dtype=torch.float64), SERVER, tag=w))
                    continue
                losses[w] = loss.item()
                sends.append(self.wan.send(hidden.grad, SERVER, tag=w, codec=sp.quantize))
                sends.append(self.wan.send(torch.tensor([loss.item()], dtype=torch.float64), SERVER, tag=w))
        for w in waiting:
            gradient = self.wan.recv(SERVER, tag=w, device=trainer.device).wait()
            if gradient.numel():
                activations[w].backward(gradient.to(activations[w].dtype))
                losses.setdefault(w, math.nan)  # two-part: the loss is the server's to know
        for handle in sends:
            handle.wait()
        self._step_parts(trainer, lr, included=list(losses))
        known = [v for v in losses.values() if math.isfinite(v)]
        return (sum(known) / len(known) if known else math.nan), time.perf_counter() - began

    def _step_parts(self, trainer: Trainer, lr: float, included: list[int]) -> None:
        """Step every local worker's part: as one model (gradients averaged by batch share over the
        workers of every executor) or each on its own, averaged every `aggregate_every` steps.
        The server joins the averaging collectives with zeros."""
        sp = self.settings
        if sp.aggregate_every == 1:
            mean = self._weighted_mean(
                lambda worker: [p.grad if p.grad is not None else torch.zeros_like(p) for p in worker.params], included
            )
            for worker in self.workers.values():
                if mean is not None:
                    _assign(worker.params, mean, grads=True)
                    self._optimizer_step(worker, lr)
                worker.optimizer.zero_grad(set_to_none=True)
            return
        for w, worker in self.workers.items():
            if w in included:
                self._optimizer_step(worker, lr)
            worker.optimizer.zero_grad(set_to_none=True)
        if trainer.step % sp.aggregate_every == 0:
            mean = self._weighted_mean(lambda worker: [p.detach() for p in worker.params], list(self.workers))
            for worker in self.workers.values():
                _assign(worker.params, mean, grads=False)

    def _weighted_mean(self, values: Any, included: list[int]) -> torch.Tensor | None:
        """Sum over all workers of size x values, over the sum of their sizes, as one flat vector
        (None when no worker is included); a collective over the whole job."""
        numel = self._part_numel()
        total = torch.zeros(numel + 1, dtype=torch.float32)
        for w in included:
            flat = torch.cat([v.reshape(-1).float().cpu() for v in values(self.workers[w])])
            total[:numel] += self.sizes[w] * flat
            total[numel] += self.sizes[w]
        total = self.wan.all_reduce_sum(total).wait()
        return total[:numel] / total[numel] if total[numel] > 0 else None

    def _part_numel(self) -> int:
        sp = self.settings
        return sum(p.numel() for name, p in self.model.named_parameters() if on_worker(name, sp.cut, sp.shape))

    def _optimizer_step(self, worker: Worker, lr: float) -> None:
        for group in worker.optimizer.param_groups:
            group["lr"] = lr
        if self.config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(worker.params, self.config.train.grad_clip)
        worker.optimizer.step()

    def _serve(self, trainer: Trainer, lr: float) -> tuple[float, float]:
        """The server: every worker's activations, its part forward and backward per group, one
        optimizer step per group, the gradients back; then the workers' parts' collective. A
        worker left out gets one empty message in place of the replies it waits for."""
        began, sp, device = time.perf_counter(), self.settings, trainer.device
        autocast = autocast_for(self.config, device)
        executor = [executor_of(w, sp.executors) for w in range(sp.workers)]
        pending = {
            w: (
                self.wan.recv(executor[w], tag=w, device=device),
                self.wan.recv(executor[w], tag=w) if sp.shape == "two" else None,
            )
            for w in range(sp.workers)
        }
        # Bytes per worker of each leg of the exchange, and the server's measured compute per group
        # (its forward, and the rest), for the step's timeline on the modelled links.
        legs = {leg: [0] * sp.workers for leg in ("activations", "hidden", "reply", "gradient")}
        received = {}
        for w, handles in pending.items():
            received[w] = [h.wait() if h is not None else None for h in handles]
            legs["activations"][w] = sum(h.bytes_received for h in handles if h is not None)
        arrivals, links = activation_arrivals(
            self.profiles,
            self.sizes,
            batch_size=self.config.train.batch_size,
            step_s=self.config.devices.step_s,
            sent_bytes=legs["activations"],
            server_bandwidth_mbps=self.config.devices.server_bandwidth_mbps,
        )
        # SplitFed v2 takes each worker as its activations arrive on the modelled links; the u
        # shape's executors wait for the server's output in that order too (else one waiting for a
        # later worker's would hold back an earlier one's reply).
        order = serving_order(arrivals)
        if sp.shape == "u":
            order_tensor = torch.tensor(order, dtype=torch.int64)
            sends = [self.wan.send(order_tensor, e, tag=sp.workers) for e in range(1, self.topology.world_size)]
        else:
            sends = []
        groups = [list(range(sp.workers))] if sp.merge else [[w] for w in order]
        timeline: list[tuple[list[int], float, float]] = []
        excluded, losses = [], []

        def send(w: int, tensor: torch.Tensor, leg: str, codec: str | None = None) -> None:
            sends.append(self.wan.send(tensor, executor[w], tag=w, codec=codec))
            legs[leg][w] += sends[-1].bytes_sent

        for group in groups:
            inputs, labels, members = [], [], []
            for w in group:
                x, y = received[w]
                if x.numel() == 0 or not torch.isfinite(x).all():
                    excluded.append(w)
                    send(w, EMPTY, "gradient")
                    continue
                inputs.append(x)
                labels.append(y)
                members.append(w)
            if not members:
                continue
            started = time.perf_counter()
            merged = torch.cat(inputs).requires_grad_(True)
            rows = [x.shape[0] for x in inputs]
            with autocast:
                hidden = self.model.run_blocks(merged, sp.cut, self.layers)
            rest_started = time.perf_counter()
            forward_s = rest_started - started
            if sp.shape == "two":
                with autocast:
                    logits = self.model.logits(hidden)
                loss = F.cross_entropy(logits.float().flatten(0, 1), torch.cat(labels).flatten())
                loss.backward()
                losses.append((sum(rows), loss.item()))
                share = [n / sum(rows) for n in rows]  # each member's part of the group's mean loss
            else:
                replies = []
                for w, piece in zip(members, hidden.detach().float().split(rows), strict=True):
                    send(w, piece, "hidden", sp.quantize)
                    replies.append(
                        (self.wan.recv(executor[w], tag=w, device=device), self.wan.recv(executor[w], tag=w))
                    )
                gradients = []
                for w, (grad_handle, loss_handle), n in zip(members, replies, rows, strict=True):
                    gradient, loss = grad_handle.wait(), loss_handle.wait().item()
                    legs["reply"][w] += grad_handle.bytes_received + loss_handle.bytes_received
                    if gradient.numel() == 0 or not math.isfinite(loss) or not torch.isfinite(gradient).all():
                        excluded.append(w)  # its head failed: its rows take no gradient
                        gradients.append(torch.zeros(n, *hidden.shape[1:], device=hidden.device))
                        continue
                    gradients.append(gradient)
                    losses.append((n, loss))
                rest_started = time.perf_counter()  # the rest of the compute follows the workers' replies
                # The group's loss is the mean over the rows whose heads answered.
                kept = sum(n for w, n in zip(members, rows, strict=True) if w not in excluded)
                share = [0.0 if w in excluded else n / kept for w, n in zip(members, rows, strict=True)]
                if kept:
                    hidden.backward(
                        torch.cat([g * part for g, part in zip(gradients, share, strict=True)]).to(hidden.dtype)
                    )
            self._server_optimizer_step(trainer, lr)  # steps no parameter where no backward ran
            timeline.append((members, forward_s, time.perf_counter() - rest_started))
            pieces = merged.grad.split(rows) if merged.grad is not None else [EMPTY] * len(members)
            for w, gradient, weight in zip(members, pieces, share, strict=True):
                if w in excluded:
                    send(w, EMPTY, "gradient")
                else:
                    send(w, gradient / weight, "gradient", sp.quantize)  # the gradient of the worker's own mean loss
        for handle in sends:
            handle.wait()
        self._record(trainer.step, legs, (arrivals, links), timeline, excluded)
        self._step_parts(trainer, lr, included=[])
        loss = sum(n * v for n, v in losses) / sum(n for n, _ in losses) if losses else math.nan
        return loss, time.perf_counter() - began

    def _server_optimizer_step(self, trainer: Trainer, lr: float) -> None:
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
        if self.config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainer.optimizer_parameters(), self.config.train.grad_clip)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    def _record(
        self,
        step: int,
        legs: dict[str, list[int]],
        arrived: tuple[list[float], AccessLinks],
        timeline: list[tuple[list[int], float, float]],
        excluded: list[int],
    ) -> None:
        """The step's record: bytes per worker each way (activations, labels, gradients, the u
        shape's legs and the sync of the workers' parts), and on the modelled links when every
        worker's activations arrived and when it was done (its gradient back, its part synced)."""
        arrivals, links = arrived
        done = gradients_back(arrivals, links, timeline, legs, u_shape=self.settings.shape == "u")
        senders = self._part_senders(step, excluded)
        part_bytes = 4 * self._part_numel() if senders else 0
        done = part_sync(done, links, senders, part_bytes)
        up = [
            a + r + (part_bytes if w in senders else 0)
            for w, (a, r) in enumerate(zip(legs["activations"], legs["reply"], strict=True))
        ]
        down = [h + g + part_bytes for h, g in zip(legs["hidden"], legs["gradient"], strict=True)]
        record = {
            "kind": "split",
            "step": step,
            "batch_sizes": list(self.sizes),
            "bytes_up": up,
            "bytes_down": down,
            "part_sync_bytes": part_bytes,  # each way: up from each of part_senders, down to every worker
            "part_senders": senders,
            "served": [w for members, _, _ in timeline for w in members],  # in the server's order
            "arrived_s": arrivals,
            "done_s": done,
            "modelled_s": max(done),
            "excluded": excluded,
        }
        self.records.append(record)
        t = self.totals
        t["bytes_up"] += sum(up)
        t["bytes_down"] += sum(down)
        t["modelled_s"] += record["modelled_s"]
        t["left_out"] += len(excluded)

    def _part_senders(self, step: int, excluded: list[int]) -> list[int]:
        """The workers whose part goes into this step's sync: every included worker's gradient with
        `aggregate_every: 1`, every worker's parameters on the k-th steps, none otherwise."""
        k = self.settings.aggregate_every
        if k == 1:
            return [w for w in range(self.settings.workers) if w not in excluded]
        return list(range(self.settings.workers)) if step % k == 0 else []

    # ------------------------------------------------------------------ the rest of the Mode protocol

    def after_step(self) -> list[dict[str, Any]]:
        records, self.records = self.records, []
        if self.regulated is not None and self.is_server:
            records.insert(
                0,
                {
                    "kind": "batch_sizes",
                    "step": records[0]["step"] if records else 0,
                    "sizes": list(self.sizes),
                    **self.regulated,
                },
            )
            self.regulated = None
        return records

    def finish(self) -> list[dict[str, Any]]:
        return []

    def join(self, trainer: Trainer) -> None:
        """Its members do not come and go (no ft): nothing to join."""

    @contextlib.contextmanager
    def global_view(self) -> Iterator[None]:
        """The whole model on every rank: the workers' parts averaged by batch share, the server's part."""
        sp = self.settings
        own = [dict(worker.model.named_parameters()) for worker in self.workers.values()]
        weights = [self.sizes[w] / sum(self.sizes) for w in self.workers]
        saved = [p.detach().clone() for p in self.model.parameters()]
        pieces = []
        for name, p in self.model.named_parameters():
            if on_worker(name, sp.cut, sp.shape):
                piece = sum(
                    (weight * params[name].detach().float().cpu() for weight, params in zip(weights, own, strict=True)),
                    torch.zeros(p.shape),
                )
            else:
                piece = p.detach().float().cpu() if self.is_server else torch.zeros(p.shape)
            pieces.append(piece.reshape(-1))
        flat = self.wan.all_reduce_sum(torch.cat(pieces)).wait()
        _assign(list(self.model.parameters()), flat, grads=False)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.model.parameters(), saved, strict=True):
                    p.copy_(value)

    def rescue_state(self) -> dict[str, Any]:
        return {}

    def state_bytes(self) -> dict[str, int]:
        # Its transfers complete within the step (a round) that starts them: none stay in flight.
        return {"outer": storage_bytes(tensors_in([p.state_dict() for p in self.parts.values()]))}

    def describe(self) -> str:
        sp, c = self.settings, self.config
        return (
            f"{sp.workers} workers on {sp.executors} executors, cut after block {sp.cut} of {self.layers} | "
            f"{'merged features' if sp.merge else 'SplitFed v2'}, {sp.shape} shape | {c.train.steps} steps of "
            f"{sp.workers} x {c.train.batch_size} x {c.train.seq_len} tokens"
        )

    def tokens_per_step(self) -> int:
        return sum(self.sizes) * self.config.train.seq_len

    def summary(self) -> dict[str, Any]:
        sp = self.settings
        totals = torch.tensor([float(v) for v in self.totals.values()], dtype=torch.float64)
        self.wan.broadcast(totals, SERVER).wait()
        bytes_up, bytes_down, modelled_s, left_out = totals.tolist()
        return {
            "workers": sp.workers,
            "cut": sp.cut,
            "shape": sp.shape,
            "merge": sp.merge,
            "aggregate_every": sp.aggregate_every,
            "batch_sizes": list(self.sizes),
            "bytes_up": int(bytes_up),
            "bytes_down": int(bytes_down),
            "modelled_s": modelled_s,
            "worker_steps_left_out": int(left_out),
        }


def _assign(params: list[nn.Parameter], flat: torch.Tensor, *, grads: bool) -> None:
    """Copy `flat` into the parameters' gradients (grads) or values, in order."""
    offset = 0
    with torch.no_grad():
        for p in params:
            piece = flat[offset : offset + p.numel()].view_as(p).to(p.device, p.dtype)
            if grads:
                p.grad = piece.clone()
            else:
                p.copy_(piece)
            offset += p.numel()
