"""What the sweep benchmarks share: running `cocodc train` and reusing finished runs, the
provenance of a sweep, and median bands over seeds for the plots."""

from __future__ import annotations

import argparse
import hashlib
import math
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cocodc_command() -> list[str]:
    script = Path(sys.executable).parent / "cocodc"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cocodc.cli"]


def finished(run_dir: Path, config_file: str, settings: list[str]) -> bool:
    """The run directory holds a finished run of exactly this config."""
    import yaml

    from cocodc.config import load_config

    if not (run_dir / "summary.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    config = load_config(config_file, settings)
    wanted = yaml.safe_load(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return yaml.safe_load((run_dir / "config.yaml").read_text()) == wanted


def source_digest() -> str:
    """A digest of the package's sources: the sweep says when they changed under it."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "cocodc").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def git_state() -> dict:
    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"head": git("rev-parse", "HEAD"), "changed": git("status", "--porcelain").splitlines()}


def provenance() -> dict:
    """Where a sweep starts from: the git state and a digest of the sources (`seal` adds the end)."""
    return {"git": git_state(), "sources_before": source_digest()}


def seal(results: dict) -> None:
    """Where the sweep ended, and whether the sources changed under it."""
    results["sources_after"] = source_digest()
    results["sources_changed"] = results["sources_after"] != results["sources_before"]
    results["git_after"] = git_state()


def ok(entry: dict) -> bool:
    return entry.get("rc") == 0 and math.isfinite(entry.get("final_eval_loss", math.nan))


def progress(entry: dict, where: str) -> None:
    loss = f"final eval loss {entry['final_eval_loss']:.4f}" if ok(entry) else f"FAILED (exit {entry['rc']})"
    took = "reused" if entry.get("reused") else f"{entry.get('process_s', 0):.0f}s"
    print(f"[{where}] {entry['name']}: {loss} ({took})", file=sys.stderr, flush=True)


def band(runs: list[dict], x_key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per eval point: median x over seeds, and the median, min and max loss."""
    points = min(len(r["eval_loss"]) for r in runs)
    xs, mid, low, high = [], [], [], []
    for i in range(points):
        xs.append(statistics.median(r[x_key][i] for r in runs))
        losses = [r["eval_loss"][i] for r in runs]
        mid.append(statistics.median(losses))
        low.append(min(losses))
        high.append(max(losses))
    return xs, mid, low, high


def train_run(config_file: str, settings: list[str], scratch: Path, name: str, *, rerun: bool, tail: int = 30) -> dict:
    """`cocodc train` of `config_file` with `settings` into `scratch/name`, or the finished run
    already there (unless `rerun`): the command, whether it was reused, its time and exit code,
    and on failure the tail of its stderr (also printed). Logs go to `scratch/logs`."""
    command = [*cocodc_command(), "train", "-c", config_file, "--overwrite"]
    for setting in settings:
        command += ["--set", setting]
    entry: dict = {"command": shlex.join(command)}
    if not rerun and finished(scratch / name, config_file, settings):
        return {**entry, "reused": True, "process_s": None, "rc": 0}
    logs = scratch / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
        rc = subprocess.run(command, stdout=out, stderr=err, cwd=ROOT).returncode
    entry.update(reused=False, process_s=round(time.perf_counter() - began, 2), rc=rc)
    if rc:
        entry["stderr_tail"] = "\n".join((logs / f"{name}.err").read_text().splitlines()[-tail:])
        print(f"{name} failed (exit {rc}):\n{entry['stderr_tail']}", file=sys.stderr)
    return entry


def add_sweep_arguments(parser: argparse.ArgumentParser, name: str, out: Path) -> None:
    """The options every sweep takes: overrides, where its runs go (reused unless --rerun), where
    its results go, and --plot-only."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / f"cocodc-{name}-benchmark",
                        help="where the run directories go")  # fmt: skip
    parser.add_argument("--rerun", action="store_true", help="run again even where a finished run of the config is")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--plot-only", action="store_true", help="the table and plots again from results.json")
