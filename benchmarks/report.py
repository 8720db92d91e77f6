"""Every generated figure of README.md and docs/, rebuilt from the committed results.

    python -m benchmarks.report            # rewrite every generated block
    python -m benchmarks.report --check    # exit 1, naming each block that differs (tests/test_figures.py)

A generated block sits between `<!-- figure: NAME -->` and `<!-- /figure -->` in the Markdown;
FIGURES maps NAME to the function that writes it from files under benchmarks/results/, by the rule
its docstring states (and the block says). Each benchmark writes those files; this reads them
only, so it runs in a second and needs no training.
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- figure: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figure -->)", re.DOTALL)

# The headline's sweep: CoCoDC at the defaults against Streaming DiLoCo at its best outer lr, at
# the most aggressive overlap (tau = 3H/P) on 4 regions, ten paired seeds.
HEADLINE = {
    "folder": "convergence-lambda750-seeds-4regions",
    "method": "cocodc a=0.5",
    "tau": "30",
    "command": ".venv/bin/python benchmarks/convergence.py --taus 30 --seeds 0 1 2 3 4 5 6 7 8 9 --methods "
    '"streaming a=0.5" "streaming a=0.5 olr=1.1" "cocodc a=0.5" "cocodc a=0.5 olr=0.9" '
    '"cocodc a=0.5 lambda=3000" --set topology.regions=4 --out benchmarks/results/convergence-lambda750-seeds-4regions',
}


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def paired_reduction(rows: list[dict[str, str]], split: str, method: str, tau: str) -> float | None:
    """The median (low: of an even count, the lower middle) over seeds of a method's paired
    reduction in steps to its reference's final eval loss; a seed that never reaches it counts as
    the slowest. None: the median never reaches it. The rule of convergence.py's tables."""
    mine = [r for r in rows if (r["split"], r["method"], r["tau"]) == (split, method, tau)]
    values = [float(r["reduction"]) if r["reduction"] else float("-inf") for r in mine]
    median = statistics.median_low(values)
    return None if median == float("-inf") else median


def headline() -> str:
    """README's convergence headline: CoCoDC's median paired reduction per split (HEADLINE)."""
    h = HEADLINE
    rows = _csv(RESULTS / h["folder"] / "convergence.csv")
    seeds = sorted({int(r["seed"]) for r in rows})
    reference = next(r["reference"] for r in rows if r["method"] == h["method"])
    olr = reference.split("olr=")[1] if "olr=" in reference else "the config's"
    iid, non_iid = (paired_reduction(rows, split, h["method"], h["tau"]) for split in ("iid", "non_iid"))
    return (
        "**What it measured.** On the CPU convergence benchmark (4 regions, the most aggressive overlap:\n"
        f"tau = 3H/P), CoCoDC reaches Streaming DiLoCo's final eval loss {iid:.0%} sooner on iid data and\n"
        f"{non_iid:.0%} on non_iid, against Streaming DiLoCo at its best outer learning rate ({olr}); most of\n"
        "the gain is the replay of the local progress. Those seeds also chose CoCoDC's settings, so read it\n"
        "as a first measurement, not a pre-registered one ([docs/results.md](docs/results.md)). The rule: the\n"
        f"median (the lower middle) over seeds {seeds[0]}-{seeds[-1]} of each seed's reduction in inner steps\n"
        "to the same seed's Streaming DiLoCo final eval loss, from\n"
        f"[benchmarks/results/{h['folder']}](benchmarks/results/{h['folder']}/convergence.csv);\n"
        "re-run (about 70 minutes here):\n\n"
        f"```bash\n{h['command']}\n```\n"
    )


def _memory() -> dict[tuple[str, str, int], dict[str, float]]:
    figures = {}
    for row in _csv(RESULTS / "memory" / "bytes_per_param.csv"):
        key = (row.pop("method"), row.pop("parallel"), int(row.pop("ranks")))
        figures[key] = {part: float(value) for part, value in row.items()}
    return figures


def readme_memory() -> str:
    """README: CoCoDC's outer state and an 8B model's state per GPU, sharded 8 ways: the R = 4
    figures of benchmarks/results/memory x 4/8 (every part shards under fsdp), as its projection."""
    parts = _memory()[("cocodc", "fsdp", 4)]
    outer = parts["outer"] * 4 / 8
    total = sum(parts[k] for k in ("model", "grads", "optimizer", "outer", "in_flight_peak")) * 4 / 8
    return (
        f"Sharded over 8 GPUs a region, CoCoDC's outer state is {outer:.1f} bytes per parameter per GPU (none with\n"
        f"the outer state in host memory), and an 8B model's training state about {total * 8:.0f} GB a GPU,\n"
        f"activations aside (projected from the CPU measurement in benchmarks/results/memory):\n"
        f"[docs/scale.md](docs/scale.md).\n"
    )


