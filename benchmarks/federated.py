"""Federated strategies on non-IID data: FedAvg, FedProx, FedAdam and FedYogi, by eval loss,
rounds and modelled wall-clock to a common target, bytes and updates left out.

    python benchmarks/federated.py [-c configs/federated.yaml] [--strategies fedavg fedprox fedadam fedyogi]
        [--alphas 0.1 1 iid] [--seeds 0 1 2] [--rounds 20] [--deadline-s 2.35]
        [--skip-tune] [--server-lr fedadam=0.003 ...] [--proximal-mu 0.01]
        [--scratch DIR] [--out benchmarks/results/federated] [--plot-only]

Every run is a real `cocodc train -c <config> --set ...` (a server and its executors under
torchrun), one after another, on a smaller model and shorter runs than the demo config (SMALL
below) so that the sweep fits a 2-core machine; the demo's heterogeneous devices and links stay,
with a round deadline (--deadline-s) that leaves out some of the late updates. An alpha is the
Dirichlet concentration of the clients' shares of the books (data.split=non_iid), or `iid`.

First a small tuning on one seed and one alpha (--tune-seed, --tune-alpha): FedAdam's and
FedYogi's server_lr (Flower's defaults, 0.1 and 0.01, move every weight by about that much each
round, which wrecks a language model) and FedProx's proximal_mu over TUNING's grids; the value
with the lowest final eval loss is kept (--server-lr / --proximal-mu set one instead; with
--skip-tune the rest come from the previous results.json). Then the sweep: every strategy,
alpha and seed. A tuning run is the sweep's run of the same config and is not run twice; nor is
any run whose run directory under --scratch already holds a summary of the same config (so an
interrupted sweep continues), unless --rerun.

Per alpha, the target is the highest of the strategies' median final eval losses, so every
strategy reaches it; rounds-to-target is a run's first eval round at or below it, the modelled
seconds to target the sum of the rounds' modelled_s up to that round. Medians are over seeds, a
seed that never reaches the target counting as the slowest ("-" when the median does not reach
it). Writes results.json (every run, so --plot-only re-makes the rest), results.md (the tables
and the command) and two plots: eval loss against rounds, and against modelled wall-clock.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

from sweep import add_sweep_arguments, band, ok, progress, provenance, seal, train_run

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
# The tuned knob of each strategy and its grid (fedavg has none).
TUNING: dict[str, tuple[str, list[float]]] = {
    "fedprox": ("federated.proximal_mu", [0.001, 0.01, 0.1]),
    "fedadam": ("federated.server_lr", [1e-3, 3e-3, 1e-2, 3e-2]),
    "fedyogi": ("federated.server_lr", [1e-3, 3e-3, 1e-2, 3e-2]),
}
# A smaller model and shorter runs than configs/federated.yaml (0.14M parameters, not 0.9M), so
# that one run takes about 20 s on 2 cores. Checkpoints only at the end.
SMALL = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=2",
    "train.batch_size=8", "train.seq_len=64",
    "federated.local_steps=10", "eval.every=2", "eval.batches=4", "checkpoint.every=0",
]  # fmt: skip
# The demo's deadline is tuned to its 0.9M model's bytes; with this model's 4x smaller updates a
# deadline of 2.35 modelled seconds leaves out about 13% of the updates over seeds 0-2 (10%, 10%,
# 20%: the slow clients are drawn per seed). Measured from one run's round records.
DEADLINE_S = 2.35
DEFAULT_OUT = Path("benchmarks/results/federated")


# ---------------------------------------------------------------------------- the runs


def alpha_settings(alpha: str) -> list[str]:
    if alpha == "iid":
        return ["data.split=iid"]
    return ["data.split=non_iid", f"data.dirichlet_alpha={float(alpha):g}"]


def knob_settings(strategy: str, value: float | None) -> list[str]:
    return [] if value is None else [f"{TUNING[strategy][0]}={value:g}"]


def knob_label(strategy: str, value: float | None) -> str:
    if strategy not in TUNING or value is None:
        return "-"
    return f"{'mu' if TUNING[strategy][0].endswith('mu') else 'lr'}={value:g}"


def run_name(strategy: str, value: float | None, alpha: str, seed: int) -> str:
    knob = "" if value is None else f"-{knob_label(strategy, value).replace('=', '')}"
    return f"{strategy}{knob}-{'iid' if alpha == 'iid' else 'a' + alpha}-seed{seed}"


def base_settings(args: argparse.Namespace) -> list[str]:
    return [*SMALL, f"federated.rounds={args.rounds}", f"federated.deadline_s={args.deadline_s:g}", *args.set]


def run(args: argparse.Namespace, strategy: str, value: float | None, alpha: str, seed: int, phase: str) -> dict:
    """One `cocodc train` (or its finished run directory): its numbers, or its failure."""
    from cocodc.metrics import read_records

    name = run_name(strategy, value, alpha, seed)
    settings = [
        *base_settings(args), f"federated.strategy={strategy}", *knob_settings(strategy, value),
        *alpha_settings(alpha), f"seed={seed}", f"run.dir={args.scratch}", f"run.name={name}",
    ]  # fmt: skip
    run_dir = args.scratch / name
    entry = {"name": name, "phase": phase, "strategy": strategy, "knob": knob_label(strategy, value),
             "value": value, "alpha": alpha, "seed": seed}  # fmt: skip
    entry.update(train_run(args.config, settings, args.scratch, name, rerun=args.rerun, tail=20))
    if entry["rc"]:
        return entry
    summary = json.loads((run_dir / "summary.json").read_text())
    records = read_records(run_dir / "metrics.jsonl")
    rounds = sorted((r for r in records if r["kind"] == "round"), key=lambda r: r["round"])
    evals = sorted((r for r in records if r["kind"] == "eval" and r.get("scope", "global") == "global"),
                   key=lambda r: r["step"])  # fmt: skip
    elapsed, cumulative = 0.0, {0: 0.0}
    for r in rounds:
        elapsed += r["modelled_s"]
        cumulative[r["round"]] = elapsed
    entry.update(
        final_eval_loss=summary["final_eval_loss"],
        initial_eval_loss=summary.get("initial_eval_loss"),
        eval_rounds=[r["step"] for r in evals],
        eval_loss=[r["loss"] for r in evals],
        eval_modelled_s=[cumulative.get(r["step"]) for r in evals],
        round_modelled_s=[r["modelled_s"] for r in rounds],
        train_loss=[r["train_loss"] for r in rounds],
        bytes_up=summary["bytes_up"],
        bytes_down=summary["bytes_down"],
        modelled_s=summary["modelled_s"],
        updates_accepted=summary["updates_accepted"],
        updates_left_out=summary["updates_left_out"],
        late=sum(len(r["late"]) for r in rounds),
        failed=sum(len(r["failed"]) for r in rounds),
        not_finite=sum(len(r["not_finite"]) for r in rounds),
        wall_s=summary.get("wall_s"),
    )
    return entry


def tune(args: argparse.Namespace, results: dict, save) -> dict[str, float]:
    """The kept knob of each tuned strategy: given, tuned on one seed and alpha, or the last sweep's."""
    chosen: dict[str, float] = {}
    given = {**args.server_lr, **({"fedprox": args.proximal_mu} if args.proximal_mu is not None else {})}
    previous = {}
    if args.skip_tune and (args.out / "results.json").is_file():
        previous = json.loads((args.out / "results.json").read_text()).get("chosen", {})
    for strategy in (s for s in args.strategies if s in TUNING):
        if strategy in given:
            chosen[strategy] = given[strategy]
        elif args.skip_tune:
            if strategy not in previous:
                sys.exit(f"federated: --skip-tune but no {TUNING[strategy][0]} for {strategy}: give it, or tune")
            chosen[strategy] = previous[strategy]
        else:
            tried = []
            for value in TUNING[strategy][1]:
                entry = run(args, strategy, value, args.tune_alpha, args.tune_seed, "tune")
                results["tuning"].append(entry)
                save()
                progress(entry, "tune")
                if ok(entry):
                    tried.append((entry["final_eval_loss"], value))
            if not tried:
                sys.exit(f"federated: every tuning run of {strategy} failed")
            chosen[strategy] = min(tried)[1]
    return chosen


