"""The job scripts in launch/, run as a scheduler runs them, with each command they wrap (srun,
scontrol, torchrun) replaced by a stub that records how it was called: the real ones need a
cluster. The stubs stand in for those commands only; the scripts and cocodc are the real ones."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY

STUB = """#!/usr/bin/env bash
# records its name, arguments and the environment it was given, one line each
{ echo "$(basename "$0") $*"; echo "TORCHFT_LIGHTHOUSE=${TORCHFT_LIGHTHOUSE:-}"; } >> "$STUB_LOG"
"""
PASS_ON = """#!/usr/bin/env bash
# srun on one node: runs its command here
echo "srun $*" >> "$STUB_LOG"
exec "$@"
"""


def stubs(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"torchrun": STUB, "srun": PASS_ON, "scontrol": "#!/usr/bin/env bash\necho node0\n"}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    path = f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "STUB_LOG": str(tmp_path / "calls.log"), "PYTHON": sys.executable}


@pytest.mark.parametrize("saved", [True, False])
def test_slurm_resumes_from_the_run_dir_the_overrides_name(tmp_path, saved):
    env = {**stubs(tmp_path), "SLURM_JOB_NODELIST": "node0", "SLURM_NNODES": "2", "SLURM_JOB_ID": "77"}
    run = tmp_path / "elsewhere" / "named"
    if saved:
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "LATEST").write_text("40\n")
    args = [TINY, "--set", f"run.dir={tmp_path / 'elsewhere'}", "--set", "run.name=named"]
    result = subprocess.run(["bash", "launch/slurm.sbatch", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    torchrun = next(line for line in (tmp_path / "calls.log").read_text().splitlines() if line.startswith("torchrun"))
    assert "--rdzv-endpoint node0:29400 --rdzv-id 77" in torchrun and "-m cocodc.train -c" in torchrun
    assert torchrun.endswith("--resume") == saved


@pytest.mark.parametrize("where", ["config", "environment"])
def test_ft_region_takes_the_lighthouse_from_the_config_or_the_environment(tmp_path, where):
    env = {**stubs(tmp_path), "REGION": "1", "NPROC": "2"}
    args = [TINY]
    if where == "config":
        args += ["--set", "ft.lighthouse=http://lh-host:29510"]
    else:
        env["LIGHTHOUSE"] = "http://lh-host:29510"
    result = subprocess.run(["bash", "launch/ft-region.sh", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    torchrun, lighthouse = (tmp_path / "calls.log").read_text().splitlines()
    assert "--nproc-per-node 2" in torchrun and "--rdzv-id region1" in torchrun and "--set ft.enabled=true" in torchrun
    assert lighthouse == (
        "TORCHFT_LIGHTHOUSE=http://lh-host:29510" if where == "environment" else "TORCHFT_LIGHTHOUSE="
    )


def test_an_ft_region_with_no_lighthouse_is_a_one_line_error():
    from cocodc.config import ConfigError, load_config
    from cocodc.ft import LIGHTHOUSE_ENV, RegionQuorum

    config = load_config(TINY, ["ft.enabled=true", "sync.method=streaming", "sync.fragments=2"])
    saved = os.environ.pop(LIGHTHOUSE_ENV, None)
    try:
        with pytest.raises(ConfigError, match=r"^ft.enabled: no lighthouse to ask: set ft.lighthouse"):
            RegionQuorum(config, None, lambda: {}, lambda state: None)
    finally:
        if saved is not None:
            os.environ[LIGHTHOUSE_ENV] = saved