def _tables_of(path: Path) -> list[str]:
    """The Markdown tables of a committed results file, as its benchmark wrote them."""
    tables, current = [], []
    for line in [*path.read_text().splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append("\n".join(current) + "\n")
            current = []
    return tables


def committed_table(relative: str, index: int = 0) -> Callable[[], str]:
    def figure() -> str:
        return _tables_of(RESULTS / relative)[index]

    figure.__doc__ = f"Table {index + 1} of benchmarks/results/{relative}, as its benchmark wrote it."
    return figure


def hierfed() -> str:
    """docs/federated.md: the target and the table of benchmarks/results/hierfed/results.md."""
    text = (RESULTS / "hierfed" / "results.md").read_text()
    return text[text.index("Target") : text.index("\n\n## ")] + "\n"


def quantized_mean() -> str:
    """docs/wan.md: the reduce-scatter's relative error over the gather's, per codec, over every
    member count and correlation of benchmarks/results/quantized-mean (from its rounded errors),
    and the gather's bytes at its largest member count."""
    header, _, *rows = _tables_of(RESULTS / "quantized-mean" / "quantized-mean.md")[0].splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    table = [dict(zip(columns, (c.strip() for c in row.strip("|").split("|")), strict=True)) for row in rows]
    rhos = [c.split("rho=")[1] for c in columns if c.startswith("gather err")]
    ratios: dict[str, list[float]] = {}
    for row in table:
        for rho in rhos:
            gather, scatter = float(row[f"gather err rho={rho}"]), float(row[f"reduce_scatter err rho={rho}"])
            ratios.setdefault(row["codec"], []).append(scatter / gather)
    low = min(min(r) for r in ratios.values())
    high = max(max(r) for r in ratios.values())
    each = ", ".join(f"{codec} {min(r):.1f}-{max(r):.1f}" for codec, r in ratios.items())
    widest = max(table, key=lambda row: (row["codec"] == "e3m0", int(row["members"])))
    return (
        f"the reduce-scatter's relative error is {low:.1f} to {high:.1f} times the gather's ({each}; the\n"
        "ratios of the table's rounded errors) and does not grow with M, while the gather's bytes do\n"
        f"(e3m0 at {widest['members']} regions: {float(widest['gather bytes/fp32']):.1f} times an fp32 ring, against "
        f"{float(widest['reduce_scatter bytes/fp32']):.2f}).\n"
    )


def _rows(relative: str) -> dict[str, dict[str, str]]:
    """The first table of a committed results file, as {first column: {column: cell}}."""
    header, _, *lines = _tables_of(RESULTS / relative)[0].splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = [dict(zip(columns, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines]
    return {row[columns[0]]: row for row in rows}


def hierfed_summary() -> str:
    """README and docs/results.md: the hierarchical mode against flat, from the table of
    benchmarks/results/hierfed/results.md (medians over its seeds)."""
    rows = _rows("hierfed/results.md")
    flat, hier = rows["flat"], rows["hierarchical (the rule)"]
    bytes_column, final_column = "MB to target: cloud tier / all", "final eval loss: median (min..max)"
    flat_mb = float(flat[bytes_column].split(" / ")[0])
    hier_cloud, hier_all = (float(v) for v in hier[bytes_column].split(" / "))
    return (
        "Hierarchical federated fine-tuning (HierFedLoRA's groups, edges and fine-tuning depths) reached\n"
        f"flat fine-tuning's final eval loss at {hier['speed-up']} flat's speed in modelled time on the CPU\n"
        f"benchmark (40 clients, 3 seeds), not the 2x asked of it, moving {flat_mb / hier_cloud:.1f}x fewer bytes\n"
        f"over the wide-area tier and {hier_all / flat_mb:.2f}x the bytes in all; in twice the modelled time it\n"
        f"ended lower ({hier[final_column].split()[0]} against {flat[final_column].split()[0]}).\n"
    )


FIGURES: dict[str, Callable[[], str]] = {
    "hierfed-summary": hierfed_summary,
    "quantized-mean": quantized_mean,
    "headline": headline,
    "headline-table": committed_table(f"{HEADLINE['folder']}/convergence.md"),
    "readme-memory": readme_memory,
    "memory-table": committed_table("memory/table.md", 0),
    "memory-projection": committed_table("memory/table.md", 1),
    "throughput-cpu": committed_table("throughput/CPU/table.md"),
    "federated-strategies": committed_table("federated/results.md"),
    "split-methods": committed_table("split/results.md"),
    "hierfed": hierfed,
}


class FigureError(Exception):
    """A block whose figure cannot be built: no such figure, or its results file is missing."""


def render(text: str) -> str:
    """`text` with every generated block rewritten."""

    def rebuild(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in FIGURES:
            raise FigureError(f"no figure named {name!r} (benchmarks/report.py FIGURES)")
        try:
            return match.group(1) + FIGURES[name]() + match.group(4)
        except FileNotFoundError as err:
            raise FigureError(f"figure {name}: no {Path(err.filename).relative_to(ROOT)} (run its benchmark)") from None

    return BLOCK.sub(rebuild, text)


def stale(text: str) -> list[str]:
    """The names of the blocks in `text` that differ from what render writes."""
    rendered = {m["name"]: m["body"] for m in BLOCK.finditer(render(text))}
    return [m["name"] for m in BLOCK.finditer(text) if m["body"] != rendered[m["name"]]]


def main() -> None:
    args = build_parser().parse_args()
    texts = {name: (ROOT / name).read_text() for name in DOCUMENTS}
    try:  # every document rendered before any is written: a missing figure changes nothing
        rendered = {name: render(text) for name, text in texts.items()}
    except FigureError as err:
        sys.exit(f"benchmarks.report: {err}")
    stale_blocks = [f"{name}: figure {block} is stale" for name in DOCUMENTS for block in stale(texts[name])]
    if args.check:
        for line in stale_blocks:
            print(line, file=sys.stderr)
        if stale_blocks:
            sys.exit("run: python -m benchmarks.report")
        return
    for name, text in rendered.items():
        if text != texts[name]:
            (ROOT / name).write_text(text)
            print(f"rewrote {name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    return parser


if __name__ == "__main__":
    main()