# ---------------------------------------------------------------------------- the analysis


def rounds_to(entry: dict, target: float) -> int | None:
    return next((r for r, loss in zip(entry["eval_rounds"], entry["eval_loss"], strict=True) if loss <= target), None)


def median_reached(values: list) -> float | None:
    """The median over seeds, a seed that never got there (None) counting as the slowest."""
    middle = statistics.median_high([math.inf if v is None else v for v in values])
    return None if middle == math.inf else middle


def analyse(results: dict) -> list[dict]:
    runs = [r for r in results["runs"] if ok(r)]
    rows = []
    for alpha in results["alphas"]:
        at = [r for r in runs if r["alpha"] == alpha]
        medians = {s: statistics.median(r["final_eval_loss"] for r in at if r["strategy"] == s)
                   for s in results["strategies"] if any(r["strategy"] == s for r in at)}  # fmt: skip
        if not medians:
            continue
        target = max(medians.values())
        for strategy in results["strategies"]:
            group = sorted((r for r in at if r["strategy"] == strategy), key=lambda r: r["seed"])
            if not group:
                continue
            reached = [rounds_to(r, target) for r in group]
            seconds = [None if n is None else r["eval_modelled_s"][r["eval_rounds"].index(n)]
                       for r, n in zip(group, reached, strict=True)]  # fmt: skip
            finals = [r["final_eval_loss"] for r in group]
            failed = [r["name"] for r in results["runs"]
                      if r["alpha"] == alpha and r["strategy"] == strategy and not ok(r)]  # fmt: skip
            rows.append({
                "alpha": alpha, "strategy": strategy, "setting": group[0]["knob"], "seeds": [r["seed"] for r in group],
                "final_median": statistics.median(finals), "final_min": min(finals), "final_max": max(finals),
                "target": target, "rounds_to_target": reached, "rounds_to_target_median": median_reached(reached),
                "modelled_s_to_target": seconds, "modelled_s_to_target_median": median_reached(seconds),
                "modelled_s_total_median": statistics.median(r["modelled_s"] for r in group),
                "bytes_up_median": statistics.median(r["bytes_up"] for r in group),
                "bytes_down_median": statistics.median(r["bytes_down"] for r in group),
                "accepted_median": statistics.median(r["updates_accepted"] for r in group),
                "left_out_median": statistics.median(r["updates_left_out"] for r in group),
                "left_out": [r["updates_left_out"] for r in group], "late": [r["late"] for r in group],
                "failed_or_not_finite": [r["failed"] + r["not_finite"] for r in group],
                "failed_runs": failed,
            })  # fmt: skip
    return rows


