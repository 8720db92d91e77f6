"""Atomic, sharded checkpoints and exact resume.

Layout of `checkpoints/step_<N>/`:
- `region<m>/`: one torch.distributed.checkpoint (DCP) directory per region, written together by
  the region's ranks: the model, the inner optimizer and the mode's state (the outer sync's global
  copy, momentum and fragments in flight), each tensor once (a replica is written by one rank, a
  shard by its owner), so a resume can lay them out over another number of ranks or the other
  parallelism (they reshard on load);
- `ranks/<r>.pt`: what is each rank's own (its data position, RNG, running totals, byte counts);
- `meta.json`: the config the run was written with; written last, it marks the step complete.
`checkpoints/LATEST` names the newest complete step. Files are written to temporary names (DCP:
into the step's directory, which only meta.json makes complete), fsynced and renamed; LATEST moves
only after every rank's files are in place, so a crash mid-save leaves the previous checkpoint as
the one a resume finds.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from cocodc.config import Config
from cocodc.run_dir import CheckpointError

# Keys that must be the same for a checkpoint to be continued (others, like train.steps, may change;
# so may topology.ranks_per_region and topology.parallel: the region's state reshards).
RESUME_KEYS = (
    "topology.regions",
    "model.n_layers",
    "model.d_model",
    "model.n_heads",
    "model.ffn_hidden",
    "model.n_kv_heads",
    "model.ffn_multiple_of",
    "model.tie_embeddings",
    "model.max_seq_len",
    "model.rope_theta",
    "model.rope_scaling.factor",
    "model.rope_scaling.low_freq_factor",
    "model.rope_scaling.high_freq_factor",
    "model.rope_scaling.original_max_len",
    "model.hf_config",
    "sync.method",
    "sync.fragments",
    "sync.fragment_pattern",
    "sync.blocks",
    "sync.sync_every",
    "sync.delay",
    "sync.schedule",
    "sync.dc_adaptive",
    "sync.dc_normaliser",
    "mode",
    "data.source",
    "data.tokenizer",
    "data.vocab_size",
    "data.split",
    "data.dirichlet_alpha",
    "train.seq_len",
    "train.batch_size",
    "seed",
    "federated.clients",
    "federated.clients_per_round",
    "federated.executors",
    "federated.strategy",
    "federated.lora_rank",
    "split.workers",
    "split.executors",
    "split.cut",
    "split.shape",
    "split.merge",
    "split.aggregate_every",
)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_save(path: Path, state: dict[str, Any]) -> None:
    _atomic_write(path, lambda f: torch.save(state, f))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def cause_of(err: BaseException, group: dist.ProcessGroup | None) -> BaseException:
    """What DCP's CheckpointException wraps: this rank's own exception where it raised one (a signal
    that stopped it mid-save), else the first rank's; any other exception is its own cause."""
    if not isinstance(err, CheckpointException) or not err.failures:
        return err
    own = dist.get_rank(group) if dist.is_initialized() else 0
    return err.failures.get(own, next(iter(err.failures.values())))[0]


def region_dir(root: Path, step: int, region: int) -> Path:
    return step_dir(root, step) / f"region{region}"


def rank_file(root: Path, step: int, rank: int) -> Path:
    return step_dir(root, step) / "ranks" / f"{rank}.pt"


class ModelState:
    """A model's state in the form DCP saves once per region and reshards: DTensors where it is
    sharded (FSDP2), plain tensors where each rank holds it whole."""

    distributed = True  # its state dict is already laid out for DCP

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state)


class OptimizerState:
    """The inner optimizer's state keyed by parameter name, as DCP saves and reshards it."""

    distributed = True

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


_TENSOR = "\0tensor"  # marks where a tensor sat in a packed tree's skeleton


