"""A fragment's tensors in flat buffers, so a sync is whole-buffer passes with no concatenate or split.

The live parameters are re-pointed into one buffer per fragment (`param.data` becomes a view; the
Parameter objects, and so the inner optimizer's references to them, stay), and the global copy,
outer momentum, normaliser and theta_send are fp32 buffers of the same layout. The global buffer
keeps `tail` more fp32 slots after the values: numbers that ride along with the fragment's
collective, so [values | tail] goes out as one contiguous tensor.
"""

from __future__ import annotations

import torch

from cocodc.sync.fragments import Fragment


class FlatFragment:
    def __init__(self, fragment: Fragment, *, momentum: bool, normaliser: bool, sent: bool, tail: int = 0):
        params = fragment.params
        dtypes, devices = {p.dtype for p in params}, {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                f"fragment {fragment.index} mixes dtypes or devices ({sorted(map(str, dtypes | devices))}); "
                "its parameters share one flat buffer"
            )
        self.index, self.params = fragment.index, params
        self.sizes = [p.numel() for p in params]
        self.numel = sum(self.sizes)
        (dtype,), (device,) = dtypes, devices
        self.live = torch.empty(self.numel, dtype=dtype, device=device)
        with torch.no_grad():
            for param, view in zip(params, self.views(self.live), strict=True):
                view.copy_(param)
                param.data = view
        self._pointers = [p.data_ptr() for p in params]
        self.with_tail = torch.zeros(self.numel + tail, dtype=torch.float32, device=device)
        self.global_ = self.with_tail[: self.numel]
        self.global_.copy_(self.live)
        self.tail = self.with_tail[self.numel :]
        self.momentum = torch.zeros_like(self.global_) if momentum else None
        self.normaliser = torch.zeros_like(self.global_) if normaliser else None
        self.sent = torch.zeros_like(self.global_) if sent else None

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """`flat` cut into the fragment's parameter shapes (views, no copy)."""
        return [v.view_as(p) for v, p in zip(flat.split(self.sizes), self.params, strict=True)]

    def check_bound(self) -> None:
        """The parameters still live in the flat buffer (a model moved after OuterSync was built
        would silently train tensors the sync never sees)."""
        if [p.data_ptr() for p in self.params] != self._pointers:
            raise RuntimeError(
                f"fragment {self.index}'s parameters were re-allocated after OuterSync was built (model.to(), "
                "a new .data): build OuterSync after the model is on its device"
            )
