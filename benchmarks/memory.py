"""The training state per rank, ddp against fsdp, measured: `state_bytes_per_rank` of real runs.

Runs the demo model (configs/tiny.yaml) for a few steps on 2 regions of R = 1, 2, 4 ranks under
each parallelism and method, reads each run's summary.json (bytes measured from the tensors'
storage on rank 0), and writes a table of bytes per parameter per rank, a projection for 1B and
8B models on 8 GPUs per region from the same per-parameter figures, and a plot.

    python benchmarks/memory.py [--out benchmarks/results/memory] [--ranks 1 2 4]

Every launch starts 2 x R processes on this host; on 2 cores the R = 4 runs take longest.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PARTS = ("model", "grads", "optimizer", "outer", "outer_host", "in_flight_peak")
ON_DEVICE = tuple(part for part in PARTS if part != "outer_host")
METHODS = {
    "diloco": ["sync.method=diloco", "sync.sync_every=4"],
    "streaming": ["sync.method=streaming", "sync.sync_every=4", "sync.fragments=2", "sync.delay=1"],
    "cocodc": ["sync.method=cocodc", "sync.sync_every=4", "sync.fragments=2", "sync.delay=1"],
}
# How a region holds its state: "fsdp+host" is fsdp with sync.outer_state host (measured for cocodc).
LAYOUTS = {"ddp": ["topology.parallel=ddp"], "fsdp": ["topology.parallel=fsdp"],
           "fsdp+host": ["topology.parallel=fsdp", "sync.outer_state=host"]}  # fmt: skip


def measure(out: Path, method: str, parallel: str, ranks: int) -> dict[str, int]:
    name = f"{method}-{parallel}-r{ranks}"
    summary = out / "runs" / name / "summary.json"
    if not summary.exists():
        settings = [*METHODS[method], *LAYOUTS[parallel], f"topology.ranks_per_region={ranks}",
                    "train.steps=8", "eval.every=0", "checkpoint.every=0", "wandb.mode=disabled",
                    f"run.dir={out / 'runs'}", f"run.name={name}"]  # fmt: skip
        config = str(REPO / "configs" / "tiny.yaml")
        command = [sys.executable, "-m", "cocodc.cli", "train", "-c", config, "--overwrite"]
        for setting in settings:
            command += ["--set", setting]
        subprocess.run(command, check=True, capture_output=True)
    return json.loads(summary.read_text())["state_bytes_per_rank"]


def param_count() -> int:
    from cocodc.config import load_config
    from cocodc.model import Transformer

    config = load_config(REPO / "configs" / "tiny.yaml")
    return sum(p.numel() for p in Transformer(config.model, 256, config.train.seq_len).parameters())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    return parser


def main() -> None:
    args = build_parser().parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    params = param_count()
    rows = []
    for method in METHODS:
        for parallel in LAYOUTS if method == "cocodc" else ("ddp", "fsdp"):
            for ranks in args.ranks:
                measured = measure(args.out, method, parallel, ranks)
                rows.append({"method": method, "parallel": parallel, "ranks": ranks,
                             **{part: measured[part] / params for part in PARTS}})  # fmt: skip
                print(f"{method:>9} {parallel:>4} R={ranks}: " + " ".join(f"{p} {rows[-1][p]:.2f}" for p in PARTS))
    with open(args.out / "bytes_per_param.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    lines = [
        f"Bytes per parameter per rank, rank 0, demo model ({params:,} parameters), 2 regions, fp32 on CPU.",
        "",
        "total: all but the host's outer state (on a GPU run, what the GPU holds).",
        "",
        "| method | parallel | R | model | grads | AdamW | outer | outer (host) | in flight (peak) | total |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        total = sum(r[p] for p in ON_DEVICE)
        lines.append(f"| {r['method']} | {r['parallel']} | {r['ranks']} | "
                     + " | ".join(f"{r[p]:.2f}" for p in PARTS) + f" | {total:.2f} |")  # fmt: skip
    widest = max(args.ranks)
    lines += ["", f"Projection to 8 GPUs per region, fp32 state as measured (the R = {widest} rows; what is sharded "
              f"x {widest}/8): bytes per parameter of outer state per GPU, GB per GPU for a 1B "
              "and an 8B model, and host GB per GPU where the outer state lives there.", "",
              "| method | parallel | outer B/param per GPU | 1B: GB per GPU | 8B: GB per GPU "
              "| host GB per GPU (1B / 8B) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["ranks"] != widest:
            continue
        # fsdp shards every part over the region's ranks; ddp only cuts what is in flight.
        sharded = PARTS if r["parallel"].startswith("fsdp") else ("in_flight_peak",)
        at_8 = {part: r[part] * (widest / 8 if part in sharded else 1.0) for part in PARTS}
        device, host = sum(at_8[p] for p in ON_DEVICE), at_8["outer_host"]
        lines.append(
            f"| {r['method']} | {r['parallel']} | {at_8['outer']:.2f} | {device:.1f} | {8 * device:.1f} "
            f"| {host:.1f} / {8 * host:.1f} |"
        )  # GB: 1e9 parameters x bytes per parameter; fmt: skip
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["method"] == "cocodc"]
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    bottom = [0.0] * len(shown)
    for part in PARTS:
        values = [r[part] for r in shown]
        hatch = "//" if part == "outer_host" else None  # host memory, not the GPU's
        ax.bar(
            [r["parallel"].replace("+", "\n+") + f"\nR={r['ranks']}" for r in shown],
            values,
            bottom=bottom,
            label=part,
            hatch=hatch,
        )
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("bytes per parameter per rank")
    ax.set_title("CoCoDC's training state per rank, measured (2 regions, demo model, fp32)")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(args.out / "bytes_per_param.png", dpi=120)


if __name__ == "__main__":
    main()
