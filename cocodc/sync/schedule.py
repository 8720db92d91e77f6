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
    part: int = 0  # the adaptive schedule's extra fragments in one slot (`link_share`): 1, 2, ...

    @property
    def key(self) -> tuple[int, int]:
        return (self.index, self.part)


class RoundRobinSchedule:
    def __init__(self, sync_every: int, fragments: int, delay: int):
        if sync_every % fragments:
            raise ValueError(f"sync_every ({sync_every}) must be a multiple of fragments ({fragments})")
        if not 0 <= delay < sync_every:
            raise ValueError(f"delay ({delay}) must lie in [0, sync_every={sync_every})")
        self.fragments, self.delay = fragments, delay
        self.slot_len = sync_every // fragments

    def slot(self, index: int, part: int = 0) -> Slot:
        end = index * self.slot_len
        return Slot(index, (index - 1) % self.fragments, end - self.delay, end)

    def sends_at(self, step: int) -> list[Slot]:
        index, rest = divmod(step + self.delay, self.slot_len)
        return [self.slot(index)] if rest == 0 and index >= 1 and step >= 1 else []

    def applies_at(self, step: int) -> list[Slot]:
        index, rest = divmod(step, self.slot_len)
        if rest or index < 1:
            return []
        slot = self.slot(index)
        return [slot] if slot.send_step >= 1 else []


@dataclass(frozen=True)
class Decision:
    slots: tuple[Slot, ...]  # the slot's fragment, then those the idle link carries as well
    reason: str  # the first's: "round-robin" (no numbers yet), "drift" or "stale"; the others' "capacity"
    drift: tuple[float, ...]


