"""Everything a GPU has to show, in one unattended command (about 8 minutes on one H100):

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu/<device>] [--budget-s 480]
    python benchmarks/gpu_check.py --cpu-dry-run      # the same steps, tiny, on this CPU: does it run?

1. throughput: tokens/s, TFLOP/s and MFU of gpu-150m and gpu-1b on one GPU, compile off/on and
   activation checkpointing off/full (benchmarks/throughput.py's side-by-side run);
2. streaming: a 100-step, 2-region Streaming DiLoCo run of gpu-150m with both regions on the one
   GPU over gloo, on the shipped corpus (the machine may have no network): loss falls, compute
   fraction;
3. kernels: benchmarks/kernels.py's table of the outer sync's fused kernels;
4. with 2+ GPUs: NCCL inside a region, DDP and fsdp, while fragments are in flight on the
   inter-region group (2 regions of GPUs / 2 ranks);
5. where the kernel has the netem qdisc: a short run over `wan.emulation: netem`.

Each step runs as a subprocess with its own time limit; one that fails or runs out of time is
recorded as such and the rest go on. The table at the end names every step's outcome and its
figures; the outputs stay under --out (each step's log, tables and summaries).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


class Check:
    def __init__(self, out: Path, budget_s: float, dry: bool):
        self.out, self.dry = out, dry
        self.deadline = time.monotonic() + budget_s
        self.rows: list[tuple[str, str, str]] = []  # step, outcome, figures

    def run(self, step: str, command: list[str], limit_s: float) -> bool:
        """`command` as a subprocess, its output in <out>/<step>.log; whether it succeeded."""
        left = self.deadline - time.monotonic()
        if left < 20:
            self.rows.append((step, "skipped", "the time budget ran out"))
            return False
        log = self.out / f"{step}.log"
        began = time.monotonic()
        try:
            with open(log, "w") as f:
                done = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=min(limit_s, left))
        except subprocess.TimeoutExpired:
            self.rows.append((step, "timed out", f"after {time.monotonic() - began:.0f} s; see {log.name}"))
            return False
        if done.returncode != 0:
            last = [line for line in log.read_text().splitlines() if line.strip()][-1:] or ["(no output)"]
            self.rows.append((step, f"failed ({done.returncode})", last[0][:150]))
            return False
        return True

    def record(self, step: str, figures: str) -> None:
        self.rows.append((step, "ok", figures))


def train_command(config: str, name: str, settings: list[str], out: Path) -> list[str]:
    command = [sys.executable, "-m", "cocodc.cli", "train", "-c", str(REPO / "configs" / config), "--overwrite"]
    for setting in [*settings, f"run.dir={out / 'runs'}", f"run.name={name}", "wandb.mode=disabled"]:
        command += ["--set", setting]
    return command


def summary_of(out: Path, name: str) -> dict:
    """A run's summary, kept beside the table (the run directory goes at the end)."""
    kept = out / f"{name}-summary.json"
    shutil.copy(out / "runs" / name / "summary.json", kept)
    return json.loads(kept.read_text())


def throughput(check: Check, gpus: int) -> None:
    variants = ["compile", "activation checkpointing: full", "compile + activation checkpointing: full"]
    configs = ["tiny"] if check.dry else ["gpu-150m", "gpu-1b"]
    steps = ["--steps", "3", "--repeats", "1"] if check.dry else ["--steps", "10", "--repeats", "2"]
    for config in configs:
        where = check.out / f"throughput-{config}"
        command = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), str(REPO / "configs" / f"{config}.yaml"),
                   *steps, "--only", *variants, "--out", str(where)]  # fmt: skip
        if check.run(f"throughput-{config}", command, 300):
            rows = list(_csv(where / "rows.csv"))
            best = max(rows, key=lambda r: float(r["tokens_per_s"]))
            mfu = f", MFU {100 * float(best['mfu']):.1f}%" if best["mfu"] else ""
            check.record(f"throughput-{config}", f"best: {best['variant']}, {float(best['tokens_per_s']):,.0f} tok/s, "
                         f"{float(best['tflops']):.3g} TFLOP/s{mfu} (table: {where.name}/table.md)")  # fmt: skip


