"""Overlap under a slow link: DiLoCo against Streaming DiLoCo (fp32 and 4-bit), by real runs.

    python benchmarks/overlap.py [-c configs/tiny.yaml] [--links 10:100 50:100 100:100 100:10]
        [--emulation model netem] [--out benchmarks/results/overlap]

A link is ONE_WAY_LATENCY_MS:BANDWIDTH_MBPS.

Every cell is a real `cocodc train` run (torchrun, gloo) whose WAN is either the comm engine's
link model (`model`) or real network namespaces joined by the emulated WAN (`netem`, needs root).
DiLoCo waits for every transfer; Streaming DiLoCo sends each fragment `--delay` steps before it
needs it. Prints a markdown table (compute fraction, wall-clock, time blocked, bytes per region,
final eval loss) and writes it, a CSV and a plot into --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "diloco": ["sync.method=diloco"],
    "streaming fp32": ["sync.method=streaming", "sync.quantize=fp32"],
    "streaming 4-bit": ["sync.method=streaming", "sync.quantize=e3m0"],
}
COLUMNS = ["emulation", "latency_ms", "bandwidth_mbps", "method", "fragments", "delay", "compute_fraction", "wall_s",
           "blocked_s", "mb_sent", "final_eval_loss"]  # fmt: skip


def run_cell(args: argparse.Namespace, emulation: str, latency: float, bandwidth: float, method: str) -> dict:
    name = f"overlap-{emulation}-{latency:g}ms-{bandwidth:g}mbps-{method.replace(' ', '-')}"
    streaming = method != "diloco"
    settings = [
        *METHODS[method],
        f"sync.fragments={args.fragments if streaming else 1}",
        f"sync.delay={args.delay if streaming else 0}",
        f"wan.emulation={emulation}",
        f"wan.latency_ms={latency}",
        f"wan.bandwidth_mbps={bandwidth}",
        f"run.dir={args.out / 'runs'}",
        f"run.name={name}",
        "checkpoint.every=0",
        *args.set,
    ]
    command = [sys.executable, "-m", "cocodc.cli", "train", "-c", args.config, "--overwrite"]
    command += [arg for setting in settings for arg in ("--set", setting)]
    began = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"overlap: {name} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((args.out / "runs" / name / "summary.json").read_text())
    print(f"  {name}: {time.perf_counter() - began:.0f}s", file=sys.stderr)
    return {
        "emulation": emulation,
        "latency_ms": latency,
        "bandwidth_mbps": bandwidth,
        "method": method,
        "fragments": args.fragments if streaming else 1,
        "delay": args.delay if streaming else 0,
        "compute_fraction": round(summary["compute_fraction"], 3),
        "wall_s": round(summary["wall_s"], 1),
        "blocked_s": round(summary["blocked_s"], 2),
        "mb_sent": round(summary["bytes_sent"] / 1e6, 2),
        "final_eval_loss": round(summary["final_eval_loss"], 4),
    }


def parse_link(text: str) -> tuple[float, float]:
    latency, sep, bandwidth = text.partition(":")
    try:
        return float(latency), float(bandwidth)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a link is LATENCY_MS:BANDWIDTH_MBPS, e.g. 100:100; got {text!r}") from None


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = list(dict.fromkeys((r["emulation"], r["latency_ms"], r["bandwidth_mbps"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        cells = [next((r for r in rows if (r["emulation"], r["latency_ms"], r["bandwidth_mbps"]) == link
                       and r["method"] == method), None) for link in links]  # fmt: skip
        xs = [i + (m - (len(methods) - 1) / 2) * width for i in range(len(links))]
        axes[0].bar(xs, [c["compute_fraction"] if c else 0 for c in cells], width, label=method)
        axes[1].bar(xs, [c["wall_s"] if c else 0 for c in cells], width, label=method)
    labels = [f"{e}\n{lat:g} ms, {bw:g} Mbit/s" for e, lat, bw in links]
    for ax, title in zip(axes, ["compute fraction (time in inner steps / wall-clock)", "wall-clock (s)"], strict=True):
        ax.set_xticks(range(len(links)), labels, fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(min(0.5, min(r["compute_fraction"] for r in rows) - 0.05), 1.0)
    axes[0].axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
    axes[0].legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="configs/tiny.yaml")
    parser.add_argument("--links", type=parse_link, nargs="+", default=[(10, 100), (50, 100), (100, 100), (100, 10)])
    parser.add_argument("--emulation", nargs="+", choices=["model", "netem"], default=["model"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--fragments", type=int, default=2, help="P for streaming")
    parser.add_argument("--delay", type=int, default=5, help="tau for streaming, in inner steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overlap"))
    return parser


def main() -> None:
    args = build_parser().parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for emulation in args.emulation:
        for latency, bandwidth in args.links:
            for method in args.methods:
                rows.append(run_cell(args, emulation, latency, bandwidth, method))
    table = markdown(rows)
    print(table)
    (args.out / "overlap.md").write_text(table + "\n")
    with open(args.out / "overlap.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "overlap.png")
    print(f"wrote {args.out / 'overlap.md'}, overlap.csv and overlap.png", file=sys.stderr)


if __name__ == "__main__":
    main()
