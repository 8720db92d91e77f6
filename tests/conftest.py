import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    # The kernels' tests run them in Triton's interpreter on CPU tensors. Triton reads this as it is
    # first imported (test modules import libraries that import it) and again at every kernel call,
    # so it is set here, before any test module, for the whole session; nothing else runs Triton
    # without a GPU (the kernels serve CUDA tensors only, unless a test forces them).
    os.environ["TRITON_INTERPRET"] = "1"

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny.yaml")
# A smaller model than the demo's, so each torchrun launch in the suite takes seconds.
FAST = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=2",
    "train.batch_size=8",
    "train.seq_len=64",
    "train.warmup_steps=4",
    "eval.batches=4",
    "train.log_every=2",
]


def cocodc(
    *args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the real `cocodc` command (which starts torchrun) in a subprocess, with `env` added."""
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cocodc.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@contextmanager
def gloo_group(rank: int, store: str, world_size: int = 2, together: bool = True) -> Iterator[None]:
    """This spawned process's membership of a real gloo group, rendezvous through a file. With
    `together`, the group is torn down together: a process that destroys its group while a peer
    still talks to it can abort (seen once on a loaded machine); bounded, so one failed worker hangs
    no one. A test whose peers die on purpose passes False."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        yield
        if together:
            dist.monitored_barrier(timeout=timedelta(seconds=30))
    finally:
        dist.destroy_process_group()


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error of a command that stopped on bad input: exit code 2, one line, no traceback."""
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return result.stderr.strip()


def overrides(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    return tmp_path / "runs"