def suspicious(results: dict) -> list[str]:
    """Runs whose eval loss is not finite, ends above its start, or rises 0.05 above its best."""
    found = []
    for r in [*results["tuning"], *results["runs"]]:
        if r.get("rc") != 0:
            continue
        losses = r["eval_loss"]
        if not all(math.isfinite(x) for x in losses):
            found.append(f"CHECK: {r['name']}: a non-finite eval loss")
        elif losses[-1] > losses[0] or losses[-1] > min(losses) + 0.05:
            found.append(f"CHECK: {r['name']}: eval loss rises, {min(losses):.4f} at best, {losses[-1]:.4f} at the end")
    return found


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    header = ["alpha", "strategy", "server/client setting", "final eval loss: median (min..max)", "target",
              "rounds to target: median (per seed)", "modelled s to target: median", "modelled s total: median",
              "MB up / down per run", "updates accepted / left out: median (late per seed)"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        per_seed = ", ".join("-" if n is None else str(n) for n in r["rounds_to_target"])
        failed = f" ({len(r['failed_runs'])} run(s) failed)" if r["failed_runs"] else ""
        lines.append(
            f"| {r['alpha']} | {r['strategy']}{failed} | {r['setting']} | {r['final_median']:.4f} "
            f"({r['final_min']:.4f}..{r['final_max']:.4f}) | {r['target']:.4f} | "
            f"{fmt(r['rounds_to_target_median'], 'd')} ({per_seed}) | {fmt(r['modelled_s_to_target_median'], '.1f')} | "
            f"{r['modelled_s_total_median']:.1f} | "
            f"{r['bytes_up_median'] / 1e6:.1f} / {r['bytes_down_median'] / 1e6:.1f} | "
            f"{r['accepted_median']:g} / {r['left_out_median']:g} ({', '.join(map(str, r['late']))}) |"
        )
    return "\n".join(lines)


def tuning_table(results: dict) -> str:
    if not results["tuning"]:
        return "(no tuning runs: the settings were given)"
    lines = ["| strategy | setting | final eval loss | kept |", "|---|---|---|---|"]
    for r in results["tuning"]:
        loss = f"{r['final_eval_loss']:.4f}" if ok(r) else f"failed (exit {r.get('rc')})"
        kept = "yes" if results["chosen"].get(r["strategy"]) == r["value"] else ""
        lines.append(f"| {r['strategy']} | {r['knob']} | {loss} | {kept} |")
    return "\n".join(lines)


def plots(results: dict, rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if ok(r)]
    alphas = [a for a in results["alphas"] if any(r["alpha"] == a for r in runs)]
    targets = {r["alpha"]: r["target"] for r in rows}
    made = []
    axes_of = {"eval_rounds": "round", "eval_modelled_s": "modelled wall-clock (s, median over seeds)"}
    for x_key, stem in (("eval_rounds", "eval-loss-vs-round"), ("eval_modelled_s", "eval-loss-vs-modelled-time")):
        figure, axes = plt.subplots(1, len(alphas), figsize=(5 * len(alphas), 4.2), squeeze=False)
        for ax, alpha in zip(axes[0], alphas, strict=True):
            tail_top, bottom = -math.inf, math.inf
            for strategy in results["strategies"]:
                group = [r for r in runs if r["alpha"] == alpha and r["strategy"] == strategy]
                if not group:
                    continue
                xs, mid, low, high = band(group, x_key)
                label = strategy + (f" ({group[0]['knob']})" if group[0]["knob"] != "-" else "")
                line = ax.plot(xs, mid, marker=".", label=label)[0]
                ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
                tail_top = max(tail_top, high[min(len(high) - 1, max(1, len(high) // 5))])
                bottom = min(bottom, min(low))
            if alpha in targets:
                ax.axhline(targets[alpha], color="grey", linestyle="--", linewidth=1, label="target")
            # The strategies part in the tail: show it, not the first rounds' fall from ~5.5.
            ax.set_ylim(bottom - 0.05 * (tail_top - bottom), tail_top)
            ax.set_title("iid" if alpha == "iid" else f"Dirichlet alpha {alpha}")
            ax.set_xlabel(axes_of[x_key])
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("eval loss (global model)")
        axes[0][0].legend(fontsize=8)
        seeds = sorted({r["seed"] for r in runs})
        figure.suptitle(f"median and min..max over seeds {', '.join(map(str, seeds))}")
        figure.tight_layout()
        path = out / f"{stem}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        made.append(path)
    return made


def report(results: dict, out: Path) -> None:
    rows = analyse(results)
    text = table(rows)
    print(text)
    print()
    print(tuning_table(results))
    failed = [r for r in [*results["tuning"], *results["runs"]] if not ok(r)]
    notes = [
        f"Config: `{results['config']}` with {' '.join('`' + s + '`' for s in results['settings'])}; "
        f"seeds {', '.join(map(str, results['seeds']))}. "
        f"Tuned on seed {results['tune_seed']}, alpha {results['tune_alpha']}.",
        "Target per alpha: the highest of the strategies' median final eval losses. Rounds to target: first eval "
        "round (every eval.every rounds) at or below it; modelled s to target: the rounds' modelled_s summed up to "
        "it; medians over seeds, a seed that never reaches it counting as the slowest ('-': the median does not).",
        f"Sweep: {results.get('total_s', 0) / 60:.1f} min for {len(results['runs'])} runs and "
        f"{len(results['tuning'])} tuning runs (a tuning run of the kept setting is also the sweep's run).",
    ]
    if results.get("sources_changed"):
        notes.append("WARNING: the package's sources changed during the sweep (digest "
                     f"{results['sources_before']} -> {results['sources_after']}).")  # fmt: skip
    for strategy, value in results["chosen"].items():
        grid = TUNING[strategy][1]
        if results["tuning"] and value in (grid[0], grid[-1]):
            notes.append(f"{strategy}: the kept {TUNING[strategy][0]}={value:g} is at the edge of the grid {grid}.")
    notes += suspicious(results)
    for r in failed:
        notes.append(f"FAILED: {r['name']} (exit {r.get('rc')}): {r.get('stderr_tail', 'non-finite final loss')}")
    md = [
        "# Federated strategies: FedAvg, FedProx, FedAdam, FedYogi", "", text, "",
        "## Tuning (final eval loss; the lowest is kept)", "", tuning_table(results), "",
        "## Notes", "", *(f"- {n}" for n in notes), "",
        "## Re-run", "", "```", results["command"], "```", "",
        "Tables and plots again from results.json: `.venv/bin/python benchmarks/federated.py --plot-only"
        + (f" --out {out}" if out != DEFAULT_OUT else "") + "`", "",
    ]  # fmt: skip
    (out / "results.md").write_text("\n".join(md))
    paths = plots(results, rows, out)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, " + ", ".join(map(str, paths)), file=sys.stderr)


# ---------------------------------------------------------------------------- main


def parse_server_lr(text: str) -> tuple[str, float]:
    strategy, _, value = text.partition("=")
    if strategy not in ("fedadam", "fedyogi") or not value:
        raise argparse.ArgumentTypeError(f"{text!r}: expected fedadam=LR or fedyogi=LR")
    return strategy, float(value)


def parse_alpha(text: str) -> str:
    if text == "iid":
        return text
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"alpha {text} must be positive (or iid)")
    return f"{value:g}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="configs/federated.yaml")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--alphas", nargs="+", type=parse_alpha, default=["0.1", "1", "iid"],
                        help="Dirichlet alphas of the non-IID split, or iid")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--deadline-s", type=float, default=DEADLINE_S, help="federated.deadline_s (modelled s)")
    parser.add_argument("--tune-seed", type=int, default=0)
    parser.add_argument("--tune-alpha", type=parse_alpha, default="1")
    parser.add_argument("--skip-tune", action="store_true",
                        help="no tuning: --server-lr/--proximal-mu, or the last results.json's")  # fmt: skip
    parser.add_argument("--server-lr", type=parse_server_lr, action="append", default=[], metavar="STRATEGY=LR",
                        help="fedadam=LR or fedyogi=LR instead of tuning it (repeatable)")  # fmt: skip
    parser.add_argument("--proximal-mu", type=float, help="fedprox's mu instead of tuning it")
    add_sweep_arguments(parser, "federated", DEFAULT_OUT)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    args.server_lr = dict(args.server_lr)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        report(json.loads((args.out / "results.json").read_text()), args.out)
        return
    args.scratch = args.scratch.resolve()
    args.scratch.mkdir(parents=True, exist_ok=True)

    began = time.perf_counter()
    results = {
        "command": shlex.join([".venv/bin/python", "benchmarks/federated.py", *sys.argv[1:]]),
        "config": args.config, "settings": base_settings(args), "deadline_s": args.deadline_s,
        "strategies": args.strategies, "alphas": args.alphas, "seeds": args.seeds,
        "tune_seed": args.tune_seed, "tune_alpha": args.tune_alpha, "tuning_grid": TUNING,
        **provenance(), "chosen": {}, "tuning": [], "runs": [],
    }  # fmt: skip

    def save() -> None:
        results["total_s"] = round(time.perf_counter() - began, 1)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    results["chosen"] = tune(args, results, save)
    plan = [(alpha, seed, strategy) for alpha in args.alphas for seed in args.seeds for strategy in args.strategies]
    for i, (alpha, seed, strategy) in enumerate(plan, 1):
        entry = run(args, strategy, results["chosen"].get(strategy), alpha, seed, "sweep")
        results["runs"].append(entry)
        save()
        progress(entry, f"{i}/{len(plan)}")
    seal(results)
    save()
    report(results, args.out)


if __name__ == "__main__":
    main()
