"""Checkpoint layout: what a resume checks, what a commit prunes."""

import pytest
import torch

from cocodc import checkpoint
from cocodc.config import load_config

from conftest import TINY


def save_complete(root, step, config, world_size=1, keep=2):
    for rank in range(world_size):
        checkpoint.save_rank(root, step, rank, {"step": step})
    checkpoint.commit(root, step, config, keep)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("sync.schedule=adaptive", "sync.schedule"),
        ("sync.dc_adaptive=false", "sync.dc_adaptive"),
        ("sync.dc_normaliser=running", "sync.dc_normaliser"),
    ],
)
def test_resume_refuses_a_changed_schedule_or_normaliser(tmp_path, override, key):
    # Both change what the outer sync keeps in its state: a resume must name the key, not fail
    # inside load_state_dict.
    base = ["sync.method=cocodc", "sync.fragments=2", "sync.sync_every=8", "sync.delay=1"]
    save_complete(tmp_path, 4, load_config(TINY, base))
    changed = load_config(TINY, [*base, override])
    with pytest.raises(checkpoint.CheckpointError, match=f"was written with {key}="):
        checkpoint.check_compatible(tmp_path, 4, changed, range(1))


def test_commit_prunes_incomplete_saves_and_keeps_the_newest(tmp_path):
    config = load_config(TINY)
    save_complete(tmp_path, 10, config)
    checkpoint.save_rank(tmp_path, 15, 0, {"step": 15})  # a save a crash cut short: no meta.json
    save_complete(tmp_path, 20, config)
    save_complete(tmp_path, 30, config)
    checkpoint.save_rank(tmp_path, 40, 0, {"step": 40})  # newer than the commit: may be in progress
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000020", "step_00000030", "step_00000040"]
    assert checkpoint.latest_step(tmp_path) == 30
    save_complete(tmp_path, 40, config, keep=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000040"]


def test_atomic_save_leaves_no_partial_file(tmp_path):
    path = tmp_path / "state.pt"
    checkpoint.atomic_save(path, {"x": torch.arange(3)})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        checkpoint.atomic_save(path, {"x": Unpicklable()})
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
