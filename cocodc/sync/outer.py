"""OuterSync: the outer loop of DiLoCo, Streaming DiLoCo and CoCoDC, for any training loop.

Call `step()` after every inner optimizer step and `finish()` after the last. The schedule says
which fragment to send or apply after which step; the pseudo-gradients travel through the comm
engine (encoded by `sync.quantize`) while inner steps go on, and the outer optimizer (one per
fragment) runs on their mean.

With several ranks per region (an `intra` engine over the region's ranks, which hold identical
parameters), each rank carries only its 1/R share of a fragment over the WAN, and the region
re-assembles the mean over its fast link when the fragment is applied.

With the adaptive schedule, every fragment collective carries P + 2 more numbers in fp32: this
region's drift of every fragment, its inner-step time and its last measured transfer time. Their
mean over regions reaches every rank with the fragment, so all ranks decide the next slots from
the same numbers without a round trip of their own.

A region whose pseudo-gradient is not finite sends it with weight 0: the mean is over the other
regions, the sync record names the excluded ones, and the excluded region takes the new global
copy of the fragment in place of its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cocodc.comm import CommEngine, Handle
from cocodc.comm.codec import get_codec
from cocodc.config import SyncConfig
from cocodc.sync.fragments import Fragment, split_model, split_modules
from cocodc.sync.merge import merge_alpha, merge_compensated, pseudo_gradient, update_normalisers
from cocodc.sync.schedule import AdaptiveSchedule, RoundRobinSchedule, Slot

if TYPE_CHECKING:
    import torch.distributed as dist


@dataclass
class _InFlight:
    slot: Slot
    handle: Handle
    sent: list[torch.Tensor] | None = None  # the live fragment at the send (cocodc's theta_send)
    done_s: float | None = None  # when the transfer was first seen complete, after its start


class OuterSync:
    def __init__(
        self,
        fragments: nn.Module | Sequence[nn.Module],
        config: SyncConfig,
        comm: CommEngine | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        intra: CommEngine | None = None,
    ):
        if config.method not in ("diloco", "streaming", "cocodc"):
            raise ValueError(f"OuterSync runs diloco, streaming or cocodc, not {config.method!r}")
        if isinstance(fragments, nn.Module):
            self.fragments: list[Fragment] = split_model(fragments, config.fragments, config.fragment_pattern)
        else:
            self.fragments = split_modules(fragments)
        self.config = config
        self.comm = comm if comm is not None else CommEngine(group)
        self.intra = intra
        self.codec = get_codec(config.quantize)
        count = len(self.fragments)
        self.adaptive = config.schedule == "adaptive"
        self.schedule: RoundRobinSchedule | AdaptiveSchedule = (
            AdaptiveSchedule(config.sync_every, count, config.delay, config.max_staleness)
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
        self.global_params = [[p.detach().clone() for p in f.params] for f in self.fragments]
        self.optimizers = [
            torch.optim.SGD(params, lr=config.outer_lr, momentum=config.outer_momentum, nesterov=config.outer_nesterov)
            for params in self.global_params
        ]
        self.compensate = config.method == "cocodc"
        # Per fragment: the running mean of delta^2 (adaptive compensation), updated at every apply.
        self.normalisers = (
            [[torch.zeros_like(p, dtype=torch.float32) for p in params] for params in self.global_params]
            if self.compensate and config.dc_adaptive and config.dc_normaliser == "running"
            else None
        )
        self.inner_step = 0
        self.outer_steps = 0
        self._in_flight: dict[int, _InFlight] = {}
        self._drained: set[int] = set()  # slots that finish() applied before their apply step
        self._records: list[dict[str, Any]] = []

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Run `step()` after every real step of the inner `optimizer` (a post-step hook); returns
        the hook's handle (`.remove()` detaches it). A wrapper that holds the torch optimizer as
        `.optimizer` (accelerate's) is seen through: a step it skips (gradient accumulation
        between boundaries, an AMP step with inf gradients) never reaches the torch optimizer, so
        it is not counted."""
        inner = getattr(optimizer, "optimizer", optimizer)
        return inner.register_step_post_hook(lambda *_: self.step())

    def step(self) -> None:
        """Account for one inner step just taken; send and apply what the schedule says."""
        self.inner_step += 1
        if self.adaptive:
            self._observe()
            if (self.inner_step - 1) % self.schedule.slot_len == 0:
                self._decide((self.inner_step - 1) // self.schedule.slot_len + 1)
        send = self.schedule.send_at(self.inner_step)
        if send is not None:
            self._send(send)
        apply = self.schedule.apply_at(self.inner_step)
        if apply is not None and apply.index in self._drained:
            self._drained.discard(apply.index)  # a run continued past its end: finish() applied it
        elif apply is not None:
            self._apply(self._in_flight.pop(apply.fragment))
        if self.adaptive:
            self._step_ended = time.perf_counter()

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
        slot = decision.slot
        self._records.append(
            {
                "kind": "decision",
                "step": self.inner_step,
                "slot": index,
                "fragment": slot.fragment,
                "reason": decision.reason,
                "send_step": slot.send_step,
                "apply_step": slot.apply_step,
                "tau": slot.apply_step - slot.send_step,
                "drift": list(decision.drift),
                "measured_at": self.shared_at,
                "step_s": step_s,
                "transfer_s": transfer_s,
            }
        )

    def _telemetry(self, device: torch.device) -> torch.Tensor:
        """This region's numbers for the adaptive schedule: drift of every fragment, step and
        transfer time."""
        drift = [
            sum(float((g - m.detach()).float().square().sum()) for g, m in zip(params, f.params, strict=True)) / f.numel
            for params, f in zip(self.global_params, self.fragments, strict=True)
        ]
        return torch.tensor([*drift, self.step_s, self.transfer_s], dtype=torch.float32, device=device)

    def finish(self) -> None:
        """Apply every fragment still in flight, in slot order."""
        for pending in sorted(self._in_flight.values(), key=lambda x: x.slot.index):
            self._apply(pending)
            self._drained.add(pending.slot.index)
        self._in_flight.clear()

    def _send(self, slot: Slot) -> None:
        if slot.fragment in self._in_flight:
            raise RuntimeError(f"fragment {slot.fragment} is already in flight")
        payload = pseudo_gradient(self.global_params[slot.fragment], self.fragments[slot.fragment].params)
        # Decided on the whole fragment, so every rank of the region takes the same decision.
        weight = 1.0 if bool(torch.isfinite(payload).all()) else 0.0
        if self.intra is not None and self.intra.size > 1:
            share = -(-payload.numel() // self.intra.size)
            payload = torch.nn.functional.pad(payload, (0, share * self.intra.size - payload.numel()))
            payload = payload[self.intra.rank * share : (self.intra.rank + 1) * share].clone()
        tail = 0
        if self.adaptive:
            extras = self._telemetry(payload.device)
            payload, tail = torch.cat([payload, extras]), extras.numel()
        sent = [p.detach().clone() for p in self.fragments[slot.fragment].params] if self.compensate else None
        handle = self.comm.all_reduce_mean(payload, self.codec, exact_tail=tail, weight=weight)
        self._in_flight[slot.fragment] = _InFlight(slot, handle, sent)

    def _apply(self, pending: _InFlight) -> None:
        p = pending.slot.fragment
        mean = pending.handle.wait()
        weights = pending.handle.weights
        excluded = [m for m, w in enumerate(weights) if w == 0]
        if len(excluded) == len(weights):
            raise FloatingPointError(f"fragment {p}'s pseudo-gradient is not finite in any region")
        params = self.global_params[p]
        rows = mean.view(1, -1)
        if self.intra is not None and self.intra.size > 1:
            rows = self.intra.all_gather(mean).wait()
        width = rows.shape[1] - (len(self.fragments) + 2 if self.adaptive else 0)
        mean = rows[:, :width].reshape(-1)[: sum(t.numel() for t in params)]
        if self.adaptive:
            self.shared = rows[:, width:].mean(dim=0).tolist()
            self.shared_at = pending.slot.send_step
            done_s = pending.done_s if pending.done_s is not None else pending.handle.elapsed_s
            self.transfer_s = done_s
        for param, grad in zip(params, mean.split([t.numel() for t in params]), strict=True):
            param.grad = grad.view_as(param).to(param.dtype)
        self.optimizers[p].step()
        self.optimizers[p].zero_grad(set_to_none=True)
        if weights[self.comm.rank] == 0:
            with torch.no_grad():
                for live, new in zip(self.fragments[p].params, params, strict=True):
                    live.copy_(new)
        merged: dict[str, float] = {}
        if weights[self.comm.rank] != 0:
            merged = self._merge(p, pending.sent)
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
                **merged,
            }
        )

    def _merge(self, p: int, sent: list[torch.Tensor] | None) -> dict[str, float]:
        """Merge fragment p's new global value into the live parameters; cocodc's w statistics."""
        live, config = self.fragments[p].params, self.config
        if sent is None:
            merge_alpha(live, self.global_params[p], config.mix)
            return {}
        normalisers = None
        if self.normalisers is not None:
            normalisers = self.normalisers[p]
            first = self.last_applied[p] == 0
            update_normalisers(normalisers, live, sent, 0.0 if first else config.dc_beta)
        per_tensor = config.dc_adaptive and config.dc_normaliser == "tensor"
        w_mean, w_capped = merge_compensated(
            live, self.global_params[p], sent, config.dc_lambda, config.mix, normalisers, per_tensor
        )
        return {"w_mean": w_mean, "w_capped": w_capped}

    def pop_records(self) -> list[dict[str, Any]]:
        """Records since the last call: one `sync` per applied fragment, one `decision` per slot
        the adaptive schedule planned."""
        records, self._records = self._records, []
        return records

    @contextmanager
    def global_parameters(self) -> Iterator[None]:
        """Within the block the live parameters hold the global copy (for eval)."""
        live = [p for f in self.fragments for p in f.params]
        saved = [p.detach().clone() for p in live]
        with torch.no_grad():
            for p, g in zip(live, (g for params in self.global_params for g in params), strict=True):
                p.copy_(g)
            try:
                yield
            finally:
                for p, s in zip(live, saved, strict=True):
                    p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly; fragments in flight are waited for and stored."""
        return {
            "inner_step": self.inner_step,
            "outer_steps": self.outer_steps,
            "global_params": [[t.clone() for t in params] for params in self.global_params],
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "in_flight": [
                {
                    "slot": pending.slot.index,
                    "mean": pending.handle.wait().clone(),
                    "weights": pending.handle.weights,
                    "sent": pending.sent,
                }
                for pending in self._in_flight.values()
            ],
            "drained": sorted(self._drained),
            "normalisers": self.normalisers,
            "last_applied": list(self.last_applied),
            "schedule": self.schedule.state_dict() if self.adaptive else None,
            "shared": self.shared,
            "shared_at": self.shared_at,
            "step_s": self.step_s,
            "transfer_s": self.transfer_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner_step = int(state["inner_step"])
        self.outer_steps = int(state["outer_steps"])
        with torch.no_grad():
            for params, saved in zip(self.global_params, state["global_params"], strict=True):
                for param, value in zip(params, saved, strict=True):
                    param.copy_(value)
        for opt, saved in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(saved)
        self.last_applied = list(state["last_applied"])
        if self.adaptive:
            self.schedule.load_state_dict(state["schedule"])
        self.shared, self.step_s, self.transfer_s = state["shared"], state["step_s"], state["transfer_s"]
        self.shared_at = state["shared_at"]
        # A checkpoint is loaded onto the CPU; what was in flight returns to the parameters' device.
        device = self.global_params[0][0].device
        self._in_flight = {}
        for entry in state["in_flight"]:
            slot = self.schedule.slot(int(entry["slot"]))
            handle = Handle.completed(self.comm, entry["mean"].to(device), weights=entry["weights"])
            sent = [t.to(device) for t in entry["sent"]] if entry["sent"] is not None else None
            self._in_flight[slot.fragment] = _InFlight(slot, handle, sent)
        self._drained = set(state["drained"])
        if self.normalisers is not None:
            for mine, saved in zip(self.normalisers, state["normalisers"], strict=True):
                for tensor, value in zip(mine, saved, strict=True):
                    tensor.copy_(value)
