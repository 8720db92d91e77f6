"""The torch reference of the outer step and the merge: how a fragment's new global value enters
the live parameters of a region. It runs off CUDA (or with `train.kernels: torch`) and defines
what the fused kernel (`triton_ops.outer_apply`) computes; the codecs' reference is
`cocodc.comm.codec`."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def outer_sgd_step(
    params: torch.Tensor,
    momentum: torch.Tensor | None,
    grad: torch.Tensor,
    lr: float,
    mu: float,
    nesterov: bool,
    first: bool,
) -> None:
    """torch.optim.SGD's step (no dampening or weight decay), op for op, on one flat tensor: the
    momentum buffer starts as the gradient (`first`) and then is mu * buf + grad; Nesterov steps
    along grad + mu * buf. `momentum` None: plain SGD."""
    with torch.no_grad():
        step = grad
        if momentum is not None:
            if first:
                momentum.copy_(grad)
            else:
                momentum.mul_(mu).add_(grad)
            step = grad.add(momentum, alpha=mu) if nesterov else momentum
        params.add_(step, alpha=-lr)


def merge_alpha(live_params: list[torch.Tensor], global_params: list[torch.Tensor], alpha: float) -> None:
    """live <- global + alpha * (live - global), as torch.lerp(global, live, alpha) computes it
    (torchft's order, so results match bit for bit). alpha = 0 is DiLoCo's replace, exactly."""
    with torch.no_grad():
        for live, new in zip(live_params, global_params, strict=True):
            live.copy_(torch.lerp(new.to(live.dtype), live, alpha))


# The cap on w of the per-tensor and AdamW rules: at w = 1 an element's outer update would be thrown away.
W_MAX = 0.9


def merge_compensated(
    live_params: list[torch.Tensor],
    global_params: list[torch.Tensor],
    sent_params: list[torch.Tensor],
    dc_lambda: float,
    alpha: float = 0.0,
    normalisers: list[torch.Tensor] | None = None,
    per_tensor: bool = False,
    curvature: list[torch.Tensor] | None = None,
) -> tuple[float, float]:
    """CoCoDC's delay-compensated merge (DESIGN section 3), element-wise per tensor:

        delta = live - sent                 what the region did while the fragment was in flight
        w     = lambda * delta^2            (constant), or normalised (adaptive):
        w     = clamp(lambda * delta^2 / v, 0, 1)      v a running mean of delta^2 (`normalisers`), or
        w     = min(lambda * delta^2 / mean(delta^2), 0.9)   per tensor, this apply's (`per_tensor`), or
        w     = min(lambda * c, 0.9)               c given per element (`curvature`: see OuterSync)
        theta = global + delta - w * (global - sent)
        live <- theta + alpha * (live - theta)

    lambda = 0 replays the local progress on top of the new global value; alpha mixes the
    compensated state with the live one (alpha = 0: none of the live state is kept beyond delta).
    The per-tensor form is scale-free at every apply: a tensor whose elements all moved alike
    gets w = lambda. Returns w's mean and the fraction of elements at the cap, over the fragment.
    """
    sums, count = [], 0  # per tensor: w's sum and the elements at the cap, on the device until the end
    tiny = torch.finfo(torch.float32).tiny
    with torch.no_grad():
        for index, (live, new, sent) in enumerate(zip(live_params, global_params, sent_params, strict=True)):
            delta = live.float() - sent.float()
            weight = curvature[index] * dc_lambda if curvature is not None else delta.square().mul_(dc_lambda)
            cap = None
            if curvature is not None:
                cap = W_MAX
            elif per_tensor:
                weight.div_(delta.square().mean().clamp_min(tiny))
                cap = W_MAX
            elif normalisers is not None:
                weight.div_(normalisers[index].clamp_min(tiny)).clamp_(min=0.0)
                cap = 1.0
            at_cap = (weight >= cap).sum().float() if cap is not None else weight.new_zeros(())
            if cap is not None:
                weight.clamp_(max=cap)
            sums.append(torch.stack([weight.sum(), at_cap]))
            count += weight.numel()
            new32 = new.float()
            theta = new32 + delta - weight * (new32 - sent.float())
            live.copy_(torch.lerp(theta, live.float(), alpha).to(live.dtype))
    w_sum, capped = torch.stack(sums).sum(dim=0).tolist() if sums else (0.0, 0.0)
    return w_sum / max(count, 1), capped / max(count, 1)


def update_normalisers(
    normalisers: list[torch.Tensor], live_params: list[torch.Tensor], sent_params: list[torch.Tensor], beta: float
) -> None:
    """v <- beta * v + (1 - beta) * delta^2, element-wise (beta = 0 for the first update)."""
    with torch.no_grad():
        for v, live, sent in zip(normalisers, live_params, sent_params, strict=True):
            v.lerp_((live.float() - sent.float()).square_(), 1.0 - beta)


def outer_apply(
    grad: torch.Tensor,
    global_: torch.Tensor,
    momentum: torch.Tensor | None,
    live: torch.Tensor,
    *,
    lr: float,
    mu: float,
    nesterov: bool,
    first: bool,
    merge: str,
    alpha: float = 0.0,
    sent: torch.Tensor | None = None,
    dc_lambda: float = 0.0,
    normaliser: torch.Tensor | None = None,
    beta: float = 0.0,
    per_tensor: Sequence[int] | None = None,
    curvature: torch.Tensor | None = None,
) -> tuple[float, float]:
    """`cocodc.kernels.outer_apply`'s reference (see there)."""
    outer_sgd_step(global_, momentum, grad, lr, mu, nesterov, first)
    if merge == "replace":
        with torch.no_grad():
            live.copy_(global_)
        return 0.0, 0.0
    if merge == "lerp":
        merge_alpha([live], [global_], alpha)
        return 0.0, 0.0
    if normaliser is not None:
        update_normalisers([normaliser], [live], [sent], beta)
    sizes = list(per_tensor) if per_tensor is not None else [live.numel()]
    split = [t.split(sizes) for t in (live, global_, sent)]
    normalisers = [normaliser] if normaliser is not None else None
    curvatures = list(curvature.split(sizes)) if curvature is not None else None
    return merge_compensated(*split, dc_lambda, alpha, normalisers, per_tensor is not None, curvatures)