def pack(tree: Any) -> dict[str, Any]:
    """A state tree as DCP is to hold it: its tensors by path ("global_params.embed.weight"), and
    everything else as one opaque pickled skeleton. So the tensors load in place into a template
    of this run's layout however the rest varies (the slots a schedule planned, the fragments in
    flight), and nothing else is laid out by DCP's own flattening."""
    tensors: dict[str, torch.Tensor] = {}

    def strip(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return (_TENSOR, path)
        if isinstance(node, dict):
            return {key: strip(value, f"{path}.{key}" if path else str(key)) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(strip(value, f"{path}.{i}" if path else str(i)) for i, value in enumerate(node))
        return node

    skeleton = strip(tree, "")
    return {"tensors": tensors, "rest": pickle.dumps(skeleton)}


def unpack(packed: dict[str, Any]) -> Any:
    """The tree `pack` took apart, with the tensors of `packed` (loaded in place) put back."""
    tensors = packed.get("tensors", {})  # a part with no tensors leaves no keys of them

    def fill(node: Any) -> Any:
        if isinstance(node, tuple) and len(node) == 2 and node[0] == _TENSOR:
            if node[1] not in tensors:
                raise CheckpointError(f"the checkpoint holds a tensor {node[1]!r} this run has no place for")
            return tensors[node[1]]
        if isinstance(node, dict):
            return {key: fill(value) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(fill(value) for value in node)
        return node

    return fill(pickle.loads(packed["rest"]))


def save_region(root: Path, step: int, region: int, state: dict[str, Any], group: dist.ProcessGroup | None) -> None:
    """This region's share of the step: every rank of `group` (the region's) calls it."""
    directory = region_dir(root, step, region)
    try:
        dcp.save(state, checkpoint_id=directory, process_group=group)
    except CheckpointException as err:  # a peer lost or stopped mid-save; DCP's own is no Exception
        cause = cause_of(err, group)
        raise CheckpointError(f"saving {directory} failed ({_first_line(cause)})") from cause


def save_region_async(root: Path, step: int, region: int, state: dict[str, Any], group: dist.ProcessGroup) -> Future:
    """`save_region` on a background thread, once `state` is copied to host memory (on return): the
    future fails with DCP's error. `group` must not be used by another thread meanwhile."""
    directory = region_dir(root, step, region)
    return dcp.async_save(state, checkpoint_id=directory, process_group=group, async_stager=HostCopy())


class HostCopy(AsyncStager):
    """Stages a state for an async save as a copy in host memory. DCP's own stager copies a DTensor
    through its wrapper's storage, which is invalid for a local shard that is a view at an offset
    (the outer sync's per-parameter views of its flat buffers): torch 2.13 fails there."""

    _synchronize_after_execute = False  # the copy is complete when `stage` returns

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return _host_copy(state_dict)

    def close(self) -> None:
        pass


def _host_copy(tree: Any) -> Any:
    if isinstance(tree, DTensor):
        shard = tree.to_local().to("cpu", copy=True)
        return DTensor.from_local(
            shard, tree.device_mesh, tree.placements, run_check=False, shape=tree.shape, stride=tree.stride()
        )
    if isinstance(tree, torch.Tensor):
        return tree.to("cpu", copy=True)
    if isinstance(tree, dict):
        return {key: _host_copy(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_host_copy(value) for value in tree)
    return tree


def save_rank(root: Path, step: int, rank: int, state: dict[str, Any]) -> None:
    path = rank_file(root, step, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(path, state)


def saved_keys(root: Path, step: int, region: int) -> dict[str, Any]:
    """The flattened keys ("outer.tensors.global_params.embed.weight", ...) a region's checkpoint
    holds, with DCP's metadata of each (a tensor's: its whole size and dtype)."""
    directory = region_dir(root, step, region)
    try:
        return dict(dcp.FileSystemReader(directory).read_metadata().state_dict_metadata)
    except (Exception, CheckpointException) as err:  # a missing or damaged .metadata
        raise CheckpointError(f"checkpoint {directory} is corrupt or unreadable ({type(err).__name__})") from None


def load_region(root: Path, step: int, region: int, state: dict[str, Any], group: dist.ProcessGroup | None) -> None:
    """Fill `state` (the tensors to load into, laid out as this run holds them) in place."""
    directory = region_dir(root, step, region)
    try:
        dcp.load(state, checkpoint_id=directory, process_group=group)
    except (Exception, CheckpointException) as err:  # DCP's own is no Exception
        cause = cause_of(err, group)
        raise CheckpointError(
            f"checkpoint {directory} cannot be loaded into this run ({_first_line(cause)})"
        ) from cause


def read_region(root: Path, step: int, region: int) -> dict[str, Any]:
    """A region's whole checkpoint as plain tensors, in this one process (no process group): for
    reading a run's model outside training (tests, init_from)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    directory = region_dir(root, step, region)
    try:
        with warnings.catch_warnings():  # that it reads in one process, which is the point
            warnings.simplefilter("ignore", UserWarning)
            packed = _load_state_dict_from_keys(checkpoint_id=str(directory))
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"checkpoint {directory} is corrupt or unreadable ({type(err).__name__})") from None
    return {name: unpack(part) for name, part in packed.items()}


def commit(root: Path, step: int, config: Config, keep: int) -> None:
    """Mark `step` complete (call once every rank has saved) and prune older checkpoints: all
    but the newest `keep` complete ones, and every incomplete one before `step` (a save that a
    crash cut short)."""
    meta = {"step": step, "config": flatten(config.to_dict())}
    _atomic_write(step_dir(root, step) / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
    _atomic_write(root / "LATEST", lambda f: f.write(f"{step}\n".encode()))
    older = sorted(p for p in root.glob("step_*") if p.name < step_dir(root, step).name)
    complete = [p for p in older if (p / "meta.json").exists()]
    kept = set(complete[len(complete) - (keep - 1) :]) if keep > 1 else set()
    for old in older:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)


def latest_step(root: Path) -> int:
    """The newest complete checkpoint's step, after checking that it can be resumed."""
    marker = root / "LATEST"
    if not marker.exists():
        raise CheckpointError(f"no checkpoint to resume in {root}")
    try:
        step = int(marker.read_text().strip())
    except ValueError:
        raise CheckpointError(f"{marker} is corrupt: it does not hold a step number") from None
    if not (step_dir(root, step) / "meta.json").exists():
        raise CheckpointError(f"{marker} names step {step}, but {step_dir(root, step)} is incomplete")
    return step


def saved_config(root: Path, step: int) -> dict[str, Any]:
    """The flattened config a checkpoint was written with."""
    path = step_dir(root, step) / "meta.json"
    try:
        return json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError):
        raise CheckpointError(f"{path} is unreadable or corrupt") from None


def saved_shape(root: Path, step: int) -> tuple[int, int]:
    """(regions, ranks per region) of the run that wrote the checkpoint."""
    saved = saved_config(root, step)
    mode = saved.get("mode", "regions")
    if mode in ("federated", "split"):
        return 1 + int(saved[f"{mode}.executors"]), 1
    return int(saved["topology.regions"]), int(saved["topology.ranks_per_region"])


def check_compatible(root: Path, step: int, config: Config, regions: range) -> None:
    """That the checkpoint at `step` was written by a config this one can resume, with the files of
    every region in `regions` (all of them; with ft, one) and of their ranks."""
    directory = step_dir(root, step)
    saved = saved_config(root, step)
    current = flatten(config.to_dict())
    defaults = flatten(Config().to_dict())  # a key the writer's cocodc did not have yet held its default
    for key in RESUME_KEYS:
        if saved.get(key, defaults[key]) != current.get(key):
            raise CheckpointError(
                f"checkpoint {directory} was written with {key}={saved.get(key)!r}; "
                f"the config says {current.get(key)!r}"
            )
    if (directory / "rank0.pt").is_file() and not region_dir(root, step, 0).exists():
        raise CheckpointError(
            f"checkpoint {directory} is in the older one-file-per-rank format; this cocodc writes sharded "
            "checkpoints (torch.distributed.checkpoint): finish that run with the cocodc that wrote it, or start anew"
        )
    _, per_region = saved_shape(root, step)
    for region in regions:
        saved_keys(root, step, region)
        ranks = range(region * per_region, (region + 1) * per_region)
        missing = [r for r in ranks if not rank_file(root, step, r).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {directory} lacks the files of ranks {missing}")
        for rank in ranks:
            load_rank(root, step, rank, mmap=True)  # maps the file: finds truncation without reading it all


def load_rank(root: Path, step: int, rank: int, mmap: bool = False) -> dict[str, Any]:
    path = rank_file(root, step, rank)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises several kinds for a damaged file
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable ({type(err).__name__})") from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
