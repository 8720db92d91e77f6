"""Regions x ranks per region -> the process groups of DESIGN section 2.

Rank r belongs to region r // R and has local index r % R. The intra-region group holds the R
ranks of one region (fast link, DDP); the inter-region group holds the M ranks that share a local
index, one per region (the slow WAN link).

With `ft.enabled`, each region is a torchrun job of its own (its region number in
`COCODC_REGION`): the job's group is the region's, and the inter-region group is torchft's,
rebuilt at every quorum (cocodc/ft.py); `inter_group` is None here.

Setup (the run directory, the tokenizer) runs over the default group with the usual 10-minute
timeout; the groups training uses time out after `topology.timeout_s`, so a lost or silent peer
surfaces as an error within that bound rather than a hang.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from cocodc.config import Config, ConfigError

REGION_ENV = "COCODC_REGION"  # with ft: the region whose job this process belongs to
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"  # torchrun's: how often it restarted this job's workers
REPORTED_EXIT = 2  # the exit code of a rank that said what went wrong in its own `cocodc: error:` line


@dataclass
class Topology:
    rank: int
    world_size: int
    regions: int
    ranks_per_region: int
    device: torch.device
    setup_group: dist.ProcessGroup
    world_group: dist.ProcessGroup
    intra_group: dist.ProcessGroup
    inter_group: dist.ProcessGroup | None
    job_rank: int  # in this torchrun job: the world, or with ft the region
    # checkpoint.async_save: gloo groups of the region's ranks and of the job's, for the background
    # thread's collectives (a group is not shared between threads).
    save_groups: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None

    @property
    def region(self) -> int:
        return self.rank // self.ranks_per_region

    @property
    def local_index(self) -> int:
        return self.rank % self.ranks_per_region

    @property
    def is_region_leader(self) -> bool:
        return self.local_index == 0

    @property
    def is_leader(self) -> bool:
        """Writes the run's shared files: rank 0 of the job (with ft, of each region's job)."""
        return self.job_rank == 0


def pick_device(config: Config) -> torch.device:
    wanted = config.train.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is visible")
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available() and config.mode == "regions"):
        # More local ranks than GPUs share them in turn (gloo only: NCCL takes one GPU per rank).
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def init_topology(config: Config) -> Topology:
    """Join the torchrun job (or a one-process job outside torchrun) and build the groups."""
    regions, per_region = config.shape
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if config.ft.enabled:
        return _init_region_job(config, world_size)
    if world_size != config.world_size:
        wanted = (
            f"1 server + federated.executors ({config.federated.executors})"
            if config.mode == "federated"
            else f"topology.regions x topology.ranks_per_region = {regions} x {per_region}"
        )
        raise ConfigError(f"{wanted} = {config.world_size} processes, but {world_size} were started")
    device = _join_job(config)
    rank = dist.get_rank()
    timeout = _group_timeout(config)
    # Every rank must create every group, in the same order.
    world = dist.new_group(list(range(world_size)), timeout=timeout)
    intra = [dist.new_group([m * per_region + i for i in range(per_region)], timeout=timeout) for m in range(regions)]
    inter = [dist.new_group([m * per_region + i for m in range(regions)], timeout=timeout) for i in range(per_region)]
    save_groups = None
    if config.checkpoint.async_save:
        ranks = [[m * per_region + i for i in range(per_region)] for m in range(regions)]
        save_regions = [dist.new_group(r, timeout=timeout, backend="gloo") for r in ranks]
        save_groups = (save_regions[rank // per_region], dist.new_group(timeout=timeout, backend="gloo"))
    return Topology(
        rank=rank,
        world_size=world_size,
        regions=regions,
        ranks_per_region=per_region,
        device=device,
        setup_group=dist.group.WORLD,
        world_group=world,
        intra_group=intra[rank // per_region],
        inter_group=inter[rank % per_region],
        job_rank=rank,
        save_groups=save_groups,
    )


def _init_region_job(config: Config, world_size: int) -> Topology:
    """One region's job of an `ft` run: its ranks are the job's; the region comes from the launcher."""
    regions, per_region = config.shape
    if REGION_ENV not in os.environ:
        raise ConfigError(
            f"ft.enabled: each region's job needs its region number in {REGION_ENV} (cocodc train sets it)"
        )
    region = int(os.environ[REGION_ENV])
    if not 0 <= region < regions:
        raise ConfigError(f"{REGION_ENV}={region}, but topology.regions is {regions}")
    if world_size != per_region:
        raise ConfigError(
            f"ft.enabled: a region's job runs topology.ranks_per_region = {per_region} processes, "
            f"but {world_size} were started"
        )
    device = _join_job(config)
    local = dist.get_rank()
    group = dist.new_group(list(range(per_region)), timeout=_group_timeout(config))
    saving = dist.new_group(timeout=_group_timeout(config), backend="gloo") if config.checkpoint.async_save else None
    return Topology(
        rank=region * per_region + local,
        world_size=regions * per_region,
        regions=regions,
        ranks_per_region=per_region,
        device=device,
        setup_group=dist.group.WORLD,
        world_group=group,
        intra_group=group,
        inter_group=None,
        job_rank=local,
        save_groups=(saving, saving) if saving is not None else None,
    )


def _join_job(config: Config) -> torch.device:
    """Join this torchrun job's default group; returns this rank's device."""
    device = pick_device(config)
    backend = config.topology.backend
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if backend == "auto":
        # NCCL needs a GPU per rank; ranks that share GPUs (regions emulated on one) talk over gloo.
        backend = "nccl" if device.type == "cuda" and local_ranks <= torch.cuda.device_count() else "gloo"
        if device.type == "cuda" and backend == "gloo" and int(os.environ.get("RANK", 0)) == 0:
            print(f"cocodc: {local_ranks} ranks share {torch.cuda.device_count()} GPU(s): gloo", file=sys.stderr)
    if backend == "nccl" and local_ranks > torch.cuda.device_count():
        raise ConfigError(
            f"{local_ranks} ranks on this host but {torch.cuda.device_count()} GPUs: NCCL needs a GPU per rank; "
            "topology.backend gloo lets ranks share them"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device
    if "MASTER_ADDR" not in os.environ:  # a plain `python -m cocodc.train`: a job of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    setup = timedelta(minutes=10)
    if config.ft.enabled and RESTART_ENV in os.environ:
        # torchrun's store outlives a restart of the job, and the addresses the ranks of a dead life
        # left in it would answer the new one's: each life rendezvouses under its own prefix.
        agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=setup)
        store = dist.PrefixStore(f"cocodc/life{os.environ[RESTART_ENV]}", agent)
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=setup)
    else:
        dist.init_process_group(backend, timeout=setup)
    return device


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _group_timeout(config: Config) -> timedelta:
    # The engine's own deadline (topology.timeout_s from the start of a wait) is to fire first, with
    # its clear message: the backend's counts from when the work was queued (and NCCL's watchdog
    # tears the process down without a word). Collectives run outside an engine (DDP's) get 2x.
    return timedelta(seconds=2 * config.topology.timeout_s)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
