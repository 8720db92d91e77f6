"""Every region's own state in one state dict, for checkpointers that write from one process.

accelerate's `save_state` writes registered objects from the main process only: right for
data-parallel replicas, wrong for regions, each of which holds its own live model, inner
optimizer, outer state and data position. `RegionState` gathers every region's parts into the
state dict the main process writes, and on load each process takes its own region's back.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


class RegionState:
    def __init__(self, parts: dict[str, Any], group: dist.ProcessGroup | None = None):
        """`parts`: this process's objects with `state_dict`/`load_state_dict`, by name; `group`:
        one process per region (None: the world)."""
        self.parts, self.group = parts, group
        self.region = dist.get_rank(group)

    def state_dict(self) -> dict[str, Any]:
        """Every region's parts, by region (a collective: every process must call it)."""
        mine = {name: part.state_dict() for name, part in self.parts.items()}
        every: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(every, mine, group=self.group)
        return {"regions": every}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state["regions"][self.region][name])
