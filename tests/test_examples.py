"""The examples of a user's own loop, run as a user runs them: two processes, gloo. The accelerate
example runs under torchrun: on a machine without a GPU, accelerate 1.15's own launcher starts a
single process (see the example's docstring)."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.slow  # the examples, under torchrun

EXAMPLES = {"plain": REPO / "examples" / "plain_torch.py", "accelerate": REPO / "examples" / "accelerate_loop.py"}


def launch(example: str, out, *args: str) -> list[dict]:
    """Run the example; every region's final summary and global copy (none when it stopped early)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(EXAMPLES[example]), "--out", str(out), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    finals = [out / f"final-rank{r}.pt" for r in (0, 1)]
    return [torch.load(path, weights_only=True) for path in finals if path.exists()]


@pytest.mark.parametrize("example", ["plain", "accelerate"])
def test_own_loop_trains_syncs_and_resumes_bit_identically(tmp_path, example):
    full = launch(example, tmp_path / "full")
    assert [r["summary"]["inner_steps"] for r in full] == [48, 48]
    assert full[0]["summary"]["final_eval_loss"] < full[0]["summary"]["initial_eval_loss"] - 1.0
    assert all(torch.equal(a, b) for a, b in zip(full[0]["global"], full[1]["global"], strict=True))

    assert launch(example, tmp_path / "split", "--stop-at", "19") == []  # fragment 0 in flight (sent at 18)
    resumed = launch(example, tmp_path / "split", "--resume")
    for a, b in zip(full, resumed, strict=True):
        assert a["summary"]["final_eval_loss"] == b["summary"]["final_eval_loss"]
        assert all(torch.equal(x, y) for x, y in zip(a["global"], b["global"], strict=True))


@pytest.mark.parametrize("accumulate", [2, 3])
def test_accumulated_micro_batches_count_one_inner_step(tmp_path, accumulate):
    # `accumulate` micro-batches per optimizer step: 12 optimizer steps are 12 inner steps.
    for region in launch("accelerate", tmp_path, "--steps", "12", "--accumulate", str(accumulate)):
        assert region["summary"]["inner_steps"] == 12 and region["summary"]["batches_read"] == 12 * accumulate


@pytest.mark.parametrize("example", ["plain", "accelerate"])
@pytest.mark.parametrize(
    ("args", "why"), [(("--out", "{out}"), "it needs one"), ((), "the following arguments are required: --out")]
)
def test_one_process_or_a_bad_argument_is_told_how_to_launch(tmp_path, example, args, why):
    # What `python example.py` or `accelerate launch --cpu` starts: a single process; or no --out.
    env = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "RANK")}
    command = [sys.executable, str(EXAMPLES[example]), *(a.format(out=tmp_path) for a in args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr and why in lines[0]
    out = tmp_path if args else "runs/plain" if example == "plain" else "runs/acc"
    assert f"Run: torchrun --standalone --nproc-per-node 2 examples/{EXAMPLES[example].name} --out {out}" in lines[0]
