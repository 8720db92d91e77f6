"""A fragment's tensors in flat buffers, so a sync is whole-buffer passes with no concatenate or split.

Whole parameters are re-pointed into one buffer per fragment (`param.data` becomes a view; the
Parameter objects, and so the inner optimizer's references to them, stay), and the global copy,
outer momentum, normaliser and theta_send are fp32 buffers of the same layout. The global buffer
keeps `tail` more fp32 slots after the values: numbers that ride along with the fragment's
collective, so [values | tail] goes out as one contiguous tensor.

Sharded parameters (DTensors, FSDP2) are never re-pointed: FSDP owns their storage. The flat
buffers then cover this rank's local shards only, and the live values are copied out of and back
into the shards around a sync (`read_live` / `write_live`), a transient buffer of the local size.

With `host`, the fp32 buffers live in host memory (pinned where the parameters are on CUDA) and the
outer sync runs its math there: the device keeps no outer state, at the price of moving a fragment's
live values to the host and back at each sync.
"""

from __future__ import annotations

import torch

from cocodc.sync.fragments import Fragment


class FlatFragment:
    def __init__(
        self, fragment: Fragment, *, momentum: bool, normaliser: bool, sent: bool, tail: int = 0, host: bool = False
    ):
        params = fragment.params
        # A DTensor's local shard; duck-typed so that sync/ stays free of torch.distributed.
        self.sharded = any(hasattr(p, "to_local") for p in params)
        self.shards = [p.to_local() if hasattr(p, "to_local") else p for p in params]
        dtypes, devices = {t.dtype for t in self.shards}, {t.device for t in self.shards}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                f"fragment {fragment.index} mixes dtypes or devices ({sorted(map(str, dtypes | devices))}); "
                "its parameters share one flat buffer"
            )
        self.index, self.params, self.names = fragment.index, params, fragment.names
        self.sizes = [t.numel() for t in self.shards]
        self.numel = sum(self.sizes)  # on this rank
        self.full_numel = fragment.numel  # of the whole fragment, over the region's shards
        (dtype,), (device,) = dtypes, devices
        self.device = device  # the live parameters'
        self.home = torch.device("cpu") if host else device  # the outer state's
        self.live: torch.Tensor | None = None  # whole parameters: the buffer they are views of
        if not self.sharded:
            self.live = torch.empty(self.numel, dtype=dtype, device=device)
            with torch.no_grad():
                for param, view in zip(params, self.views(self.live), strict=True):
                    view.copy_(param)
                    param.data = view
        self._pointers = self._shard_pointers()
        pinned = self.home != device and device.type == "cuda"
        self.with_tail = torch.zeros(self.numel + tail, dtype=torch.float32, device=self.home, pin_memory=pinned)
        self.global_ = self.with_tail[: self.numel]
        self.global_.copy_(self.read_live())
        self.tail = self.with_tail[self.numel :]
        self.momentum = torch.zeros_like(self.global_, pin_memory=pinned) if momentum else None
        self.normaliser = torch.zeros_like(self.global_, pin_memory=pinned) if normaliser else None
        self.sent = torch.zeros_like(self.global_, pin_memory=pinned) if sent else None

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """`flat` cut into the fragment's (local) parameter shapes (views, no copy)."""
        return [v.view_as(t) for v, t in zip(flat.split(self.sizes), self.shards, strict=True)]

    def named_views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.views(flat), strict=True))

    def read_live(self) -> torch.Tensor:
        """The live values in the flat layout: the buffer itself for whole parameters (writes to it
        land in the model), a copy of the local shards for sharded ones."""
        if self.live is not None:
            return self.live
        return torch.cat([t.detach().reshape(-1) for t in self.shards])

    def read_live_home(self) -> torch.Tensor:
        """The live values where the outer state lives (a copy on the host with `host`)."""
        return self.read_live().to(self.home)

    def write_live(self, values: torch.Tensor) -> None:
        """The live parameters take `values` (flat layout)."""
        with torch.no_grad():
            if self.live is not None:
                if values is not self.live:
                    self.live.copy_(values)
                return
            for shard, view in zip(self.shards, self.views(values), strict=True):
                shard.copy_(view)

    def _shard_pointers(self) -> list[int]:
        return [(p.to_local() if hasattr(p, "to_local") else p).data_ptr() for p in self.params]

    def check_bound(self) -> None:
        """The parameters still live where the sync reads them (a model moved after OuterSync was
        built would silently train tensors the sync never sees)."""
        if self._shard_pointers() != self._pointers:
            raise RuntimeError(
                f"fragment {self.index}'s parameters were re-allocated after OuterSync was built (model.to(), "
                "a new .data): build OuterSync after the model is on its device"
            )
