"""Federated server strategies (FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad) on flat fp32 tensors.

The numerics follow Flower 1.41.0's legacy strategies (flwr.server.strategy), which the tests check
round by round: the pseudo-gradient is delta = mean(client weights) - current, m and v start at zero
on the first step, FedAdam's bias correction uses the power server_round + 1, FedYogi has none, and
FedAdagrad has no momentum (its m is delta itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")

# Flower's constructor defaults for the server optimizer; `lr` is Flower's eta (eta_l is the clients').
FLOWER_DEFAULTS: dict[str, dict[str, float]] = {
    "fedavg": {},
    "fedprox": {},
    "fedadam": {"lr": 1e-1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-9},
    "fedyogi": {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedadagrad": {"lr": 1e-1, "tau": 1e-9},
}


def weighted_mean(updates: Sequence[torch.Tensor], examples: Sequence[int]) -> torch.Tensor:
    """sum(n_i * x_i) / sum(n_i) over flat tensors, accumulated in fp32 (Flower's `aggregate`)."""
    if not updates:
        raise ValueError("weighted_mean of no updates")
    if len(updates) != len(examples):
        raise ValueError(f"{len(updates)} updates but {len(examples)} example counts")
    if any(n < 0 for n in examples):
        raise ValueError(f"negative example count in {list(examples)}")
    total = sum(examples)
    if total == 0:
        raise ValueError("weighted_mean with a total of zero examples")
    out = torch.zeros_like(updates[0], dtype=torch.float32)
    for update, n in zip(updates, examples, strict=True):
        out.add_(update.float(), alpha=n)
    return out.div_(total)


class ServerStrategy:
    """FedAvg on the server, which FedProx shares: the new global value is current + mean_update."""

    def __init__(self, name: str = "fedavg") -> None:
        self.name = name

    def step(self, current: torch.Tensor, mean_update: torch.Tensor, server_round: int) -> torch.Tensor:
        """The new global flat fp32 tensor; mean_update = weighted mean of (client weights - current)."""
        return current.float() + mean_update.float()

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state of strategy {state.get('name')!r} loaded into {self.name!r}")


class AdaptiveStrategy(ServerStrategy):
    """FedAdam, FedYogi and FedAdagrad (Reddi et al., 2020, as Flower implements them):

        m <- beta1 * m + (1 - beta1) * delta            (FedAdagrad: m = delta)
        v <- beta2 * v + (1 - beta2) * delta^2          FedAdam
        v <- v - (1 - beta2) * delta^2 * sign(v - delta^2)   FedYogi
        v <- v + delta^2                                FedAdagrad
        new = current + eta * m / (sqrt(v) + tau)

    with FedAdam's eta = lr * sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)), t = server_round.
    """

    def __init__(self, name: str, *, lr: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__(name)
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def step(self, current: torch.Tensor, mean_update: torch.Tensor, server_round: int) -> torch.Tensor:
        if server_round < 1:
            raise ValueError(f"server_round is 1-based, got {server_round}")
        delta = mean_update.float()
        if self.v is None:
            self.v = torch.zeros_like(delta)
            if self.name != "fedadagrad":
                self.m = torch.zeros_like(delta)
        elif self.v.shape != delta.shape:
            raise ValueError(f"{self.name} state has shape {tuple(self.v.shape)}, the update {tuple(delta.shape)}")
        elif self.v.device != delta.device:  # state restored from a checkpoint loaded to another device
            self.v = self.v.to(delta.device)
            self.m = None if self.m is None else self.m.to(delta.device)
        if self.name == "fedadagrad":
            m = delta
            self.v.addcmul_(delta, delta)
        else:
            m = self.m.mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
            square = delta * delta
            if self.name == "fedadam":
                self.v.mul_(self.beta2).add_(square, alpha=1.0 - self.beta2)
            else:
                self.v.addcmul_(square, torch.sign(self.v - square), value=-(1.0 - self.beta2))
        eta = self.lr
        if self.name == "fedadam":
            # Flower's power is server_round + 1, one more than Adam's step count.
            power = server_round + 1.0
            eta = self.lr * math.sqrt(1.0 - self.beta2**power) / (1.0 - self.beta1**power)
        return current.float() + eta * m / (self.v.sqrt() + self.tau)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.m = None if state["m"] is None else state["m"].detach().clone().float()
        self.v = None if state["v"] is None else state["v"].detach().clone().float()


def build_strategy(
    name: str,
    *,
    lr: float | None = None,
    beta1: float | None = None,
    beta2: float | None = None,
    tau: float | None = None,
) -> ServerStrategy:
    """The named server strategy; an option left None takes Flower's default. Setting an option
    the strategy does not have (any on fedavg/fedprox, beta1/beta2 on fedadagrad) is an error."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown federated strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
    given = {"lr": lr, "beta1": beta1, "beta2": beta2, "tau": tau}
    defaults = FLOWER_DEFAULTS[name]
    extra = sorted(k for k, value in given.items() if value is not None and k not in defaults)
    if extra:
        raise ValueError(f"strategy {name!r} has no option {', '.join(extra)}")
    if not defaults:
        return ServerStrategy(name)
    settings = {k: defaults.get(k, 0.0) if value is None else float(value) for k, value in given.items()}
    return AdaptiveStrategy(name, **settings)


def proximal_term(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's client loss term mu/2 * sum_i ||w_i - w_global_i||^2, in fp32; the anchor gets no gradient."""
    if len(params) != len(anchor):
        raise ValueError(f"{len(params)} parameters but {len(anchor)} anchor tensors")
    if not params:
        raise ValueError("proximal_term of no parameters")
    total = sum((w.float() - a.detach().float()).square().sum() for w, a in zip(params, anchor, strict=True))
    return total * (mu / 2.0)
