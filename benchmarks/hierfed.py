"""Hierarchical federated fine-tuning (HierFedLoRA's groups, edges and depths) against flat, on
non-IID clients, with its two ablations, by eval loss, modelled wall-clock and bytes to flat's
final eval loss.

    python benchmarks/hierfed.py [--seeds 0 1 2] [--rounds 20] [--set KEY=VALUE ...]
        [--scratch DIR] [--out benchmarks/results/hierfed] [--rerun] [--plot-only]

Every run is a real `cocodc train -c configs/hierfed.yaml --set ...` (40 clients, Dirichlet 0.1
over the books, the briefly pretrained demo model's blocks fine-tuned), one after another:

- flat: `federated.groups=0`, the same clients_per_round; a device's path to the cloud
  crosses the edge tier's wide-area hop too, so its latency is the device's plus the edge's
  (`devices.latency_ms` + `devices.cloud_latency_ms`);
- hierarchical: 4 groups close to the global mix, depths and edge rounds from the rule;
- one frequency, full depth: the same groups, every group 2 edge rounds and every block tuned
  (what the rule's choices add);
- random groups: the rule on a seeded random partition (what the grouping adds).

The target is flat's median final eval loss over the seeds. Per run: its first eval at or
below the target, the modelled seconds to it (the sum of the rounds' modelled_s) and the bytes
moved to it, on the cloud tier (edge or device to the cloud: the wide-area link) and in all
(the device tier too). Medians over seeds; a seed that never reaches the target counts as the
slowest ("-" where the median does not reach it). Writes results.json, results.md and a plot of
eval loss against modelled wall-clock and against rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from sweep import add_sweep_arguments, band, ok, progress, provenance, seal, train_run

CONFIG = "configs/hierfed.yaml"
DEFAULT_OUT = Path("benchmarks/results/hierfed")
VARIANTS: dict[str, list[str]] = {
    "flat": ["federated.groups=0"],
    "hierarchical (the rule)": [],
    "one frequency, full depth": ["federated.group_rounds=2"],  # and federated.group_depth = model.n_layers
    "random groups": ["federated.group_by=random"],
}


def flat_latency(settings: list[str]) -> list[str]:
    """Flat runs' devices reach the cloud across the edge tier's wide-area hop too."""
    from cocodc.config import load_config

    devices = load_config(CONFIG, settings).devices
    return [f"devices.latency_ms={devices.latency_ms + devices.cloud_latency_ms:g}"]


def run(args: argparse.Namespace, variant: str, seed: int) -> dict:
    from cocodc.metrics import read_records

    name = f"{variant.split(' (')[0].replace(' ', '-').replace(',', '')}-seed{seed}"
    settings = [f"federated.rounds={args.rounds}", *args.set, *VARIANTS[variant], f"seed={seed}"]
    if variant == "flat":
        settings += flat_latency(settings)
    if variant == "one frequency, full depth":
        from cocodc.config import load_config

        settings.append(f"federated.group_depth={load_config(CONFIG, settings).model.n_layers}")
    settings += [f"run.dir={args.scratch}", f"run.name={name}"]
    entry = {"name": name, "variant": variant, "seed": seed}
    entry.update(train_run(CONFIG, settings, args.scratch, name, rerun=args.rerun, tail=20))
    if entry["rc"]:
        return entry
    run_dir = args.scratch / name
    summary = json.loads((run_dir / "summary.json").read_text())
    records = read_records(run_dir / "metrics.jsonl")
    rounds = sorted((r for r in records if r["kind"] == "round"), key=lambda r: r["round"])
    evals = sorted((r for r in records if r["kind"] == "eval"), key=lambda r: r["step"])
    elapsed, cloud, both = 0.0, 0, 0
    cumulative = {0: (0.0, 0, 0)}
    for r in rounds:
        elapsed += r["modelled_s"]
        cloud += r["bytes_up"] + r["bytes_down"]
        both += r["bytes_up"] + r["bytes_down"] + r.get("edge_bytes_up", 0) + r.get("edge_bytes_down", 0)
        cumulative[r["round"]] = (elapsed, cloud, both)
    plan = [r for r in records if r["kind"] == "groups"]
    entry.update(
        final_eval_loss=summary["final_eval_loss"],
        initial_eval_loss=summary["initial_eval_loss"],
        eval_rounds=[r["step"] for r in evals],
        eval_loss=[r["loss"] for r in evals],
        eval_modelled_s=[cumulative[r["step"]][0] for r in evals],
        eval_cloud_bytes=[cumulative[r["step"]][1] for r in evals],
        eval_bytes=[cumulative[r["step"]][2] for r in evals],
        modelled_s=elapsed,
        cloud_bytes=cloud,
        bytes=both,
        groups=plan[0]["groups"] if plan else None,
        wall_s=summary.get("wall_s"),
    )
    return entry


def reached(entry: dict, target: float) -> int | None:
    """The index of the run's first eval at or below `target`."""
    return next((i for i, loss in enumerate(entry["eval_loss"]) if loss <= target), None)


