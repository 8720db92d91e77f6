"""Emulated heterogeneous devices: every federated client or split-learning worker draws, once
from the seed, a compute speed (1 = the median device), a link bandwidth (Mbit/s each way, 0
unlimited) and a one-way latency (ms)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cocodc.config import DevicesConfig


@dataclass
class DeviceProfiles:
    speed: list[float]
    bandwidth_mbps: list[float]
    latency_ms: list[float]

    @classmethod
    def draw(cls, count: int, seed: int, devices: DevicesConfig) -> DeviceProfiles:
        rng = np.random.default_rng([seed, 0xD3F1CE])

        def spread(median: float, ratio: float) -> list[float]:
            exponents = rng.uniform(-0.5, 0.5, count)  # drawn even when unused: each draw keeps its place
            return (median * ratio**exponents).tolist()

        return cls(
            spread(1.0, devices.speed_spread),
            spread(devices.bandwidth_mbps, devices.bandwidth_spread),
            spread(devices.latency_ms, devices.latency_spread),
        )
