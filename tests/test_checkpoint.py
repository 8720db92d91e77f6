"""Checkpoint layout: what a resume checks, what a commit prunes."""

import pickle

import pytest
import torch

from cocodc import checkpoint
from cocodc.config import load_config

from conftest import TINY, gloo_group


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


def test_pack_keeps_tensors_by_path_and_the_rest_opaque():
    weight, step = torch.arange(6.0).view(2, 3), torch.tensor(5)
    tree = {"w": weight, "groups": [{"lr": 0.1, "params": ["w"]}], "slots": (1, None), "deep": {"n": {"step": step}}}
    packed = checkpoint.pack(tree)
    assert packed["tensors"] == {"w": weight, "deep.n.step": step}
    skeleton = pickle.loads(packed["rest"])  # no tensor in it: they travel by path
    assert not isinstance(skeleton["w"], torch.Tensor) and skeleton["groups"] == tree["groups"]
    back = checkpoint.unpack(packed)
    assert back["w"] is weight and back["deep"]["n"]["step"] is step
    assert back["groups"] == [{"lr": 0.1, "params": ["w"]}] and back["slots"] == (1, None)
    packed["tensors"].pop("w")
    with pytest.raises(checkpoint.CheckpointError, match="a tensor 'w' this run has no place for"):
        checkpoint.unpack(packed)


def test_a_region_checkpoint_loads_in_place_and_reads_whole(tmp_path):
    # One process, no process group: DCP writes and reads as a job of one.
    state = {"outer": checkpoint.pack({"global": {"w": torch.arange(4.0)}, "step": 7})}
    checkpoint.save_region(tmp_path, 3, 0, state, None)
    assert set(checkpoint.saved_keys(tmp_path, 3, 0)) == {"outer.tensors.global.w", "outer.rest"}
    target = torch.zeros(4)
    template = {"outer": checkpoint.pack({"global": {"w": target}, "step": 0})}
    checkpoint.load_region(tmp_path, 3, 0, template, None)
    assert torch.equal(target, torch.arange(4.0))  # in place
    assert checkpoint.unpack(template["outer"])["step"] == 7
    assert checkpoint.read_region(tmp_path, 3, 0)["outer"]["step"] == 7
    with pytest.raises(checkpoint.CheckpointError, match="cannot be loaded into this run"):
        checkpoint.load_region(tmp_path, 3, 0, {"outer": checkpoint.pack({"global": {"v": target}})}, None)


def test_the_older_one_file_per_rank_format_is_refused_with_what_to_do(tmp_path):
    config = load_config(TINY)
    checkpoint.step_dir(tmp_path, 5).mkdir(parents=True)
    checkpoint.atomic_save(checkpoint.step_dir(tmp_path, 5) / "rank0.pt", {"model": {}})
    checkpoint.commit(tmp_path, 5, config, keep=2)
    with pytest.raises(checkpoint.CheckpointError, match="older one-file-per-rank format.*start anew"):
        checkpoint.check_compatible(tmp_path, 5, config, range(2))


def test_an_async_save_writes_a_host_copy_taken_before_training_goes_on(tmp_path):
    # The outer sync's state is per-parameter views at offsets of its flat buffers, as DTensors:
    # DCP's own stager fails on those (torch 2.13); ours copies them, before the save returns.
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    with gloo_group(0, str(tmp_path / "store"), world_size=1):
        mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")
        flat = torch.arange(12.0)
        view = DTensor.from_local(flat[4:10].view(2, 3), mesh, [Shard(0)], run_check=False, shape=(2, 3), stride=(3, 1))
        state = {"outer": checkpoint.pack({"global_params": {"w": view}, "step": flat[:1]})}
        future = checkpoint.save_region_async(tmp_path, 1, 0, state, dist.group.WORLD)
        flat.add_(100)  # training goes on while the thread writes
        future.result()
    read = checkpoint.read_region(tmp_path, 1, 0)["outer"]
    assert torch.equal(read["global_params"]["w"], torch.arange(4.0, 10.0).view(2, 3))
    assert torch.equal(read["step"], torch.zeros(1))
