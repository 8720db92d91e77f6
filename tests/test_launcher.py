"""`cocodc train` on one host, without an emulated WAN: the launcher becomes torchrun, whose
workers must not outlive it (the netem launcher's own tests are in test_netem.py)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import FAST, TINY, overrides

pytestmark = pytest.mark.slow  # every test here launches `cocodc train`


def workers(run_root) -> set[int]:
    """The processes whose arguments name the run directory: torchrun and its workers."""
    listing = subprocess.run(["pgrep", "-f", str(run_root)], capture_output=True, text=True).stdout
    return {int(pid) for pid in listing.split()}


@pytest.mark.parametrize(
    "settings, processes",
    [([], 2), (["ft.enabled=true"], 4)],  # torchrun's workers; with ft, each region's torchrun and worker
    ids=["one job", "ft: a job per region"],
)
def test_workers_end_when_torchrun_is_killed(tmp_path, run_root, settings, processes):
    # torchrun starts its workers in sessions of their own and sets them no death signal: killed
    # outright, it would leave them training. The launcher's workers carry one.
    args = overrides(
        *FAST, "train.steps=100000", "eval.every=0", "checkpoint.every=0", f"run.dir={run_root}", *settings
    )
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    err = tmp_path / "stderr"
    with open(err, "w") as stderr:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "cocodc.cli", "train", "-c", TINY, *args],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not any(path.stat().st_size for path in run_root.glob("*/metrics.jsonl")):
            assert launcher.poll() is None, err.read_text()[-3000:]
            assert time.monotonic() < deadline, "no training within 180 s"
            time.sleep(0.2)
        assert len(workers(run_root) - {launcher.pid}) == processes
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 60
        while workers(run_root) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not workers(run_root)
    finally:
        launcher.kill()
        launcher.wait()
        for pid in workers(run_root):
            os.kill(pid, signal.SIGKILL)


def test_the_launcher_names_the_rank_that_failed_not_a_survivor_that_reported_it():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from cocodc.cli import first_cause

    def failure(rank: int, exitcode: int, timestamp: int) -> ProcessFailure:
        found = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file="")
        found.timestamp = timestamp  # torchrun's: to the second, with no error file
        return found

    # Rank 0 reported its lost peer (exit 2) within the second rank 1 was killed in: rank 1 began it.
    killed = {0: failure(0, 2, 7), 1: failure(1, -9, 7), 2: failure(2, 2, 7)}
    assert first_cause(killed)[0] == 1
    # Every rank reported (a config error, a NaN): the earliest, then the lowest rank.
    reported = {0: failure(0, 2, 8), 1: failure(1, 2, 7), 2: failure(2, 2, 7)}
    assert first_cause(reported)[0] == 1
    # Two unreported: the earliest, not the lowest.
    crashed = {0: failure(0, 1, 9), 1: failure(1, 2, 5), 2: failure(2, -6, 8)}
    assert first_cause(crashed)[0] == 2