class AdaptiveSchedule:
    """CoCoDC's adaptive transmission on the slot grid of RoundRobinSchedule.

    Slot j is decided when slot j - L begins (after inner step (j - L - 1)K + 1; L = delay // K,
    the slots a send may run ahead of its own), from numbers every rank holds identically: when
    each fragment was last applied, the slots already planned, and the region-averaged drift of
    every fragment, step time and transfer time that rode along in the last applied fragment
    collective (measured at its send step). The slot syncs the fragment with the largest drift
    among those not already planned (in flight, or about to be); a fragment applied after its
    drift was measured has moved on since, so its drift counts as 0 (the fragment just applied
    is never picked again on old numbers). The staleness bound holds at every apply: the wanted
    fragment goes only if every fragment can still be applied within `max_staleness` steps of its
    last apply afterwards (one a slot, earliest deadline first, counting the planned slots);
    else the longest-unsynced goes. The bound must be at least H, the time round-robin needs.
    The slot's tau is the smallest number of steps that covers the transfer (with a margin),
    within [1, (L + 1)K - 1], so the send never precedes the decision: with L = 0 at most one
    fragment is in flight, with L = P - 1 tau reaches H - 1. Until numbers arrive, slots go
    round-robin with tau = `delay`; a slot whose send would precede step 1 is skipped.
    """

    def __init__(
        self,
        sync_every: int,
        fragments: int,
        delay: int,
        max_staleness: int = 0,
        margin: float = 1.25,
        link_share: float = 0.0,
    ):
        if sync_every % fragments or sync_every // fragments < 2:
            raise ValueError(f"the adaptive schedule needs slots of 2+ steps: sync_every ({sync_every}) / "
                             f"fragments ({fragments}) must be an integer of at least 2")  # fmt: skip
        if not 0 <= delay < sync_every:
            raise ValueError(f"delay ({delay}) must lie in [0, sync_every={sync_every})")
        if max_staleness and max_staleness < sync_every:
            raise ValueError(f"max_staleness ({max_staleness}) must be at least sync_every ({sync_every}): "
                             "one fragment a slot syncs each fragment every sync_every steps at best")  # fmt: skip
        self.fragments = fragments
        self.slot_len = sync_every // fragments
        self.lookahead = delay // self.slot_len
        self.delay = max(delay, 1)
        self.max_tau = (self.lookahead + 1) * self.slot_len - 1
        self.max_staleness = max_staleness or 2 * sync_every
        self.margin = margin
        self.link_share = link_share
        self.planned: dict[tuple[int, int], Slot] = {}

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
        step the drift was measured at). Called when slot `index - lookahead` begins."""
        apply = index * self.slot_len
        now = max(apply - self.max_tau - 1, 0)  # the step after which this decision is taken
        self.planned = {k: s for k, s in self.planned.items() if s.apply_step > now}
        landed = list(last_applied)  # when each fragment will have been applied before this slot's apply
        busy = set()
        for pending in self.planned.values():
            if pending.index < index and pending.send_step >= 1:
                landed[pending.fragment] = pending.apply_step
                busy.add(pending.fragment)
        free = [p for p in range(self.fragments) if p not in busy]
        current = {p: drift[p] if drift is not None and last_applied[p] < measured_at else 0.0 for p in free}
        if drift is not None:
            wanted = max(free, key=lambda p: (current[p], -landed[p], -p))
            reason = "drift"
        else:  # round-robin, passing over the fragments already planned
            rotation = [(index - 1 + k) % self.fragments for k in range(self.fragments)]
            wanted, reason = next(p for p in rotation if p not in busy), "round-robin"
        fragment = wanted if self._keeps_bound(wanted, landed, apply) else self._most_urgent(landed, free)
        if fragment != wanted:
            reason = "stale"
        chosen = [fragment]
        measured = step_s > 0 and transfer_s > 0
        if step_s > 0 and self.link_share > 0:
            # The link carries transfer_s of work a fragment (0: the transfers took no time); a slot
            # lasts slot_len steps, of which the outer sync may fill `link_share`. What fits more
            # goes too, largest drift first (only fragments that drifted since their numbers).
            room = self.link_share * self.slot_len * step_s
            fits = math.floor(room / transfer_s) if transfer_s > 0 else self.fragments
            others = sorted((p for p in free if p != fragment and current[p] > 0), key=lambda p: (-current[p], p))
            chosen += others[: max(fits - 1, 0)]
        delay = min(self.delay, self.max_tau)
        if measured:  # the chosen fragments share the link
            delay = min(max(math.ceil(self.margin * len(chosen) * transfer_s / step_s), 1), self.max_tau)
        slots = tuple(Slot(index, p, apply - delay, apply, part) for part, p in enumerate(chosen))
        for slot in slots:
            self.planned[slot.key] = slot
        return Decision(slots, reason, tuple(drift) if drift is not None else ())

    def _keeps_bound(self, fragment: int, last_applied: Sequence[int], apply: int) -> bool:
        """Whether, with `fragment` applied at `apply`, one fragment a slot can still apply every
        fragment within the bound: earliest deadline first meets every deadline iff the i-th
        soonest is at least i slots after the next one."""
        latest = [  # per fragment, the last slot (0: the next one) whose apply keeps its bound
            ((apply if p == fragment else last) + self.max_staleness - apply) // self.slot_len - 1
            for p, last in enumerate(last_applied)
        ]
        return all(slots >= i for i, slots in enumerate(sorted(latest)))

    def _most_urgent(self, last_applied: Sequence[int], free: Sequence[int]) -> int:
        return min(free, key=lambda p: (last_applied[p], p))

    def slot(self, index: int, part: int = 0) -> Slot:
        return self.planned[index, part]

    def sends_at(self, step: int) -> list[Slot]:
        return [s for s in self.planned.values() if s.send_step == step]

    def applies_at(self, step: int) -> list[Slot]:
        return [s for s in self.planned.values() if s.apply_step == step and s.send_step >= 1]

    def state_dict(self) -> dict:
        return {"planned": [vars(s) for s in self.planned.values()]}

    def load_state_dict(self, state: dict) -> None:
        self.planned = {(s["index"], s.get("part", 0)): Slot(**s) for s in state["planned"]}
