"""Quantized means: the gather path against the reduce-scatter path, by error and bytes.

    python benchmarks/quantized_mean.py [--codecs e3m0 int8 fp8 bf16] [--members 2 4 8 16 32]
        [--out benchmarks/results/quantized-mean]

Runs the comm engine's own arithmetic for both paths in one process (`simulate_all_reduce`, bit
for bit what the engine computes over a group) on pseudo-gradient-like values: magnitudes spread
over decades, correlation rho between members. Prints the relative error of each path and the
bytes each member sends relative to an fp32 ring all-reduce, writes a table and a plot. These
numbers set the engine's `auto` rule (gather while it sends no more than an fp32 all-reduce).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from cocodc.comm.codec import get_codec
from cocodc.comm.engine import choose_algorithm, reduction_bytes, simulate_all_reduce

PATHS = ("gather", "reduce_scatter")
RHOS = (0.0, 0.5, 0.9)


def measure(codec_name: str, members: int, numel: int) -> dict:
    codec = get_codec(codec_name)
    generator = torch.Generator().manual_seed(members)
    scale = torch.rand(numel, generator=generator) ** 4
    common = torch.randn(numel, generator=generator)
    row: dict = {"codec": codec_name, "members": members, "auto": choose_algorithm(codec, numel, members)}
    for rho in RHOS:
        values = [
            (math.sqrt(rho) * common + math.sqrt(1 - rho) * torch.randn(numel, generator=generator)) * scale
            for _ in range(members)
        ]
        exact = torch.stack(values).mean(0)
        for path in PATHS:
            mean = simulate_all_reduce(values, [1.0] * members, codec, path)
            row[f"{path} err rho={rho}"] = round(float((mean - exact).norm() / exact.norm()), 4)
    fp32 = reduction_bytes("all_reduce", codec, numel, 0, members)
    for path in PATHS:
        row[f"{path} bytes/fp32"] = round(reduction_bytes(path, codec, numel, 0, members) / fp32, 3)
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (errors, sizes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for codec in dict.fromkeys(r["codec"] for r in rows):
        mine = [r for r in rows if r["codec"] == codec]
        n = [r["members"] for r in mine]
        for path, style in zip(PATHS, ("-", "--"), strict=True):
            error = [r[f"{path} err rho=0.5"] for r in mine]
            (line,) = errors.plot(n, error, style, marker="o", label=f"{codec} {path}")
            sizes.plot(n, [r[f"{path} bytes/fp32"] for r in mine], style, marker="o", color=line.get_color())
    errors.set(xscale="log", yscale="log", xlabel="members", title="relative error of the mean (rho = 0.5)")
    sizes.set(xscale="log", yscale="log", xlabel="members", title="bytes sent / fp32 ring all-reduce")
    sizes.axhline(1.0, color="grey", linestyle=":", linewidth=0.8)
    errors.legend(fontsize=7)
    for ax in (errors, sizes):
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", nargs="+", default=["e3m0", "int8", "fp8", "bf16"])
    parser.add_argument("--members", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--numel", type=int, default=1 << 16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quantized-mean"))
    return parser


def main() -> None:
    args = build_parser().parse_args()
    rows = [measure(codec, n, args.numel) for codec in args.codecs for n in args.members]
    columns = list(rows[0])
    table = "\n".join(
        ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        + ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    )
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantized-mean.md").write_text(table + "\n")
    plot(rows, args.out / "quantized-mean.png")


if __name__ == "__main__":
    main()
