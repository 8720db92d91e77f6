"""Which fragment syncs when (DESIGN section 3; compatible with torchft's Streaming DiLoCo).

Slot j = 1, 2, ... ends at inner step j*K (K = H / P) and syncs fragment (j - 1) mod P: its send
follows inner step j*K - tau and its apply follows inner step j*K. A slot whose send would come
before step 1 is skipped.
"""

from __future__ import annotations

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
