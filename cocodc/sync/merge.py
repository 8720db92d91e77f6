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


def merge_compensated(
    live_params: list[torch.Tensor],
    global_params: list[torch.Tensor],
    sent_params: list[torch.Tensor],
    dc_lambda: float,
    alpha: float = 0.0,
    normalisers: list[torch.Tensor] | None = None,
) -> None:
    """CoCoDC's delay-compensated merge (DESIGN section 3), element-wise per tensor:

        delta = live - sent                 what the region did while the fragment was in flight
        w     = lambda * delta^2            (constant), or
        w     = clamp(lambda * delta^2 / v, 0, 1)   with v a running mean of delta^2 (adaptive)
        theta = global + delta - w * (global - sent)
        live <- theta + alpha * (live - theta)

    lambda = 0 replays the local progress on top of the new global value; alpha mixes the
    compensated state with the live one (alpha = 0: none of the live state is kept beyond delta).
    """
    with torch.no_grad():
        for index, (live, new, sent) in enumerate(zip(live_params, global_params, sent_params, strict=True)):
            delta = live.float() - sent.float()
            weight = delta.square().mul_(dc_lambda)
            if normalisers is not None:
                weight.div_(normalisers[index].clamp_min(torch.finfo(torch.float32).tiny)).clamp_(0.0, 1.0)
            new32 = new.float()
            theta = new32 + delta - weight * (new32 - sent.float())
            live.copy_(torch.lerp(theta, live.float(), alpha).to(live.dtype))


def update_normalisers(
    normalisers: list[torch.Tensor], live_params: list[torch.Tensor], sent_params: list[torch.Tensor], beta: float
) -> None:
    """v <- beta * v + (1 - beta) * delta^2, element-wise (beta = 0 for the first update)."""
    with torch.no_grad():
        for v, live, sent in zip(normalisers, live_params, sent_params, strict=True):
            v.lerp_((live.float() - sent.float()).square_(), 1.0 - beta)
