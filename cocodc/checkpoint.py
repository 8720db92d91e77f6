"""Atomic checkpoints and exact resume.

Layout: `checkpoints/step_<N>/rank<r>.pt` (one file per rank: its model, optimizers, data
position and RNG), `checkpoints/step_<N>/meta.json` (the config the run was written with) and
`checkpoints/LATEST` (the newest complete step). Every file is written to a temporary name,
fsynced and renamed; LATEST moves only after every rank's file is in place, so a crash mid-save
leaves the previous checkpoint as the one a resume finds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from cocodc.config import Config

# Keys that must be the same for a checkpoint to be continued (others, like train.steps, may change).
RESUME_KEYS = (
    "topology.regions",
    "topology.ranks_per_region",
    "model.n_layers",
    "model.d_model",
    "model.n_heads",
    "model.ffn_hidden",
    "sync.method",
    "sync.fragments",
    "sync.fragment_pattern",
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
    "federated.init_from",
    "split.workers",
    "split.executors",
    "split.cut",
    "split.shape",
    "split.merge",
    "split.aggregate_every",
)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or written by an incompatible config."""


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


def save_rank(root: Path, step: int, rank: int, state: dict[str, Any]) -> None:
    directory = step_dir(root, step)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save(directory / f"rank{rank}.pt", state)


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


def check_compatible(root: Path, step: int, config: Config, ranks: range) -> None:
    """That the checkpoint at `step` was written by a config this one can resume, with a whole file
    for every rank in `ranks` (all of them; with ft, one region's)."""
    directory = step_dir(root, step)
    try:
        saved = json.loads((directory / "meta.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        raise CheckpointError(f"{directory / 'meta.json'} is unreadable or corrupt") from None
    current = flatten(config.to_dict())
    for key in RESUME_KEYS:
        if saved.get(key) != current.get(key):
            raise CheckpointError(
                f"checkpoint {directory} was written with {key}={saved.get(key)!r}; "
                f"the config says {current.get(key)!r}"
            )
    missing = [r for r in ranks if not (directory / f"rank{r}.pt").is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} lacks the files of ranks {missing}")
    for rank in ranks:
        load_rank(root, step, rank, mmap=True)  # maps the file: finds truncation without reading it all


def load_rank(root: Path, step: int, rank: int, mmap: bool = False) -> dict[str, Any]:
    path = step_dir(root, step) / f"rank{rank}.pt"
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
