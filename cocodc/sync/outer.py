"""OuterSync: the outer loop of DiLoCo, Streaming DiLoCo and CoCoDC, for any training loop.

Call `step()` after every inner optimizer step and `finish()` after the last. The schedule says
which fragment to send or apply after which step; the pseudo-gradients travel through the comm
engine (encoded by `sync.quantize`) while inner steps go on, and the outer optimizer (one per
fragment) runs on their mean.

With several ranks per region (an `intra` engine over the region's ranks) there are two layouts.
Replicas (DDP: every rank holds the whole parameters): each rank carries only its 1/R share of a
fragment over the WAN, and the region re-assembles the mean over its fast link when the fragment is
applied. Shards (FSDP2: the parameters are DTensors): every buffer of the sync covers the rank's
local shard only, rank i of each region exchanges its shard with rank i of the others, and nothing
is re-assembled; the drift, the finite check and the schedule's timings are reduced over the region
when a fragment is sent, so every rank of a region decides alike.

With the adaptive schedule, every fragment collective carries P + 2 more numbers in fp32: this
region's drift of every fragment, its inner-step time and its last measured transfer time. Their
mean over regions reaches every rank with the fragment, so all ranks decide the next slots from
the same numbers without a round trip of their own.

A region whose pseudo-gradient is not finite sends it with weight 0: the mean is over the other
regions, the sync record names the excluded ones, and the excluded region takes the new global
copy of the fragment in place of its own.

With a `quorum` (ft: cocodc/ft.py), the sends of a sync first ask torchft's Manager who takes part,
and an apply happens only where the Manager says the sync committed. When the quorum's members
change, every member drops the fragments it has in flight (their collectives ran over the old
group, and a region that joins has none of them): their drift stays in the live parameters and
travels with the fragment's next sync. A region that heals to join sends its first sync with
weight 0 (its drift is nothing yet). A collective that fails (a peer died) is not applied, what
is in flight after it is dropped, and this rank closes its side of the group, so that no live
peer waits on it; the next quorum leaves the dead region out and rebuilds the group.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cocodc import kernels
from cocodc.comm import CommEngine, CommError, Handle
from cocodc.comm.codec import get_codec
from cocodc.config import SyncConfig
from cocodc.memory import storage_bytes
from cocodc.sync.flat import FlatFragment
from cocodc.sync.fragments import Fragment, split_model, split_modules
from cocodc.sync.schedule import AdaptiveSchedule, RoundRobinSchedule, Slot

if TYPE_CHECKING:
    import torch.distributed as dist

    from cocodc.ft import RegionQuorum


@dataclass
class _InFlight:
    slot: Slot
    handle: Handle
    done_s: float | None = None  # when the transfer was first seen complete, after its start
    quorum_s: float = 0.0  # the time its sync spent forming the quorum (ft)


class OuterSync:
    def __init__(
        self,
        fragments: nn.Module | Sequence[nn.Module],
        config: SyncConfig,
        comm: CommEngine | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        intra: CommEngine | None = None,
        quorum: RegionQuorum | None = None,
    ):
        if config.method not in ("diloco", "streaming", "cocodc"):
            raise ValueError(f"OuterSync runs diloco, streaming or cocodc, not {config.method!r}")
        self._model = fragments if isinstance(fragments, nn.Module) else None
        if self._model is not None:
            self.fragments: list[Fragment] = split_model(
                self._model, config.fragments, config.fragment_pattern, config.blocks
            )
        else:
            self.fragments = split_modules(fragments)
        self.config = config
        self.quorum = quorum
        self.comm = comm if comm is not None else CommEngine(group)  # with a quorum, rebound at every change
        self._members: list[tuple[int, int]] = []  # with a quorum: (region, life) of each member
        self.intra = intra
        self.codec = get_codec(config.quantize)
        count = len(self.fragments)
        self.adaptive = config.schedule == "adaptive"
        self.schedule: RoundRobinSchedule | AdaptiveSchedule = (
            AdaptiveSchedule(config.sync_every, count, config.delay, config.max_staleness, link_share=config.link_share)
            if self.adaptive
            else RoundRobinSchedule(config.sync_every, count, config.delay)
        )
        self.last_applied = [0] * count  # the inner step each fragment was last applied at
        # Adaptive schedule: the numbers that rode along in the last applied collective (drift of
        # every fragment, step time, transfer time; means over regions), and this region's own.
        self.shared: list[float] | None = None
        self.shared_at = 0  # the inner step those numbers were measured at (that collective's send)
        self.step_s = 0.0
        self.transfer_s = 0.0
        self._step_ended: float | None = None
        self.compensate = config.method == "cocodc"
        self.running_normaliser = self.compensate and config.dc_adaptive and config.dc_normaliser == "running"
        self.per_tensor = self.compensate and config.dc_adaptive and config.dc_normaliser == "tensor"
        self.adam_curvature = self.compensate and config.dc_adaptive and config.dc_normaliser == "adam"
        self._inner: torch.optim.Optimizer | None = None  # whose second moment the "adam" weight reads
        self._group_of: dict[torch.Tensor, dict[str, Any]] = {}  # its param group, per parameter
        self.shards = any(hasattr(p, "to_local") for f in self.fragments for p in f.params)
        if self.shards and intra is None:
            raise ValueError("the fragments are sharded (DTensors): pass intra=, the engine over the region's ranks")
        # Replicas cut over a region's ranks: a payload is cut and re-assembled, so its tail rides separately.
        self.cut = intra is not None and intra.size > 1 and not self.shards
        # Per fragment, flat: the global copy (the outer optimizer's parameters), the outer
        # momentum, theta_send and the running mean of delta^2 (adaptive compensation).
        self.flat = [
            FlatFragment(
                f,
                momentum=config.outer_momentum > 0,
                normaliser=self.running_normaliser,
                sent=self.compensate,
                tail=count + 2 if self.adaptive and not self.cut else 0,
                host=config.outer_state == "host",
            )
            for f in self.fragments
        ]
        self.global_params = [f.views(f.global_) for f in self.flat]
        self.inner_step = 0
        self.outer_steps = 0
        self._in_flight: dict[int, _InFlight] = {}
        self._drained: set[tuple[int, int]] = set()  # slots that finish() applied before their apply step
        self._dropped: set[tuple[int, int]] = set()  # slots whose sync was dropped (ft), until their apply step
        self._records: list[dict[str, Any]] = []
        self.in_flight_peak = 0  # bytes: the most that the results of fragments in flight held at once

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Run `step()` after every real step of the inner `optimizer` (a post-step hook); returns
        the hook's handle (`.remove()` detaches it). A wrapper that holds the torch optimizer as
        `.optimizer` (accelerate's) is seen through: a step it skips (gradient accumulation
        between boundaries, an AMP step with inf gradients) never reaches the torch optimizer, so
        it is not counted."""
        inner = getattr(optimizer, "optimizer", optimizer)
        self.use_optimizer(inner)
        return inner.register_step_post_hook(lambda *_: self.step())

    def use_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The inner AdamW whose second moment CoCoDC's "adam" weight reads (`attach` sets it too)."""
        self._inner = optimizer
        self._group_of = {param: group for group in optimizer.param_groups for param in group["params"]}

    def step(self) -> None:
        """Account for one inner step just taken; send and apply what the schedule says."""
        self.inner_step += 1
        if self.adaptive:
            self._observe()
            if (self.inner_step - 1) % self.schedule.slot_len == 0:
                # This slot's start decides the slot `lookahead` ahead (the first step, all up to it).
                ahead = (self.inner_step - 1) // self.schedule.slot_len + 1 + self.schedule.lookahead
                for index in range(1 if self.inner_step == 1 else ahead, ahead + 1):
                    self._decide(index)
        sends = self.schedule.sends_at(self.inner_step)
        weight = self._start_quorum() if sends and self.quorum is not None else 1.0
        self._sync(sends, weight)
        if self.adaptive:
            self._step_ended = time.perf_counter()

    def _sync(self, sends: list[Slot], weight: float) -> None:
        for send in sends:
            self._send(send, weight)
        for apply in self.schedule.applies_at(self.inner_step):
            if apply.key in self._drained:
                self._drained.discard(apply.key)  # a run continued past its end: finish() applied it
            elif apply.key in self._dropped:
                self._dropped.discard(apply.key)
            elif not self._apply(self._in_flight.pop(apply.fragment)):
                self._close_group()

    def join(self, at_least: int) -> bool:
        """ft: the first quorum (of `at_least` regions), before the first inner step or after a
        resume; returns whether this region was healed, in which case it has taken a peer's state
        at the peer's send step and makes that step's sends with the peer."""
        weight = self._start_quorum(first=True, at_least=at_least)
        if weight == 0.0:
            self._sync(self.schedule.sends_at(self.inner_step), weight)
        return weight == 0.0

    def _start_quorum(self, first: bool = False, at_least: int = 1) -> float:
        """Ask the quorum for the sync about to be sent; the weight of this region's sends (0 when
        it was healed to join)."""
        change = self.quorum.start(lambda: self.inner_step, at_least, first)
        if change is None:
            return 1.0
        # Before the engine moves to the new group: what is in flight still runs over the old one.
        # What a resumed region holds in flight at its first quorum, its resumed peers hold too.
        dropped = [] if first else self._drop_in_flight("the quorum changed")
        self.comm.rebind(change.group, change.link, members=[f"region {r}" for r in change.regions])
        before = self._members
        self._members = list(zip(change.regions, change.lives, strict=True))
        self._records.append(
            {
                "kind": "membership",
                "step": self.inner_step,
                "regions": change.regions,
                "joined": [r for r, life in self._members if (r, life) not in before] if before else [],
                "left": [r for r, life in before if (r, life) not in self._members],
                "healed": change.healed,
                "dropped": dropped,
                "quorum_s": change.quorum_s,
            }
        )
        return 0.0 if change.healed else 1.0

    @property
    def regions(self) -> list[int]:
        """With a quorum: the regions in it, in group rank order."""
        return [region for region, _ in self._members]

    def _drop_in_flight(self, reason: str) -> list[int]:
        dropped = sorted(self._in_flight)
        for p in dropped:
            pending = self._in_flight.pop(p)
            self._dropped.add(pending.slot.key)
            with contextlib.suppress(CommError):  # let the backend finish with its buffers
                pending.handle.wait()
            self._record_dropped(pending, reason)
        return dropped

    def _close_group(self) -> None:
        """ft, after a collective failed here: what else is in flight on the group is dropped and
        this rank's side of the group closed (see RegionQuorum.close_group); the next quorum
        rebuilds it."""
        self._drop_in_flight("an earlier collective on the group failed here")
        self.comm.rebind(None)
        self.quorum.close_group()

    def _drop_failed(self) -> None:
        """ft: what is in flight and failed (a peer died) is dropped now, as its apply would have."""
        for p, pending in list(self._in_flight.items()):
            try:
                pending.handle.wait()
            except CommError as err:
                del self._in_flight[p]
                self._dropped.add(pending.slot.key)
                self._record_dropped(pending, f"failed: {err}")

    def _record_dropped(self, pending: _InFlight, reason: str) -> None:
        self._records.append(
            {
                "kind": "dropped",
                "step": self.inner_step,
                "fragment": pending.slot.fragment,
                "send_step": pending.slot.send_step,
                "reason": reason,
            }
        )

    def _observe(self) -> None:
        """The inner step's time (outside this object) and the transfers that completed."""
        now = time.perf_counter()
        if self._step_ended is not None:
            interval = now - self._step_ended
            self.step_s = interval if not self.step_s else 0.9 * self.step_s + 0.1 * interval
        for pending in self._in_flight.values():
            if pending.done_s is None and pending.handle.is_done():
                pending.done_s = now - pending.handle.started_at

    def _decide(self, index: int) -> None:
        count, shared = len(self.fragments), self.shared
        drift = shared[:count] if shared is not None else None
        step_s, transfer_s = shared[count:] if shared is not None and self.config.adaptive_delay else (0.0, 0.0)
        decision = self.schedule.decide(index, self.last_applied, drift, step_s, transfer_s, self.shared_at)
        planned = sorted(s.fragment for s in self.schedule.planned.values() if s.index < index)
        for slot in decision.slots:
            self._records.append(
                {
                    "kind": "decision",
                    "step": self.inner_step,
                    "slot": index,
                    "part": slot.part,
                    "fragment": slot.fragment,
                    "reason": decision.reason if slot.part == 0 else "capacity",
                    "send_step": slot.send_step,
                    "apply_step": slot.apply_step,
                    "tau": slot.apply_step - slot.send_step,
                    "planned": planned,
                    "drift": list(decision.drift),
                    "measured_at": self.shared_at,
                    "step_s": step_s,
                    "transfer_s": transfer_s,
                }
            )

    def finish(self) -> None:
        """Apply every fragment still in flight, in slot order."""
        for pending in sorted(self._in_flight.values(), key=lambda x: x.slot.key):
            self._apply(pending)
            self._drained.add(pending.slot.key)
        self._in_flight.clear()

    def _send(self, slot: Slot, weight: float = 1.0) -> None:
        p = slot.fragment
        if p in self._in_flight:
            raise RuntimeError(f"fragment {p} is already in flight")
        flat = self.flat[p]
        flat.check_bound()
        self._check_model()
        # The drift of the sent fragment (of every fragment, for the adaptive schedule) in one pass
        # and one host sync; it also says whether the pseudo-gradient is finite. Decided on the
        # whole fragment, so every rank of the region takes the same decision.
        sending = self.flat if self.adaptive else [flat]
        live = flat.read_live_home()
        sums = kernels.square_sums([(f.global_, live if f is flat else f.read_live_home()) for f in sending])
        times = [self.step_s, self.transfer_s]
        if self.shards:  # over the region's shards: sums of the drift, means of the times
            reduced = self.intra.all_reduce_mean(torch.cat([sums.float(), sums.new_tensor(times)])).wait()
            sums, times = reduced[: len(sending)] * self.intra.size, reduced[len(sending) :].tolist()
        drift = sums.tolist()
        if not math.isfinite(drift[sending.index(flat)]):
            weight = 0.0
        extras = []
        if self.adaptive:
            extras = [d / f.full_numel for d, f in zip(drift, self.flat, strict=True)] + times
        if self.compensate:
            flat.sent.copy_(live)
        codec, tail = self.codec, len(extras)
        if self.cut:
            share = -(-flat.numel // self.intra.size)
            pseudo = torch.nn.functional.pad(flat.global_ - live, (0, share * self.intra.size - flat.numel))
            payload = pseudo[self.intra.rank * share : (self.intra.rank + 1) * share]
            if self.adaptive:
                payload = torch.cat([payload, payload.new_tensor(extras)])
            handle = self.comm.all_reduce_mean(payload, codec, exact_tail=tail, weight=weight)
        else:
            if self.adaptive:
                flat.tail.copy_(torch.tensor(extras))
            # theta_g - theta_m, never written out: the engine encodes the difference.
            handle = self.comm.all_reduce_mean(flat.with_tail, codec, minus=live, exact_tail=tail, weight=weight)
        self._in_flight[p] = _InFlight(slot, handle, quorum_s=self.quorum.last_s if self.quorum else 0.0)

    def _check_model(self) -> None:
        """The model still trains the parameters the sync holds (fully_shard after OuterSync would
        replace them, and the sync would go on averaging the orphaned ones)."""
        if self._model is None:
            return
        current = {id(p) for p in self._model.parameters()}
        if any(id(p) not in current for f in self.fragments for p in f.params):
            raise RuntimeError(
                "the model's parameters were replaced after OuterSync was built (fully_shard, to_empty, a new "
                "Parameter): build OuterSync after the model is sharded and on its device"
            )

    def _apply(self, pending: _InFlight) -> bool:
        """Apply a fragment's outer step (ft: if the sync committed); False if its collective
        failed here."""
        p = pending.slot.fragment
        flat = self.flat[p]
        flat.check_bound()
        try:
            mean = pending.handle.wait()
            failure = None
            done = [mean] + [x.handle.wait() for x in self._in_flight.values() if x.handle.is_done()]
            self.in_flight_peak = max(self.in_flight_peak, storage_bytes(done))
        except CommError as err:
            if self.quorum is None:
                raise
            failure = str(err)  # the error holds the failed work, which holds the group open
        if self.quorum is not None and not self.quorum.commit(failure):
            self._record_dropped(pending, f"not committed: {failure}" if failure else "not committed")
            return failure is None
        weights = pending.handle.weights
        excluded = [self.regions[m] if self.quorum else m for m, w in enumerate(weights) if w == 0]
        if len(excluded) == len(weights):
            raise FloatingPointError(f"fragment {p}'s pseudo-gradient is not finite in any region")
        rows = mean.view(1, -1)
        if self.cut:
            rows = self.intra.all_gather(mean).wait()
        width = rows.shape[1] - (len(self.fragments) + 2 if self.adaptive else 0)
        grad = rows[:, :width].reshape(-1)[: flat.numel]
        if self.adaptive:
            self.shared = rows[:, width:].mean(dim=0).tolist()
            self.shared_at = pending.slot.send_step
            done_s = pending.done_s if pending.done_s is not None else pending.handle.elapsed_s
            self.transfer_s = done_s
        config, first = self.config, self.last_applied[p] == 0
        merge = "replace" if weights[self.comm.rank] == 0 else "compensate" if self.compensate else "lerp"
        live = flat.read_live_home()
        w_mean, w_capped = kernels.outer_apply(
            grad,
            flat.global_,
            flat.momentum,
            live,
            lr=config.outer_lr,
            mu=config.outer_momentum,
            nesterov=config.outer_nesterov,
            first=first,
            merge=merge,
            alpha=config.mix,
            sent=flat.sent,
            dc_lambda=config.compensation_lambda,
            normaliser=flat.normaliser,
            beta=0.0 if first else config.dc_beta,
            per_tensor=flat.sizes if self.per_tensor else None,
            curvature=self._curvature(flat, self.inner_step - pending.slot.send_step)
            if self.adam_curvature and merge == "compensate"
            else None,
        )
        flat.write_live(live)
        self.last_applied[p] = self.inner_step
        self.outer_steps += 1
        handle = pending.handle
        self._records.append(
            {
                "kind": "sync",
                "step": self.inner_step,
                "outer_step": self.outer_steps,
                "fragment": p,
                "send_step": pending.slot.send_step,
                "apply_step": self.inner_step,
                "bytes_sent": handle.bytes_sent,
                "bytes_received": handle.bytes_received,
                "comm_s": handle.elapsed_s,
                "modelled_s": handle.modelled_s,
                "blocked_s": handle.blocked_s,
                "excluded": excluded,
                **({"regions": self.regions, "quorum_s": pending.quorum_s} if self.quorum is not None else {}),
                **({"w_mean": w_mean, "w_capped": w_capped} if merge == "compensate" else {}),
            }
        )
        return True

    def _curvature(self, flat: FlatFragment, steps: int) -> torch.Tensor:
        """steps * lr * sqrt(v_hat) per element of the fragment, v_hat the inner AdamW's
        bias-corrected second moment: how much `steps` AdamW steps change when their starting point
        moves, to first order, with the curvature taken as the squared gradient that v averages. A
        parameter the optimizer has not stepped yet gets 0 (replay)."""
        if self._inner is None:
            raise RuntimeError(
                "sync.dc_normaliser 'adam' reads the inner AdamW's second moment: call "
                "OuterSync.attach(optimizer) or use_optimizer(optimizer) before training"
            )
        parts = []
        with torch.no_grad():
            for param, shard in zip(flat.params, flat.shards, strict=True):
                state = self._inner.state.get(param, {})
                if "exp_avg_sq" not in state:
                    parts.append(torch.zeros(shard.numel(), dtype=torch.float32, device=flat.device))
                    continue
                group = self._group_of[param]
                second = state["exp_avg_sq"]
                second = second.to_local() if hasattr(second, "to_local") else second
                v_hat = second.float() / (1 - group["betas"][1] ** float(state["step"]))
                parts.append(v_hat.sqrt_().mul_(float(group["lr"]) * steps).view(-1))
        return torch.cat(parts).to(flat.home)

    def state_bytes(self) -> dict[str, int]:
        """This rank's outer state (global copy, momentum, normaliser and theta_send), from storage:
        `outer` beside the model, `outer_host` in host memory (`sync.outer_state: host`)."""
        held = storage_bytes(t for f in self.flat for t in (f.with_tail, f.momentum, f.normaliser, f.sent))
        host = self.config.outer_state == "host"
        return {"outer": 0 if host else held, "outer_host": held if host else 0}

    def pop_records(self) -> list[dict[str, Any]]:
        """Records since the last call: one `sync` per applied fragment, one `decision` per slot
        the adaptive schedule planned."""
        records, self._records = self._records, []
        return records

    def take_global(self) -> None:
        """The live parameters become the global copy (a region healed from a peer starts there)."""
        for f in self.flat:
            f.write_live(f.global_)

    @contextmanager
    def global_parameters(self) -> Iterator[None]:
        """Within the block the live parameters hold the global copy (for eval)."""
        saved = [f.read_live().clone() for f in self.flat]
        for f in self.flat:
            f.write_live(f.global_)
        try:
            yield
        finally:
            for f, s in zip(self.flat, saved, strict=True):
                f.write_live(s)

    def _per_param(self, buffers: Sequence[torch.Tensor | None]) -> dict[str, torch.Tensor] | None:
        """One flat buffer per fragment as {parameter name: view of its (local) values}."""
        if buffers[0] is None:
            return None
        return {name: view for f, b in zip(self.flat, buffers, strict=True) for name, view in f.named_views(b).items()}

    def _pending_state(self, pending: _InFlight) -> dict[str, Any]:
        """A fragment in flight, waited for, in a layout-free form: its mean per parameter (whole for
        replicas, the local shard for shards) and the numbers that rode along, per rank."""
        flat, mean = self.flat[pending.slot.fragment], pending.handle.wait()
        rows = self.intra.all_gather(mean).wait() if self.cut else mean.view(1, -1)
        width = rows.shape[1] - (len(self.fragments) + 2 if self.adaptive else 0)
        values = rows[:, :width].reshape(-1)[: flat.numel].clone()
        return {
            "slot": pending.slot.index,
            "part": pending.slot.part,
            "mean": flat.named_views(values),
            "tails": rows[:, width:].tolist(),
            "weights": pending.handle.weights,
        }

    def _payload(self, flat: FlatFragment, entry: dict[str, Any]) -> torch.Tensor:
        """What `_pending_state` saved, as this rank's collective would have returned it."""
        device = flat.global_.device
        values = torch.cat([entry["mean"][name].reshape(-1).to(device) for name in flat.names])
        tails = entry["tails"]
        if not self.cut:
            return torch.cat([values, values.new_tensor(tails[0])])
        # Each rank's own numbers where the region has as many ranks as when saved; else their mean.
        tail = tails[self.intra.rank] if len(tails) == self.intra.size else torch.tensor(tails).mean(0).tolist()
        share = -(-flat.numel // self.intra.size)
        padded = torch.nn.functional.pad(values, (0, share * self.intra.size - flat.numel))
        return torch.cat([padded[self.intra.rank * share : (self.intra.rank + 1) * share], values.new_tensor(tail)])

    def state_dict(self, in_flight: bool = True) -> dict[str, Any]:
        """Everything needed to continue exactly; fragments in flight are waited for and stored.
        Tensors are per parameter name (views of this rank's buffers, its local shards when the
        region shards), so a checkpoint can reshard them. Without `in_flight` (the state a peer heals
        from: every member drops what is in flight when the quorum changes), they are stored as
        dropped."""
        if self.quorum is not None and in_flight:
            self._drop_failed()
        dropped = set(self._dropped) | (set() if in_flight else {x.slot.key for x in self._in_flight.values()})
        pending = {
            str(p): self._pending_state(entry) for p, entry in sorted(self._in_flight.items() if in_flight else ())
        }
        return {
            "inner_step": self.inner_step,
            "outer_steps": self.outer_steps,
            "global_params": self._per_param([f.global_ for f in self.flat]),
            "momentum": self._per_param([f.momentum for f in self.flat]),
            "sent": self._per_param([f.sent for f in self.flat]),
            "normalisers": self._per_param([f.normaliser for f in self.flat]),
            "in_flight": pending,
            "dropped": [list(key) for key in sorted(dropped)],
            "drained": [list(key) for key in sorted(self._drained)],
            "last_applied": list(self.last_applied),
            "schedule": self.schedule.state_dict() if self.adaptive else None,
            "shared": self.shared,
            "shared_at": self.shared_at,
            "step_s": self.step_s,
            "transfer_s": self.transfer_s,
        }

    def checkpoint_template(self, saved: set[str]) -> dict[str, Any]:
        """The state to load a checkpoint holding the `saved` keys into: a slot for each fragment it
        holds in flight, laid out as this rank holds the fragment."""
        state = self.state_dict(in_flight=False)
        state["in_flight"] = {
            str(f.index): {
                "slot": None,
                "part": None,
                "mean": f.named_views(torch.zeros_like(f.global_)),
                "tails": None,
                "weights": None,
            }
            for f in self.flat
            if any(key.startswith(f"in_flight.{f.index}.") for key in saved)
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner_step = int(state["inner_step"])
        self.outer_steps = int(state["outer_steps"])
        with torch.no_grad():
            for key, buffers in (
                ("global_params", [f.global_ for f in self.flat]),
                ("momentum", [f.momentum for f in self.flat]),
                ("sent", [f.sent for f in self.flat]),
                ("normalisers", [f.normaliser for f in self.flat]),
            ):
                mine = self._per_param(buffers)
                for name, view in (mine or {}).items():
                    view.copy_(state[key][name])  # a no-op where a checkpoint was loaded in place
        self.last_applied = list(state["last_applied"])
        if self.adaptive:
            self.schedule.load_state_dict(state["schedule"])
        self.shared, self.step_s, self.transfer_s = state["shared"], state["step_s"], state["transfer_s"]
        self.shared_at = state["shared_at"]
        self._in_flight = {}
        for entry in state["in_flight"].values():
            slot = self.schedule.slot(int(entry["slot"]), int(entry["part"]))
            payload = self._payload(self.flat[slot.fragment], entry)
            handle = Handle.completed(self.comm, payload, weights=list(entry["weights"]))
            self._in_flight[slot.fragment] = _InFlight(slot, handle)
        self._drained = {(int(index), int(part)) for index, part in state["drained"]}
        self._dropped = {(int(index), int(part)) for index, part in state["dropped"]}
