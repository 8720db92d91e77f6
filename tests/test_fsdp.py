"""Sharded regions (topology.parallel fsdp) under torchrun with gloo: FSDP2 inside each region of 2
ranks, the outer sync on the local shards, one sharded checkpoint per region that reshards on resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from cocodc import checkpoint
from cocodc.metrics import read_records

from conftest import FAST, TINY, cocodc, overrides

pytestmark = pytest.mark.slow

BASE = [
    *FAST,
    "train.steps=24",
    "sync.sync_every=8",
    "eval.every=8",
    "checkpoint.every=0",
    "topology.ranks_per_region=2",
    "wandb.mode=disabled",
]
METHODS = {
    "diloco": ["sync.method=diloco"],
    # Fragments in flight across the evals and the checkpoints: tau 3 of slots of 4 steps.
    "streaming": ["sync.method=streaming", "sync.fragments=2", "sync.delay=3"],
    # The adaptive schedule decides from the drift alone (its timings differ from run to run).
    "cocodc": [
        "sync.method=cocodc",
        "sync.fragments=2",
        "sync.delay=3",
        "sync.schedule=adaptive",
        "sync.adaptive_delay=false",
    ],
}
# The streaming run under fsdp keeps its outer state in host memory (on this CPU, the same RAM:
# the accounting and the arithmetic are what it checks).
ON_HOST = {"streaming": ["sync.outer_state=host"]}


def train(root: Path, name: str, *settings: str, flags: tuple[str, ...] = ()) -> Path:
    args = overrides(*BASE, f"run.dir={root}", f"run.name={name}", *settings)
    result = cocodc("train", "-c", TINY, *flags, *args, cwd=root)
    assert result.returncode == 0, result.stderr[-4000:]
    return root / name


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def saved(run: Path, step: int, region: int = 0) -> dict:
    return checkpoint.read_region(run / "checkpoints", step, region)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Every method under ddp and under fsdp, 2 regions x 2 ranks: one launch each, shared by the tests."""
    root = tmp_path_factory.mktemp("fsdp")
    return {
        (method, parallel): train(
            root,
            f"{method}-{parallel}",
            *settings,
            f"topology.parallel={parallel}",
            *(ON_HOST.get(method, []) if parallel == "fsdp" else []),
        )
        for method, settings in METHODS.items()
        for parallel in ("ddp", "fsdp")
    }


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp_trains_as_ddp_does(runs, method):
    ddp, fsdp = runs[method, "ddp"], runs[method, "fsdp"]
    assert summary(fsdp)["final_eval_loss"] == pytest.approx(summary(ddp)["final_eval_loss"], abs=1e-4)
    assert summary(fsdp)["final_eval_loss"] < summary(fsdp)["initial_eval_loss"] - 1
    for region in (0, 1):
        whole, sharded = saved(ddp, 24, region)["outer"], saved(fsdp, 24, region)["outer"]
        assert whole["global_params"].keys() == sharded["global_params"].keys()
        for name, value in whole["global_params"].items():
            torch.testing.assert_close(sharded["global_params"][name], value, atol=1e-5, rtol=0)
    if method == "cocodc":  # every rank of every region took the same decisions as under ddp

        def decisions(run: Path) -> list[tuple]:
            return [(r["slot"], r["fragment"], r["send_step"]) for r in read_records(run / "metrics.jsonl")
                    if r["kind"] == "decision" and r["region"] == 0]  # fmt: skip

        assert decisions(fsdp) == decisions(ddp) and len(decisions(ddp)) == 6


def test_sharded_state_is_half_per_rank_and_checkpointed_once(runs):
    ddp, fsdp = summary(runs["diloco", "ddp"]), summary(runs["diloco", "fsdp"])
    whole, half = ddp["state_bytes_per_rank"], fsdp["state_bytes_per_rank"]
    # Every dimension the sharding cuts is even here, so each rank holds exactly half (diloco: no
    # numbers ride along with the fragment's buffer).
    for key in ("model", "grads", "outer"):
        assert half[key] * 2 == whole[key], key
    assert 0.45 * whole["optimizer"] < half["optimizer"] < 0.55 * whole["optimizer"]  # AdamW's step counts aside
    assert whole["outer"] == 2 * whole["model"]  # global copy and outer momentum, fp32
    device, host = summary(runs["streaming", "ddp"]), summary(runs["streaming", "fsdp"])
    assert host["state_bytes_per_rank"]["outer"] == 0
    assert host["state_bytes_per_rank"]["outer_host"] * 2 == device["state_bytes_per_rank"]["outer"]

    def stored(run: Path) -> int:
        return sum(f.stat().st_size for f in checkpoint.region_dir(run / "checkpoints", 24, 0).glob("*.distcp"))

    # A region of 2 ranks writes one checkpoint: its replicas (ddp) once, its shards (fsdp) once each.
    # Each stored chunk carries a few hundred bytes of framing (6-11% of this tiny model); a second
    # copy would double it.
    one_copy = whole["model"] + whole["optimizer"] + whole["outer"]
    for parallel in ("ddp", "fsdp"):
        assert one_copy <= stored(runs["diloco", parallel]) < 1.2 * one_copy, parallel


def test_fsdp_resume_is_bit_identical_and_reshards(runs, tmp_path):
    straight = runs["cocodc", "fsdp"]
    settings = [*METHODS["cocodc"], "topology.parallel=fsdp", "checkpoint.every=4"]
    # Steps 4, 8 and 12 saved on a background thread (each committed when the next save began),
    # 13 (the stop) waited for.
    stopped = train(tmp_path, "stopped", *settings, "checkpoint.async_save=true", flags=("--stop-at", "13"))
    assert saved(stopped, 13)["outer"]["in_flight"].keys() == {"1"}
    at_13 = saved(stopped, 13)["outer"]["global_params"]  # before the resume below prunes it
    for name in ("as-ddp", "as-one-shard", "from-async"):
        shutil.copytree(stopped, tmp_path / name)
    shutil.rmtree(checkpoint.step_dir(tmp_path / "from-async" / "checkpoints", 13))
    (tmp_path / "from-async" / "checkpoints" / "LATEST").write_text("12\n")

    for name in ("stopped", "from-async"):
        resumed = train(tmp_path, name, *settings, flags=("--resume",))
        assert summary(resumed)["final_eval_loss"] == summary(straight)["final_eval_loss"], name
        a, b = saved(straight, 24), saved(resumed, 24)
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), (name, key)
        for key, value in a["outer"]["global_params"].items():
            assert torch.equal(value, b["outer"]["global_params"][key]), (name, key)

    # A region of 2 shards continued by one rank, whole (ddp) or as one shard (fsdp): the global
    # copy it resumes with is the saved one (nothing is applied before step 16).
    for name, parallel in (("as-ddp", "ddp"), ("as-one-shard", "fsdp")):
        one = ["topology.ranks_per_region=1", f"topology.parallel={parallel}"]
        run = train(tmp_path, name, *settings, *one, flags=("--resume", "--stop-at", "15"))
        assert checkpoint.latest_step(run / "checkpoints") == 15
        at_15 = saved(run, 15)["outer"]
        for key, value in at_13.items():
            assert torch.equal(at_15["global_params"][key], value), (parallel, key)
        assert at_15["in_flight"].keys() == {"1"}  # the fragment in flight is still to be applied