def median_reached(values: list[float | None]) -> float | None:
    """The median over seeds, a seed that never reached counting as the slowest (None: the median
    did not reach)."""
    ordered = sorted(values, key=lambda v: (v is None, v or 0.0))
    middle = ordered[(len(ordered) - 1) // 2 : len(ordered) // 2 + 1]
    return None if any(v is None for v in middle) else sum(middle) / len(middle)


def analyse(results: dict) -> dict:
    runs = [r for r in results["runs"] if ok(r)]
    flat = [r["final_eval_loss"] for r in runs if r["variant"] == "flat"]
    target = statistics.median(flat) if flat else None
    rows = []
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine or target is None:
            continue
        at = [reached(r, target) for r in mine]

        def to_target(key: str, scale: float = 1.0, mine=mine, at=at) -> float | None:
            return median_reached([None if i is None else r[key][i] * scale for r, i in zip(mine, at, strict=True)])

        rows.append(
            {
                "variant": variant,
                "seeds": len(mine),
                "final": statistics.median(r["final_eval_loss"] for r in mine),
                "final_range": (min(r["final_eval_loss"] for r in mine), max(r["final_eval_loss"] for r in mine)),
                "rounds": to_target("eval_rounds"),
                "seconds": to_target("eval_modelled_s"),
                "cloud_mb": to_target("eval_cloud_bytes", 1e-6),
                "all_mb": to_target("eval_bytes", 1e-6),
                "total_s": statistics.median(r["modelled_s"] for r in mine),
                "groups": mine[0]["groups"],
            }
        )
    return {"target": target, "rows": rows}


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(analysis: dict) -> str:
    if analysis["target"] is None:
        return "No flat run finished: no target."
    rows = analysis["rows"]
    flat = next((r for r in rows if r["variant"] == "flat"), None)
    lines = [
        f"Target: flat's median final eval loss, {analysis['target']:.4f}.",
        "",
        "| variant | final eval loss: median (min..max) | rounds to target | modelled s to target | speed-up | "
        "MB to target: cloud tier / all | modelled s, all rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = flat["seconds"] / r["seconds"] if flat and flat["seconds"] and r["seconds"] else None
        lines.append(
            f"| {r['variant']} | {r['final']:.4f} ({r['final_range'][0]:.4f}..{r['final_range'][1]:.4f}) | "
            f"{fmt(r['rounds'], '.0f')} | {fmt(r['seconds'], '.1f')} | {fmt(speedup, '.2f')}x | "
            f"{fmt(r['cloud_mb'], '.1f')} / {fmt(r['all_mb'], '.1f')} | {r['total_s']:.1f} |"
        )
    return "\n".join(lines)


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for x_key, label, file in (("eval_modelled_s", "modelled seconds", "eval-loss-vs-modelled-time.png"),
                               ("eval_rounds", "global rounds", "eval-loss-vs-round.png")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for variant in VARIANTS:
            runs = [r for r in results["runs"] if ok(r) and r["variant"] == variant]
            if not runs:
                continue
            xs, mid, low, high = band(runs, x_key)
            ax.plot(xs, mid, label=variant)
            ax.fill_between(xs, low, high, alpha=0.15)
        ax.set_xlabel(label)
        ax.set_ylabel("global eval loss (median, min..max over seeds)")
        ax.set_title("hierarchical against flat federated fine-tuning, 40 clients, Dirichlet 0.1")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / file, dpi=120)
        plt.close(fig)
        written.append(out / file)
    return written


def report(results: dict, out: Path) -> None:
    analysis = analyse(results)
    plan = next((r["groups"] for r in analysis["rows"] if r["variant"] == "hierarchical (the rule)"), None)
    lines = ["# Hierarchical against flat federated fine-tuning", "", table(analysis), "", "## How to read it", ""]
    lines += [
        f"- Runs: `{CONFIG}` with `federated.rounds={results['rounds']}` {' '.join(f'`{s}`' for s in results['set'])}; "
        f"per variant: "
        + "; ".join(f"{v}: {' '.join(f'`{s}`' for s in VARIANTS[v]) or '(the config)'}" for v in VARIANTS)
        + "; one frequency, full depth also sets `federated.group_depth` to `model.n_layers`, and flat's devices "
        "take the edges' latency to the cloud too. Seeds " + ", ".join(map(str, results["seeds"])) + ".",
        "- To target: the first eval (every 2 global rounds) at or below it; modelled seconds are the rounds' "
        "modelled_s summed; MB up and down, on the cloud tier (flat: the devices' uploads and downloads; "
        "hierarchical: the edges') and in all (the device tier too). Speed-up: flat's modelled seconds to the "
        "target over the variant's.",
        f"- Sweep: {results.get('total_s', 0) / 60:.1f} min for {len(results['runs'])} runs.",
    ]
    if plan:
        lines.append("- The rule's groups (seed " + str(results["seeds"][0]) + "): " + "; ".join(
            f"group {g['group']}: {len(g['members'])} clients, divergence {g['divergence']:.3f}, depth {g['depth']}, "
            f"{g['edge_rounds']} edge rounds" for g in plan) + ".")  # fmt: skip
    if results.get("sources_changed"):
        lines.append("- WARNING: the package's sources changed during the sweep.")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    written = plots(results, out)
    print(table(analysis))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, " + ", ".join(map(str, written)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    add_sweep_arguments(parser, "hierfed", DEFAULT_OUT)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        report(json.loads((args.out / "results.json").read_text()), args.out)
        return
    results = {"seeds": args.seeds, "rounds": args.rounds, "set": args.set, "runs": [], **provenance()}
    began = time.perf_counter()
    total = len(args.seeds) * len(VARIANTS)
    for seed in args.seeds:
        for variant in VARIANTS:
            entry = run(args, variant, seed)
            results["runs"].append(entry)
            progress(entry, f"{len(results['runs'])}/{total}")
    results["total_s"] = time.perf_counter() - began
    seal(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    report(results, args.out)
    if not all(ok(r) for r in results["runs"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
