"""Which fragment syncs when (DESIGN section 3; compatible with torchft's Streaming DiLoCo).

Slot j = 1, 2, ... ends at inner step j*K (K = H / P) and syncs fragment (j - 1) mod P: its send
follows inner step j*K - tau and its apply follows inner step j*K. A slot whose send would come
before step 1 is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    index: int
    fragment: int
    send_step: int
    apply_step: int


class RoundRobinSchedule:
    def __init__(self, sync_every: int, fragments: int, delay: int):
        if sync_every % fragments:
            raise ValueError(f"sync_every ({sync_every}) must be a multiple of fragments ({fragments})")
        if not 0 <= delay < sync_every:
            raise ValueError(f"delay ({delay}) must lie in [0, sync_every={sync_every})")
        self.fragments, self.delay = fragments, delay
        self.slot_len = sync_every // fragments

    def slot(self, index: int) -> Slot:
        end = index * self.slot_len
        return Slot(index, (index - 1) % self.fragments, end - self.delay, end)

    def send_at(self, step: int) -> Slot | None:
        index, rest = divmod(step + self.delay, self.slot_len)
        return self.slot(index) if rest == 0 and index >= 1 and step >= 1 else None

    def apply_at(self, step: int) -> Slot | None:
        index, rest = divmod(step, self.slot_len)
        if rest or index < 1:
            return None
        slot = self.slot(index)
        return slot if slot.send_step >= 1 else None


@dataclass(frozen=True)
class Decision:
    slot: Slot
    reason: str  # "round-robin" (no numbers yet), "drift" or "stale"
    drift: tuple[float, ...]


class AdaptiveSchedule:
    """CoCoDC's adaptive transmission on the slot grid of RoundRobinSchedule.

    Slot j's fragment and overlap are decided when slot j begins (after inner step (j-1)K + 1),
    from numbers every rank holds identically: when each fragment was last applied, and the
    region-averaged drift of every fragment, step time and transfer time that rode along in the
    last applied fragment collective (measured at its send step). The slot syncs the fragment
    with the largest drift; a fragment applied after its drift was measured has moved on since,
    so its drift counts as 0 (the fragment just applied is never picked again on old numbers).
    The staleness bound holds at every apply: the wanted fragment goes only if every fragment can
    still be applied within `max_staleness` steps of its last apply afterwards (one a slot,
    earliest deadline first); else the longest-unsynced goes. The bound must be at least H, the
    time round-robin needs. The slot's tau is the smallest number
    of steps that covers the transfer (with a margin), within [1, K - 1], so the send falls
    inside the slot and at most one fragment is in flight. Until numbers arrive, slots go
    round-robin with tau = `delay`.
    """

    def __init__(self, sync_every: int, fragments: int, delay: int, max_staleness: int = 0, margin: float = 1.25):
        if sync_every % fragments or sync_every // fragments < 2:
            raise ValueError(f"the adaptive schedule needs slots of 2+ steps: sync_every ({sync_every}) / "
                             f"fragments ({fragments}) must be an integer of at least 2")  # fmt: skip
        self.fragments = fragments
        self.slot_len = sync_every // fragments
        if delay >= self.slot_len:
            raise ValueError(f"the adaptive schedule keeps one fragment in flight: delay ({delay}) must be below "
                             f"sync_every / fragments ({self.slot_len})")  # fmt: skip
        if max_staleness and max_staleness < sync_every:
            raise ValueError(f"max_staleness ({max_staleness}) must be at least sync_every ({sync_every}): "
                             "one fragment a slot syncs each fragment every sync_every steps at best")  # fmt: skip
        self.delay = max(delay, 1)
        self.max_staleness = max_staleness or 2 * sync_every
        self.margin = margin
        self.planned: dict[int, Slot] = {}

    def decide(
        self,
        index: int,
        last_applied: Sequence[int],
        drift: Sequence[float] | None = None,
        step_s: float = 0.0,
        transfer_s: float = 0.0,
        measured_at: int = 0,
    ) -> Decision:
        """Plan slot `index` (`drift` None: no numbers have arrived yet; `measured_at`: the inner
        step the drift was measured at)."""
        start = (index - 1) * self.slot_len
        apply = start + self.slot_len
        self.planned = {i: s for i, s in self.planned.items() if s.apply_step > start}
        if drift is not None:
            current = [d if last_applied[p] < measured_at else 0.0 for p, d in enumerate(drift)]
            wanted = max(range(self.fragments), key=lambda p: (current[p], -last_applied[p], -p))
            reason = "drift"
        else:
            wanted, reason = (index - 1) % self.fragments, "round-robin"
        fragment = wanted if self._keeps_bound(wanted, last_applied, apply) else self._most_urgent(last_applied)
        if fragment != wanted:
            reason = "stale"
        delay = self.delay
        if step_s > 0 and transfer_s > 0:
            delay = min(max(math.ceil(self.margin * transfer_s / step_s), 1), self.slot_len - 1)
        slot = Slot(index, fragment, apply - delay, apply)
        self.planned[index] = slot
        return Decision(slot, reason, tuple(drift) if drift is not None else ())

    def _keeps_bound(self, fragment: int, last_applied: Sequence[int], apply: int) -> bool:
        """Whether, with `fragment` applied at `apply`, one fragment a slot can still apply every
        fragment within the bound: earliest deadline first meets every deadline iff the i-th
        soonest is at least i slots after the next one."""
        latest = [  # per fragment, the last slot (0: the next one) whose apply keeps its bound
            ((apply if p == fragment else last) + self.max_staleness - apply) // self.slot_len - 1
            for p, last in enumerate(last_applied)
        ]
        return all(slots >= i for i, slots in enumerate(sorted(latest)))

    def _most_urgent(self, last_applied: Sequence[int]) -> int:
        return min(range(self.fragments), key=lambda p: (last_applied[p], p))

    def slot(self, index: int) -> Slot:
        return self.planned[index]

    def send_at(self, step: int) -> Slot | None:
        return next((s for s in self.planned.values() if s.send_step == step), None)

    def apply_at(self, step: int) -> Slot | None:
        return next((s for s in self.planned.values() if s.apply_step == step), None)

    def state_dict(self) -> dict:
        return {"planned": [vars(s) for s in self.planned.values()]}

    def load_state_dict(self, state: dict) -> None:
        self.planned = {s["index"]: Slot(**s) for s in state["planned"]}
