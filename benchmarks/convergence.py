"""Convergence under overlap: how many inner steps each method needs to reach Streaming DiLoCo's
final eval loss, over overlaps, seeds and data splits (DESIGN section 6).

    python benchmarks/convergence.py [-c configs/convergence.yaml] [--taus 1 10 20] [--seeds 0 1 2]
        [--splits iid non_iid] [--methods ...] [--set topology.regions=4 ...] [--out DIR]

Every cell is a real training run of the config (gloo, one process per region). The cells run
inside one torchrun job per data split, one after another, so the processes start once; a cell
whose run directory already holds a summary for the same config is not run again, so an
interrupted sweep continues where it stopped (and runs copied from another sweep's --out count).

Per split, tau and seed (paired: every method against the same seed's Streaming run), the target is
the final eval loss of the best Streaming DiLoCo variant of those run (alpha 0 or 0.5, outer
learning rate the config's or one of OUTER_LRS; by median over seeds); steps-to-target is the first
eval step at or below it, and the reduction is 1 - steps_method / steps_streaming; medians are over
seeds, a seed that never reaches the target counting as the slowest. The whole curve counts too:
the worst lag is the largest eval-loss lead of that Streaming run over the method at any eval after
the first sync. A method that sends more than Streaming DiLoCo (the adaptive schedule with
`sync.link_share`) also meets Streaming DiLoCo at the smaller H that sends as many bytes (a second
pass runs those cells). Streaming with the least overlap is also judged against the larger
overlaps' targets, as every overlapping method is: as it ran ("cocodc a=0.5 at tau 1": its merge
with no delay at all), and "perfectly compensated": the same run with its fragments arriving
tau - 1 steps later, each carrying the same pseudo-gradient, so that the regions train as without
the delay while the global copy (what is evaluated) holds only what has arrived: an estimate of the
most a compensation of the delay can reach. It models the steady state (over the first round it
trails the real runs, whose first pseudo-gradients span longer windows: the schedule skips the
slots that would send before step 1), so it has no lag of its own, nor a wall-clock;
`--bound-every 1` makes the runs at the smallest tau eval every step, so that the delayed curve is
sampled at every step. What a method leaves to a better compensation is its excess: its mean eval
loss over its own perfectly compensated curve in the last third of the run (Streaming DiLoCo's is
the delay's whole cost), a measure in loss where the steps to a target turn a few thousandths into
several points.

Writes convergence.md (medians and spreads over seeds), convergence.csv (every cell) and one plot
per split and tau: eval loss against inner steps, and against wall-clock under the config's link
model (which changes no loss, only the time).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cocodc.config import Config

COCODC = ["sync.method=cocodc", "sync.alpha=0.5"]
# Name -> overrides. Methods without overlap run once per seed and split, not once per tau.
METHODS: dict[str, list[str]] = {
    "ddp": ["sync.method=ddp"],
    "diloco": ["sync.method=diloco", "sync.fragments=1"],
    "streaming a=0": ["sync.method=streaming", "sync.alpha=0.0"],
    "streaming a=0.5": ["sync.method=streaming", "sync.alpha=0.5"],
    # CoCoDC: "cocodc a=0.5" is its default configuration (alpha written out so that the label
    # says it), "cocodc a=0" the compensated merge without the mix, "replay a=0.5" the mix with
    # lambda 0 (no compensation: w = 0 under any rule; the running one's, as when it was first run).
    "replay a=0.5": [*COCODC, "sync.dc_lambda=0", "sync.dc_normaliser=running"],
    "cocodc a=0": ["sync.method=cocodc", "sync.alpha=0.0"],
    "cocodc a=0.5": ["sync.method=cocodc", "sync.alpha=0.5"],
    # The mix around CoCoDC's default (not in the default sweep).
    "cocodc a=0.25": ["sync.method=cocodc", "sync.alpha=0.25"],
    "cocodc a=0.75": ["sync.method=cocodc", "sync.alpha=0.75"],
    # The other weight rules: the running normaliser (the default before the AdamW rule), the same
    # over a short horizon (decay 0.5: its first value is the first sample), and the per-tensor
    # normaliser (scale-free at every apply, w capped below 1).
    "cocodc-running a=0.5": [*COCODC, "sync.dc_normaliser=running", "sync.dc_lambda=0.5"],
    "cocodc-short a=0.5": [*COCODC, "sync.dc_normaliser=running", "sync.dc_lambda=0.5", "sync.dc_beta=0.5"],
    "cocodc-tensor a=0.5": [*COCODC, "sync.dc_normaliser=tensor", "sync.dc_lambda=0.5"],
    # The adaptive schedule at the sweep's tau, and with the link's idle share (its own tau, up to
    # the sweep's): not in the default sweep; worth running on a link where the schedule matters.
    "cocodc adaptive a=0.5": [
        "sync.method=cocodc", "sync.alpha=0.5", "sync.schedule=adaptive", "sync.adaptive_delay=false",
    ],
    "cocodc link a=0.5": ["sync.method=cocodc", "sync.alpha=0.5", "sync.schedule=adaptive", "sync.link_share=0.5"],
}  # fmt: skip
# The outer learning rate around the config's 0.7 (not in the default sweep). Streaming DiLoCo's
# variants are targets too, so that every method meets the best-tuned Streaming DiLoCo.
OUTER_LRS = (0.5, 0.9, 1.1, 1.3, 1.5)
for lr in OUTER_LRS:
    for base in ("streaming", "cocodc"):
        METHODS[f"{base} a=0.5 olr={lr}"] = [f"sync.method={base}", "sync.alpha=0.5", f"sync.outer_lr={lr}"]
# The AdamW weight's lambda above its default of 750 (not in the default sweep): 3000, the default
# until docs/results.md's seventh round, did as well at H 40 and never reached Streaming DiLoCo at H 80.
LAMBDAS = (1500, 3000)
for lam in LAMBDAS:
    METHODS[f"cocodc a=0.5 lambda={lam}"] = [*COCODC, f"sync.dc_lambda={lam}"]
EXTRA = ("adaptive", "link", "a=0.25", "a=0.75", "olr", "lambda")
DEFAULT_METHODS = [m for m in METHODS if not any(k in m for k in EXTRA)]
NO_OVERLAP = {"ddp", "diloco"}
STREAMING = tuple(m for m in METHODS if m.startswith("streaming "))  # the targets: every alpha and outer lr
SAME_BYTES = "streaming a=0.5 same bytes"  # at a smaller H, as many bytes as a method that sends more
MORE_BYTES = 1.05  # a method sending this much more than Streaming DiLoCo gets the same-bytes baseline


def cell(args: argparse.Namespace, split: str, seed: int, method: str, tau: int, every: int | None = None) -> dict:
    """A run of `method` (or, with `every`, Streaming DiLoCo at that H: the same-bytes baseline)."""
    label = method if every is None else f"streaming-H{every}"
    name = f"{split}-seed{seed}-{label.replace(' ', '').replace('=', '')}-tau{tau}"
    settings = METHODS[method] if every is None else [*METHODS["streaming a=0.5"], f"sync.sync_every={every}"]
    settings = [*settings, f"seed={seed}", f"data.split={split}", f"sync.delay={tau}", *args.set]
    if args.bound_every and every is None and method not in NO_OVERLAP and tau == min(args.taus) < max(args.taus):
        settings.append(f"eval.every={args.bound_every}")
    return {"name": name, "method": method, "tau": tau, "seed": seed, "split": split, "set": settings, "every": every}


def cells(args: argparse.Namespace, split: str) -> list[dict]:
    return [
        cell(args, split, seed, method, tau)
        for seed in args.seeds
        for method in args.methods
        for tau in ([0] if method in NO_OVERLAP else args.taus)
    ]


def bytes_sent(args: argparse.Namespace, cell: dict) -> int:
    """Per region, over the run (the summary's count)."""
    return json.loads((args.out / "runs" / cell["name"] / "summary.json").read_text())["bytes_sent"]


def same_bytes_cells(args: argparse.Namespace, plan: list[dict]) -> list[dict]:
    """Streaming DiLoCo at the smaller H (a multiple of P) that sends as many bytes as each method
    sending more than it does (by the median over seeds), one cell per seed."""
    from cocodc.config import load_config

    sync = load_config(args.config, args.set).sync
    extra, wanted = [], set()
    for c in plan:
        c["bytes"] = bytes_sent(args, c)
    for split, tau, method in sorted({(c["split"], c["tau"], c["method"]) for c in plan}):
        group = [c for c in plan if (c["split"], c["tau"]) == (split, tau)]
        sent = statistics.median(c["bytes"] for c in group if c["method"] == method)
        streaming = statistics.median(c["bytes"] for c in group if c["method"] in STREAMING)  # any lr, alpha
        if method in NO_OVERLAP or not streaming or sent <= MORE_BYTES * streaming:
            continue
        every = round(sync.sync_every * streaming / sent / sync.fragments) * sync.fragments
        every = max(every, (tau // sync.fragments + 1) * sync.fragments)  # tau < H: then it sends fewer
        wanted.add((split, tau, every))
        for c in group:
            if c["method"] == method:
                c["same_bytes_every"] = every
    for split, tau, every in sorted(wanted):
        extra += [cell(args, split, seed, SAME_BYTES, tau, every) for seed in args.seeds]
    return extra


def finished(config: Config) -> bool:
    """The run directory holds a finished run of this config. Where a run lives (the `run`
    section) is not part of what it ran, so a sweep's runs copied to another --out count."""
    import yaml

    if not (config.run_dir / "summary.json").is_file():
        return False
    stored = yaml.safe_load((config.run_dir / "config.yaml").read_text())
    wanted = yaml.safe_load(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return {**stored, "run": None} == {**wanted, "run": None}


def worker(plan_file: str) -> None:
    """Under torchrun: run every cell of the plan in this process group, skipping finished ones."""
    from cocodc import train
    from cocodc.config import load_config
    from cocodc.topology import shutdown

    plan = json.loads(Path(plan_file).read_text())
    try:
        for cell in plan["cells"]:
            config = load_config(plan["config"], [*cell["set"], f"run.dir={plan['runs']}", f"run.name={cell['name']}"])
            if not finished(config):
                train.run(config, overwrite=True)
    finally:
        shutdown()


def run_split(args: argparse.Namespace, split: str, plan: list[dict]) -> None:
    from cocodc.config import load_config

    regions = load_config(args.config, args.set).topology.regions
    plan_file = args.out / f"plan-{split}.json"
    plan_file.write_text(json.dumps({"config": args.config, "runs": str(args.out / "runs"), "cells": plan}))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // regions))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={regions}",
               __file__, "--worker", str(plan_file)]  # fmt: skip
    if subprocess.run(command, env=env).returncode:
        sys.exit(f"convergence: the {split} sweep failed")


def evals(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return sorted((r for r in records if r["kind"] == "eval" and r["scope"] == "global"), key=lambda r: r["step"])


def steps_to(points: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in points if loss <= target), None)


def spread(values: list[float]) -> str:
    low = "never" if min(values) == -math.inf else f"{min(values):.3g}"
    return f"{low}..{max(values):.3g}" if len(values) > 1 else "-"


def bound(method: str, tau: int) -> str:
    return f"{method} at tau {tau}"


def compensated(method: str) -> str:
    return f"{method} perfectly compensated"


def arriving_later(points: list[tuple[int, float]], shift: int) -> list[tuple[int, float]]:
    """The eval curve of a run whose fragments arrive `shift` steps later than they did, every one
    carrying the same pseudo-gradient: its global copy at step t is this run's at t - shift, and
    its final eval (after the last fragments are drained) is this run's final one."""
    *inner, (last, final) = points
    return [(step + shift, loss) for step, loss in inner if step + shift < last] + [(last, final)]


def worst_gap(points: list[tuple[int, float]], reference: list[tuple[int, float]], after: int) -> float:
    """The largest eval-loss lead of `reference` over `points` at the evals both made after `after`."""
    theirs = dict(reference)
    return max((loss - theirs[step] for step, loss in points if step > after and step in theirs), default=0.0)


def excess(points: list[tuple[int, float]], bound_points: list[tuple[int, float]]) -> float | None:
    """The mean eval-loss excess of `points` over `bound_points` at the evals both made in the last
    third of the run, where the steps to a target are decided; None where they share none."""
    theirs, last = dict(bound_points), points[-1][0]
    gaps = [loss - theirs[step] for step, loss in points if step >= 2 * last / 3 and step in theirs]
    return statistics.mean(gaps) if gaps else None


def analyse(args: argparse.Namespace, plan: list[dict]) -> list[dict]:
    """One row per cell with its final loss, target, steps to target and reduction (against the
    same seed's run: paired), its largest lag behind that run after the first sync, its bytes, and
    (with a run at the smallest tau) its excess over its own perfectly compensated curve."""
    from cocodc.config import load_config

    sync = load_config(args.config, args.set).sync
    for c in plan:
        points = evals(args.out / "runs" / c["name"])
        c["curve"] = [(r["step"], r["loss"]) for r in points]
        c["wall"] = {r["step"]: r["wall_s"] for r in points}  # the run's wall-clock, link waits included
        c["final"] = c["curve"][-1][1]
        c["bytes"] = bytes_sent(args, c)
    rows = []
    for cell in plan:
        # (label, tau judged at, steps its fragments arrive later than they did in this run)
        taus = args.taus if cell["method"] in NO_OVERLAP else [cell["tau"]]
        judged = [(cell["method"], tau, 0) for tau in taus]
        if cell["method"] not in NO_OVERLAP and cell["method"] != SAME_BYTES and cell["tau"] == min(args.taus):
            # A method with the least overlap, judged against the targets of the larger overlaps:
            # as it is (no delay at all), and with its fragments arriving at the larger overlap
            # (what a perfect compensation reaches: the regions train as without the delay, but
            # the global copy holds only what has arrived).
            for tau in args.taus:
                if tau != cell["tau"]:
                    judged += [(bound(cell["method"], cell["tau"]), tau, 0),
                               (compensated(cell["method"]), tau, tau - cell["tau"])]  # fmt: skip
        if cell["method"] == SAME_BYTES:
            judged = [(f"streaming a=0.5 at H={cell['every']}", cell["tau"], 0)]
        own = (cell["method"], cell["split"], cell["seed"], None)
        least = next((c for c in plan if (c["method"], c["split"], c["seed"], c["every"]) == own
                      and c["tau"] == min(args.taus) < cell["tau"]), None)  # fmt: skip
        delayed = arriving_later(least["curve"], cell["tau"] - least["tau"]) if least is not None else None
        left = excess(cell["curve"], delayed) if delayed is not None else None
        for method, tau, shift in judged:
            group = [c for c in plan if c["split"] == cell["split"] and c["tau"] == tau]
            ran = [m for m in STREAMING if any(c["method"] == m for c in group)]
            best = min(ran, key=lambda m: statistics.median(c["final"] for c in group if c["method"] == m))
            if method != cell["method"] and cell["method"] in STREAMING and cell["method"] != best:
                continue
            reference = next(c for c in group if c["method"] == best and c["seed"] == cell["seed"])
            target = reference["final"]
            curve = arriving_later(cell["curve"], shift)
            steps, base = steps_to(curve, target), steps_to(reference["curve"], target)
            first_apply = sync.sync_every // sync.fragments + tau
            row = {
                "split": cell["split"], "tau": tau, "method": method, "seed": cell["seed"],
                "final_eval_loss": round(cell["final"], 4), "target": round(target, 4), "reference": best,
                "steps_to_target": steps, "reference_steps": base,
                "reduction": None if steps is None else round(1 - steps / base, 4),
                "seconds_to_target": None if steps is None or shift else round(cell["wall"][steps], 2),
                # The delayed curve is a model of the steady state, not of the first round: no lag of its own.
                "worst_gap": None if shift else round(worst_gap(curve, reference["curve"], first_apply), 4),
                "bytes_sent": cell["bytes"], "same_bytes_reduction": None,
                "excess": None if method != cell["method"] or left is None else round(left, 4),
            }  # fmt: skip
            if "same_bytes_every" in cell and method == cell["method"]:
                matched = next(
                    c for c in plan if c["method"] == SAME_BYTES and c["seed"] == cell["seed"]
                    and (c["split"], c["tau"], c["every"]) == (cell["split"], tau, cell["same_bytes_every"])
                )  # fmt: skip
                matched_steps = steps_to(matched["curve"], target)
                if steps is not None:
                    row["same_bytes_reduction"] = round(1 - steps / matched_steps, 4) if matched_steps else 1.0
            rows.append(row)
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    header = ["split", "tau", "method", "final eval loss (median, range)", "steps to target (median)",
              "reduction (median, range)", "reached", "wall-clock to target, s (median)",
              "worst lag after the first sync (median, max)",
              "MB sent a region", "reduction vs Streaming at the same bytes",
              "excess over its perfectly compensated curve, last third (median, range)"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for split in args.splits:
        for tau in args.taus:
            for method in methods:
                group = [r for r in rows if (r["split"], r["tau"], r["method"]) == (split, tau, method)]
                if not group:
                    continue
                finals = [r["final_eval_loss"] for r in group]
                reached = [r for r in group if r["steps_to_target"] is not None]
                # A seed that never reaches the target counts as the slowest, not as missing.
                steps = statistics.median_high(math.inf if r["steps_to_target"] is None else r["steps_to_target"]
                                               for r in group)  # fmt: skip
                reductions = [-math.inf if r["reduction"] is None else r["reduction"] for r in group]
                median = statistics.median_low(reductions)
                reduction = "not reached" if median == -math.inf else f"{median:+.1%} ({spread(reductions)})"
                steps = "-" if steps == math.inf else steps
                gaps = [r["worst_gap"] for r in group if r["worst_gap"] is not None]
                lag = f"{statistics.median(gaps):+.4f} ({max(gaps):+.4f})" if gaps else "-"
                same = [r["same_bytes_reduction"] for r in group if r["same_bytes_reduction"] is not None]
                same_bytes = f"{statistics.median_low(same):+.1%}" if same else "-"
                excesses = [r["excess"] for r in group if r["excess"] is not None]
                over = f"{statistics.median(excesses):+.4f} ({spread(excesses)})" if excesses else "-"
                seconds = statistics.median_high(
                    math.inf if r["seconds_to_target"] is None else r["seconds_to_target"] for r in group
                )
                lines.append(
                    f"| {split} | {tau} | {method} | {statistics.median(finals):.4f} ({spread(finals)}) | {steps} | "
                    f"{reduction} | {len(reached)}/{len(group)} | {'-' if seconds == math.inf else seconds} | "
                    f"{lag} | "
                    f"{statistics.median(r['bytes_sent'] for r in group) / 1e6:.1f} | {same_bytes} | {over} |"
                )
    return "\n".join(lines)


def plots(args: argparse.Namespace, plan: list[dict]) -> None:
    from cocodc.config import load_config
    from cocodc.report import load_curve, plot_curves

    wan = load_config(args.config, args.set).wan
    link = "with no link model"
    if isinstance(wan.latency_ms, list) or isinstance(wan.bandwidth_mbps, list):
        link = "on the config's per-pair links"
    elif wan.enabled:
        bandwidth = f"{wan.bandwidth_mbps:g} Mbit/s" if wan.bandwidth_mbps else "unlimited bandwidth"
        link = f"on a {wan.latency_ms:g} ms one-way, {bandwidth} link"

    for split in args.splits:
        for tau in args.taus:
            chosen = [c for c in plan if c["split"] == split and c["seed"] == args.seeds[0]
                      and (c["tau"] == tau or c["method"] in NO_OVERLAP)]  # fmt: skip
            curves = [load_curve(args.out / "runs" / c["name"]) for c in chosen]
            for c, cell in zip(curves, chosen, strict=True):
                c["label"] = cell["method"]
            least = min(args.taus)
            for cell in plan if tau != least else []:
                if (cell["split"], cell["seed"], cell["tau"], cell["every"]) == (split, args.seeds[0], least, None):
                    delayed = arriving_later(cell["curve"], tau - least)
                    curves.append({
                        "run": cell["name"], "label": compensated(cell["method"]), "unit": "inner step",
                        "steps": [step for step, _ in delayed], "loss": [loss for _, loss in delayed],
                        "wall_s": [math.nan] * len(delayed),
                    })  # fmt: skip
            plot_curves(
                curves,
                args.out / f"convergence-{split}-tau{tau}.png",
                f"{split}, tau = {tau}, seed {args.seeds[0]}; wall-clock {link}",
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("-c", "--config", default="configs/convergence.yaml")
    parser.add_argument("--taus", type=int, nargs="+", default=[1, 10, 20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--splits", nargs="+", choices=["iid", "non_iid"], default=["iid", "non_iid"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS, metavar="METHOD",
                        help=f"of: {'; '.join(METHODS)} (default: {'; '.join(DEFAULT_METHODS)})")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every cell")
    parser.add_argument(
        "--bound-every", type=int, metavar="STEPS",
        help="eval every STEPS in the runs at the smallest tau, whose curves, delayed, bound the larger "
        "overlaps (1: the perfectly compensated rows exact to a step; default: the config's eval.every)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/convergence"))
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if not any(m in args.methods for m in STREAMING):
        parser.error(f"the targets come from Streaming DiLoCo: keep {' or '.join(STREAMING)} in --methods")
    args.out.mkdir(parents=True, exist_ok=True)
    plan = []
    for split in args.splits:
        split_plan = cells(args, split)
        run_split(args, split, split_plan)
        matching = same_bytes_cells(args, split_plan)
        if matching:
            run_split(args, split, matching)
        plan += split_plan + matching
    rows = analyse(args, plan)
    text = table(rows, args)
    print(text)
    (args.out / "convergence.md").write_text(text + "\n")
    with open(args.out / "convergence.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plots(args, plan)
    print(f"wrote {args.out}/convergence.md, convergence.csv and convergence-*.png", file=sys.stderr)


if __name__ == "__main__":
    main()
