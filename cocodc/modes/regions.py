"""The regions mode: data-parallel (ddp) or an outer sync (diloco, streaming, cocodc) over the WAN
between regions, DDP inside each region."""

from __future__ import annotations

import contextlib
import math
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cocodc.comm import CommEngine
from cocodc.comm.wan import LinkModel
from cocodc.config import Config
from cocodc.sync import OuterSync
from cocodc.topology import Topology
from cocodc.trainer import Stateful, Trainer


def wan_engine(config: Config, topology: Topology) -> CommEngine:
    """The engine over the WAN: the inter-region group (the world for ddp), with the link model
    when one is configured (a netem-emulated WAN delays the real packets instead)."""
    ddp = config.sync.method == "ddp"
    group = topology.world_group if ddp else topology.inter_group
    region_of = [r // topology.ranks_per_region for r in range(topology.world_size)] if ddp else None
    per_region = topology.ranks_per_region
    members = (
        [f"region {r // per_region} rank {r % per_region}" for r in range(topology.world_size)]
        if ddp and per_region > 1
        else [f"region {m}" for m in range(topology.regions)]
    )
    name = "world" if ddp else "inter-region"
    w, link = config.wan, None
    if w.enabled and w.emulation == "model":
        link = LinkModel.build(
            topology.regions, w.latency_ms, w.bandwidth_mbps, w.jitter_ms, seed=config.seed + topology.rank
        )
        if region_of is not None:
            link = link.for_ranks(region_of)
    return CommEngine(group, link, name=name, members=members, timeout_s=config.topology.timeout_s)


class RegionsMode:
    def __init__(self, config: Config, topology: Topology, model: nn.Module, intra: CommEngine):
        self.config, self.topology = config, topology
        self.method = config.sync.method
        self.wan = wan_engine(config, topology)
        self.outer = OuterSync(model, config.sync, self.wan, intra=intra) if self.method != "ddp" else None
        self.keeps_region_copies = self.outer is not None
        self.parts: dict[str, Stateful] = {"outer": self.outer} if self.outer is not None else {}
        self.train_model = model
        if self.outer is None and topology.world_size > 1:
            self.train_model = DistributedDataParallel(model, process_group=topology.world_group)
            # A lambda: DDP rejects a hook whose annotations are strings (postponed evaluation).
            hook = lambda wan, bucket: wan.all_reduce_mean(bucket.buffer()).future()  # noqa: E731
            self.train_model.register_comm_hook(self.wan, hook)
        elif topology.ranks_per_region > 1:
            self.train_model = DistributedDataParallel(model, process_group=topology.intra_group)

    def step(self, trainer: Trainer) -> tuple[float, float]:
        loss, compute_s = trainer.inner_step(self.train_model, self.wan)
        if not math.isfinite(loss):
            region = trainer.topology.region
            raise FloatingPointError(f"training diverged at step {trainer.step} in region {region}: loss is {loss}")
        return loss, compute_s

    def describe(self) -> str:
        t, c = self.topology, self.config
        return (
            f"{t.regions} regions x {t.ranks_per_region} ranks | {c.train.steps} steps of {t.world_size} x "
            f"{c.train.batch_size} x {c.train.seq_len} tokens"
        )

    def tokens_per_step(self) -> int:
        return self.topology.world_size * self.config.train.batch_size * self.config.train.seq_len

    def summary(self) -> dict[str, Any]:
        return {"regions": self.topology.regions, "ranks_per_region": self.topology.ranks_per_region}

    def after_step(self) -> list[dict[str, Any]]:
        if self.outer is None:
            return []
        self.outer.step()
        return self.outer.pop_records()

    def finish(self) -> list[dict[str, Any]]:
        if self.outer is None:
            return []
        self.outer.finish()
        return self.outer.pop_records()

    def global_view(self) -> contextlib.AbstractContextManager[None]:
        return self.outer.global_parameters() if self.outer is not None else contextlib.nullcontext()

    def rescue_state(self) -> dict[str, Any]:
        """The global copy as of the last applied sync: the same on every region."""
        return {"global_params": self.outer.global_params} if self.outer is not None else {}