def streaming(check: Check) -> None:
    config = "tiny.yaml" if check.dry else "gpu-150m.yaml"
    steps = 12 if check.dry else 100
    settings = ["topology.ranks_per_region=1", "sync.method=streaming", "sync.fragments=2", "sync.sync_every=20",
                "sync.delay=5", f"train.steps={steps}", "train.warmup_steps=10", "data.source=kjv",
                "data.tokenizer=bytes", "eval.every=0", "eval.batches=4", "checkpoint.every=0"]  # fmt: skip
    if check.run("streaming", train_command(config, "streaming", settings, check.out), 240):
        s = summary_of(check.out, "streaming")
        check.record("streaming", f"eval loss {s['initial_eval_loss']:.3f} -> {s['final_eval_loss']:.3f}, "
                     f"compute fraction {s['compute_fraction']:.3f}, {s['tokens_per_s']:,.0f} tok/s")  # fmt: skip


def kernels(check: Check) -> None:
    where = check.out / "kernels"
    command = [sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--out", str(where), "--repeats", "5"]
    if check.dry:
        command += ["--device", "cpu", "--sizes", "65536", "--paths", "eager"]
    if check.run("kernels", command, 180):
        check.record("kernels", f"table and plot in {where.name}/")


def nccl_inside_regions(check: Check, gpus: int) -> None:
    if gpus < 2 and not check.dry:
        check.rows.append(("nccl-inside-regions", "skipped", f"{gpus} GPU: needs 2 or more"))
        return
    per_region = 2 if check.dry else gpus // 2  # the dry run: gloo inside the regions
    for parallel in ("ddp", "fsdp"):
        name = f"nccl-{parallel}"
        settings = ["topology.regions=2", f"topology.ranks_per_region={per_region}",
                    f"topology.parallel={parallel}", "sync.method=streaming", "sync.fragments=2", "sync.sync_every=8",
                    "sync.delay=3", "train.steps=24", "data.source=kjv", "data.tokenizer=bytes", "eval.every=0",
                    "eval.batches=4", "checkpoint.every=0"]  # fmt: skip
        config = "tiny.yaml" if check.dry else "gpu-150m.yaml"
        if check.run(name, train_command(config, name, settings, check.out), 240):
            s = summary_of(check.out, name)
            check.record(name, f"eval loss {s['initial_eval_loss']:.3f} -> {s['final_eval_loss']:.3f}, "
                         f"{s['tokens_per_s']:,.0f} tok/s")  # fmt: skip


def netem(check: Check) -> None:
    probe = subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms"], capture_output=True)
    if probe.returncode != 0:
        check.rows.append(("netem", "skipped", "this kernel has no netem qdisc (or tc is missing)"))
        return
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
    settings = ["wan.emulation=netem", "wan.latency_ms=20", "wan.bandwidth_mbps=1000", "sync.method=streaming",
                "sync.fragments=2", "sync.sync_every=8", "sync.delay=3", "train.steps=24", "eval.every=0",
                "checkpoint.every=0"]  # fmt: skip
    if check.run("netem", train_command("tiny.yaml", "netem", settings, check.out), 180):
        s = summary_of(check.out, "netem")
        check.record("netem", f"eval loss {s['final_eval_loss']:.3f}, blocked {s['blocked_s']:.2f} s")


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--budget-s", type=float, default=480)
    parser.add_argument("--cpu-dry-run", action="store_true", help="the same steps, tiny, on the CPU")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    gpus = torch.cuda.device_count()
    if not gpus and not args.cpu_dry_run:
        sys.exit("gpu_check: no CUDA device here (--cpu-dry-run runs the same steps, tiny, on the CPU)")
    device = "cpu-dry-run" if args.cpu_dry_run else torch.cuda.get_device_name(0).replace(" ", "-")
    out = args.out or REPO / "benchmarks" / "results" / "gpu" / device
    if out.exists():
        shutil.rmtree(out / "runs", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget_s, args.cpu_dry_run)
    began = time.monotonic()
    throughput(check, gpus)
    streaming(check)
    kernels(check)
    nccl_inside_regions(check, gpus)
    netem(check)
    shutil.rmtree(out / "runs", ignore_errors=True)  # the summaries are in the table; checkpoints are large
    title = f"gpu_check on {device} ({gpus} GPU), torch {torch.__version__}, {time.monotonic() - began:.0f} s"
    lines = [title, "", "| step | outcome | figures |", "|---|---|---|"]
    lines += [f"| {step} | {outcome} | {figures} |" for step, outcome, figures in check.rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
