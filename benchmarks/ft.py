"""What fault tolerance costs and what it survives, by real runs on this host.

    python benchmarks/ft.py [-c configs/tiny.yaml] [--regions 3] [--steps 300] [--kill-at 46]
        [--latency-ms 100] [--out benchmarks/results/ft] [--set KEY=VALUE ...]

Three `cocodc train` runs of Streaming DiLoCo with the same config and seed: the default mode,
`ft.enabled` with no failure, and `ft.enabled` where region 1's worker is killed by SIGKILL right
after it sends the fragment of step --kill-at (torchrun restarts it; it heals from a live peer).
Prints a markdown table (final eval loss, wall-clock, the quorum's time per fragment sync: median
and 90th percentile, membership changes, syncs dropped) and writes it, a CSV and a plot of the
eval loss against inner steps with the kill and the rejoin marked into --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cocodc.config import load_config  # noqa: E402
from cocodc.metrics import read_records  # noqa: E402
from cocodc.sync.schedule import RoundRobinSchedule  # noqa: E402

COLUMNS = ["run", "final_eval_loss", "wall_s", "syncs", "quorum_s_median", "quorum_s_p90", "changes", "dropped"]


def train(args: argparse.Namespace, name: str, settings: list[str], faults: str = "") -> dict:
    settings = [*shape(args), "checkpoint.every=0", f"run.dir={args.out / 'runs'}", f"run.name={name}", *settings]
    command = [sys.executable, "-m", "cocodc.cli", "train", "-c", args.config, "--overwrite"]
    command += [arg for setting in settings for arg in ("--set", setting)]
    env = {**os.environ, "COCODC_FAULTS": faults} if faults else None
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"ft: {name} failed:\n{result.stderr[-3000:]}")
    run = args.out / "runs" / name
    summary = json.loads((run / "summary.json").read_text())
    records = read_records(run / "metrics.jsonl")
    region0 = [r for r in records if r.get("region") == 0]
    quorum = sorted(r["quorum_s"] for r in region0 if r["kind"] == "sync" and "quorum_s" in r)
    row = {
        "run": name,
        "final_eval_loss": summary["final_eval_loss"],
        "wall_s": summary["wall_s"],
        "syncs": sum(r["kind"] == "sync" for r in region0),
        "quorum_s_median": statistics.median(quorum) if quorum else None,
        "quorum_s_p90": quorum[int(0.9 * (len(quorum) - 1))] if quorum else None,
        "changes": [(r["step"], r["regions"]) for r in region0 if r["kind"] == "membership"],
        "dropped": sum(r["kind"] == "dropped" for r in region0),
    }
    curve = sorted((r["step"], r["loss"]) for r in records if r["kind"] == "eval" and r["scope"] == "global")
    return {**row, "curve": dict(curve)}


def shape(args: argparse.Namespace) -> list[str]:
    """The settings every run shares: Streaming DiLoCo with fragments in flight over a slow link."""
    return [
        f"topology.regions={args.regions}",
        "sync.method=streaming",
        "sync.fragments=2",
        "sync.sync_every=20",
        "sync.delay=4",
        f"train.steps={args.steps}",
        f"wan.latency_ms={args.latency_ms}",
        *args.set,
    ]


def first_send_after(args: argparse.Namespace, step: int) -> int:
    config = load_config(args.config, shape(args))
    s = config.sync
    schedule = RoundRobinSchedule(s.sync_every, s.fragments, s.delay)
    return next(k for k in range(step, config.train.steps) if schedule.sends_at(k))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", default="configs/tiny.yaml")
    parser.add_argument("--regions", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--kill-at", type=int, default=None, help="a send step (default: the first after 1/5 of the run)"
    )
    parser.add_argument("--latency-ms", type=float, default=100.0, help="the modelled WAN's one-way latency")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ft"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.kill_at is None:
        args.kill_at = first_send_after(args, args.steps // 5)
    rows = [
        train(args, "default", []),
        train(args, "ft", ["ft.enabled=true"]),
        train(args, "ft-killed", ["ft.enabled=true"], faults=f"sigkill:1@{args.kill_at}"),
    ]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    (args.out / "ft.md").write_text(table + "\n")
    with open(args.out / "ft.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    figure, axes = plt.subplots(figsize=(7, 4))
    for row in rows:
        steps = sorted(row["curve"])
        axes.plot(steps, [row["curve"][s] for s in steps], marker=".", label=row["run"])
    axes.axvline(args.kill_at, color="red", linestyle=":", label=f"region 1 killed (step {args.kill_at})")
    back = [step for step, regions in rows[2]["changes"] if step > args.kill_at and len(regions) == args.regions]
    if back:
        axes.axvline(back[0], color="green", linestyle=":", label=f"region 1 healed and back (step {back[0]})")
    axes.set_xlabel("inner step")
    axes.set_ylabel("eval loss (global model)")
    axes.set_title(f"{args.regions} regions, Streaming DiLoCo, {args.latency_ms:g} ms link")
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.out / "ft.png", dpi=120)
    print(f"wrote {args.out / 'ft.md'}, ft.csv, ft.png", file=sys.stderr)


if __name__ == "__main__":
    main()
