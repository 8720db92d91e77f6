"""How a fragment's new global value enters the live parameters of a region."""

from __future__ import annotations

import torch


def pseudo_gradient(global_params: list[torch.Tensor], live_params: list[torch.Tensor]) -> torch.Tensor:
    """theta_g - theta_m, flattened into one fp32 buffer: the payload of one fragment sync."""
    return torch.cat([(g - m.detach()).reshape(-1).float() for g, m in zip(global_params, live_params, strict=True)])


def merge_alpha(live_params: list[torch.Tensor], global_params: list[torch.Tensor], alpha: float) -> None:
    """live <- global + alpha * (live - global), as torch.lerp(global, live, alpha) computes it
    (torchft's order, so results match bit for bit). alpha = 0 is DiLoCo's replace, exactly."""
    with torch.no_grad():
        for live, new in zip(live_params, global_params, strict=True):
            live.copy_(torch.lerp(new.to(live.dtype), live, alpha))
