"""The regions mode: data-parallel (ddp) or an outer sync (diloco, streaming, cocodc) over the WAN
between regions, DDP or FSDP2 inside each region (parallel.py). With `ft.enabled`, the regions take part in each sync as
torchft's quorum says (cocodc/ft.py), and a region that comes back heals from a peer."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from torch import nn

from cocodc.comm import CommEngine, CommError
from cocodc.comm.wan import LinkModel
from cocodc.config import Config
from cocodc.modes.faults import FAULTS_ENV, parse_faults
from cocodc.parallel import (
    data_parallel,
    load_local_optimizer_state,
    local_optimizer_state,
    replicate_region,
    shard_region,
)
from cocodc.sync import OuterSync
from cocodc.topology import RESTART_ENV, Topology
from cocodc.trainer import Stateful, Trainer

if TYPE_CHECKING:
    from cocodc.ft import RegionQuorum


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
    timing = {"timeout_s": config.topology.timeout_s, "expected_link": LinkModel.slowest(config.wan, topology.regions)}
    if config.ft.enabled:  # over torchft's group, bound at the first quorum
        return CommEngine(None, name=name, **timing)
    link = LinkModel.of_config(config.wan, topology.regions, seed=config.seed + topology.rank)
    if link is not None and region_of is not None:
        link = link.for_ranks(region_of)
    return CommEngine(group, link, name=name, members=members, **timing)


def check_layout(mine: dict[str, Any], peer: dict[str, Any], region: int) -> None:
    """That a peer's state (`peer`: its layout) fits this rank's; else a one-line CommError."""
    if mine != peer:
        raise CommError(
            f"region {region} cannot heal from a peer laid out as {_shown(peer)} (this rank: {_shown(mine)}): "
            "every region must run the same topology.parallel and topology.ranks_per_region"
        )


def _shown(layout: dict[str, Any]) -> str:
    return f"{layout['parallel']} over {layout['ranks_per_region']} ranks, rank {layout['rank']}"


class RegionsMode:
    def __init__(self, config: Config, topology: Topology, model: nn.Module, intra: CommEngine):
        self.config, self.topology = config, topology
        self.method = config.sync.method
        self.wan = wan_engine(config, topology)
        self.quorum: RegionQuorum | None = None
        if config.ft.enabled:
            from cocodc.ft import RegionQuorum  # torchft: only with ft

            self.quorum = RegionQuorum(config, topology, self._heal_state, self._heal)
        self.trainer: Trainer | None = None
        self.changes: list[dict[str, Any]] = []  # membership changes this region saw (ft)
        self.dropped = 0  # syncs this region dropped (ft)
        shard_region(model, config, topology)
        self.outer = (
            OuterSync(model, config.sync, self.wan, intra=intra, quorum=self.quorum) if self.method != "ddp" else None
        )
        self._skip = 0  # batches of this region's shard a heal moved it past
        first_life = int(os.environ.get(RESTART_ENV, 0)) == 0
        drill = os.environ.get(FAULTS_ENV, "") if config.ft.enabled and first_life else ""
        kill = parse_faults(drill, {"sigkill": True}).get(topology.region)
        self.kill_at = kill[1] if kill is not None else None
        self.keeps_region_copies = self.outer is not None
        self.parts: dict[str, Stateful] = {"outer": self.outer} if self.outer is not None else {}
        if self.quorum is not None:
            self.parts["quorum"] = self.quorum  # the commit count: who is behind after a resume
        self.train_model = model
        if self.outer is None and topology.world_size > 1:
            self.train_model = data_parallel(model, self.wan)
        elif self.outer is not None:
            self.train_model = replicate_region(model, config, topology, intra)

    def state_bytes(self) -> dict[str, int]:
        if self.outer is None:
            return {}
        return {**self.outer.state_bytes(), "in_flight_peak": self.outer.in_flight_peak}

    def step(self, trainer: Trainer) -> tuple[float, float]:
        loss, compute_s = trainer.inner_step(self.train_model, self.wan)
        if not math.isfinite(loss):
            region = trainer.topology.region
            raise FloatingPointError(f"training diverged at step {trainer.step} in region {region}: loss is {loss}")
        return loss, compute_s

    def join(self, trainer: Trainer) -> None:
        """The outer sync learns the inner optimizer (CoCoDC's weight reads its second moment).
        ft: the first quorum. A fresh run waits for every region; a region torchrun restarted (or
        one resumed behind the others) joins them where they are, healed from one of them."""
        if self.outer is not None:
            self.outer.use_optimizer(trainer.optimizer)
        if self.quorum is None:
            return
        self.trainer = trainer
        restarted = int(os.environ.get(RESTART_ENV, 0)) > 0
        if restarted:
            # Its old life must be out of the quorum before the new one asks: with both in the
            # lighthouse's view, the others were seen to split into quorums of different steps.
            time.sleep(self.config.ft.heartbeat_timeout_s)
        healed = self.outer.join(at_least=1 if restarted else self.topology.regions)
        trainer.metrics.records(self._seen(self.outer.pop_records()))
        if healed:
            trainer.data.loader.skip(self._skip)  # now, not in the heal: the peers wait for its sends there
        elif restarted:
            raise CommError(
                f"region {self.topology.region} was restarted, but no live region was ahead of it to heal from "
                "(the others have finished or failed); continue the run with --resume"
            )
        else:
            # The start counts as a committed sync, so a region restarted at any later point is
            # behind every live one and heals, whenever it died.
            self.quorum.commit(None)

    def _heal_state(self) -> dict[str, Any]:
        """What a region healing from this one takes (asked on torchft's thread while this region
        waits for the quorum, which returns once the healing region has received it all)."""
        t = self.trainer
        return {
            "layout": self.layout(),
            "step": t.step,
            "outer": self.outer.state_dict(in_flight=False),
            "optimizer": local_optimizer_state(t.optimizer),
            "totals": t.totals.state_dict(),
        }

    def layout(self) -> dict[str, Any]:
        """How this rank holds its state: rank i of a region heals from rank i of a peer, so the
        two must hold the same shards."""
        t = self.topology
        return {
            "parallel": self.config.topology.parallel,
            "ranks_per_region": t.ranks_per_region,
            "rank": t.local_index,
        }

    def _heal(self, state: dict[str, Any]) -> None:
        """Take a peer's state: its global copy, outer and schedule state, inner optimizer and step;
        the live parameters start from the global copy, this region's shard where its step is."""
        t = self.trainer
        check_layout(self.layout(), state["layout"], self.topology.region)
        self.outer.load_state_dict(state["outer"])
        self.outer.take_global()
        load_local_optimizer_state(t.optimizer, state["optimizer"])
        t.totals.load_state_dict(state["totals"])
        self._skip = int(state["step"]) - t.step
        t.step = t.start_step = int(state["step"])

    def _seen(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Count what the summary reports of membership (ft)."""
        for record in records:
            if record["kind"] == "membership":
                self.changes.append({k: record[k] for k in ("step", "regions", "joined", "left", "healed")})
            self.dropped += record["kind"] == "dropped"
        return records

    def describe(self) -> str:
        t, c = self.topology, self.config
        return (
            f"{t.regions} regions x {t.ranks_per_region} ranks | {c.train.steps} steps of {t.world_size} x "
            f"{c.train.batch_size} x {c.train.seq_len} tokens"
            + (f" x {c.train.grad_accum} micro-batches" if c.train.grad_accum > 1 else "")
        )

    def tokens_per_step(self) -> int:
        t = self.config.train
        return self.topology.world_size * t.batch_size * t.grad_accum * t.seq_len

    def summary(self) -> dict[str, Any]:
        shape = {"regions": self.topology.regions, "ranks_per_region": self.topology.ranks_per_region}
        if self.quorum is None:
            return shape
        at_end = self.outer.regions
        return {
            **shape,
            "ft": {
                "region": self.topology.region,
                "regions_at_end": at_end,
                "lost": [r for r in range(self.topology.regions) if r not in at_end],
                "membership_changes": self.changes,
                "dropped_syncs": self.dropped,
            },
        }

    def after_step(self) -> list[dict[str, Any]]:
        if self.outer is None:
            return []
        self.outer.step()
        if self.outer.inner_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return self._seen(self.outer.pop_records())

    def finish(self) -> list[dict[str, Any]]:
        if self.outer is None:
            return []
        self.outer.finish()
        records = self._seen(self.outer.pop_records())
        if self.quorum is not None:
            self.quorum.shutdown()
        return records

    def global_view(self) -> contextlib.AbstractContextManager[None]:
        return self.outer.global_parameters() if self.outer is not None else contextlib.nullcontext()

    def rescue_state(self) -> dict[str, Any]:
        """The global copy as of the last applied sync: the same on every region."""
        return {"global_params": self.outer.global_params} if self.outer is not None else {}
