"""Split learning on non-IID data: SplitFed v2, merged features (MergeSFL-style) with and without
batch regulation, and FedAvg on the same model, data, workers-as-clients and devices; by eval
loss at equal sequences and at equal modelled wall-clock, modelled time and bytes per step.

    python benchmarks/split.py [--methods splitfed-v2 merged merged-br fedavg] [--seeds 0 1 2]
        [--steps 200] [--eval-every 10] [--local-steps 10] [--set KEY=VALUE ...]
        [--scratch DIR] [--rerun] [--out benchmarks/results/split] [--plot-only]

Every run is a real `cocodc train` (a server and its executors under torchrun), one after another:
the split methods with `-c configs/split.yaml`, FedAvg with `-c configs/federated.yaml`, both on
the small model of SMALL and with every setting the two configs could disagree on given
explicitly (SHARED: data split, devices, lr schedule, eval batches). The devices are the split
demo's (4x speed spread, 20-80 Mbit/s and 10-40 ms links, a 1 Gbit/s server). The split runs take
--steps steps of workers x train.batch_size sequences; FedAvg has every worker as a client in
every round (clients = clients_per_round = workers, no deadline) and takes --steps / --local-steps
rounds of --local-steps local steps, so every method trains on the same number of sequences, and
evals every --eval-every / --local-steps rounds so its evals land on the same sequence counts.

A run whose directory under --scratch already holds a summary of the same config is reused (an
interrupted sweep continues), unless --rerun. Writes results.json (every run, so --plot-only
re-makes the rest), results.md (the table, notes and the command) and two plots: eval loss
against sequences processed, and against modelled wall-clock (median and min..max over seeds).
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
# method -> (label, config file, its own settings)
METHODS: dict[str, tuple[str, str, list[str]]] = {
    "splitfed-v2": ("SplitFed v2", "configs/split.yaml", ["split.merge=false", "split.batch_regulation=false"]),
    "merged": ("merged features", "configs/split.yaml", ["split.merge=true", "split.batch_regulation=false"]),
    "merged-br": (
        "merged + batch regulation",
        "configs/split.yaml",
        ["split.merge=true", "split.batch_regulation=true"],
    ),
    "fedavg": ("FedAvg", "configs/federated.yaml", ["federated.strategy=fedavg"]),
}
# The model of benchmarks/federated.py (0.14M parameters): a split run of 200 steps takes about
# half a minute on 2 cores. Checkpoints only at the end.
SMALL = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=2",
    "train.batch_size=8", "train.seq_len=64", "eval.batches=4", "checkpoint.every=0",
]  # fmt: skip
# What configs/split.yaml and configs/federated.yaml could disagree on, set for both: the split
# demo's data split and devices, the lr schedule.
SHARED = [
    "data.source=kjv", "data.tokenizer=bytes", "data.split=non_iid", "data.dirichlet_alpha=0.5",
    "devices.step_s=0.1", "devices.speed_spread=4.0", "devices.bandwidth_mbps=40", "devices.bandwidth_spread=4.0",
    "devices.latency_ms=20", "devices.latency_spread=4.0", "devices.server_bandwidth_mbps=1000",
    "train.lr=0.003", "train.warmup_steps=20", "train.min_lr_ratio=0.1",
]  # fmt: skip
DEFAULT_OUT = Path("benchmarks/results/split")


# ---------------------------------------------------------------------------- the runs


def method_settings(args: argparse.Namespace, method: str) -> list[str]:
    """Every setting of one method's runs but the seed and the run directory."""
    common = [*SMALL, *SHARED, f"train.steps={args.steps}"]
    if method == "fedavg":
        mode = [
            f"federated.clients={args.workers}", f"federated.clients_per_round={args.workers}",
            f"federated.executors={args.executors}", "federated.quantize=fp32", "federated.deadline_s=0",
            f"federated.local_steps={args.local_steps}", f"federated.rounds={args.steps // args.local_steps}",
            f"eval.every={args.eval_every // args.local_steps}",
        ]  # fmt: skip
    else:
        mode = [
            f"split.workers={args.workers}", f"split.executors={args.executors}", f"split.cut={args.cut}",
            "split.shape=two", "split.aggregate_every=1", "split.quantize=fp32", f"eval.every={args.eval_every}",
        ]  # fmt: skip
    return [*common, *mode, *METHODS[method][2], *args.set]


def run(args: argparse.Namespace, method: str, seed: int) -> dict:
    """One `cocodc train` (or its finished run directory): its numbers, or its failure."""
    name = f"{method}-seed{seed}"
    config_file = METHODS[method][1]
    settings = [*method_settings(args, method), f"seed={seed}", f"run.dir={args.scratch}", f"run.name={name}"]
    run_dir = args.scratch / name
    entry = {"name": name, "method": method, "seed": seed, "config": config_file}
    entry.update(train_run(config_file, settings, args.scratch, name, rerun=args.rerun))
    if entry["rc"]:
        return entry
    entry.update(read_run(run_dir, method, args))
    return entry


def read_run(run_dir: Path, method: str, args: argparse.Namespace) -> dict:
    """A finished run's curves and totals, on one axis for every method: steps of
    workers x batch_size sequences (a FedAvg round is local_steps of them)."""
    from cocodc.metrics import read_records

    summary = json.loads((run_dir / "summary.json").read_text())
    records = read_records(run_dir / "metrics.jsonl")
    evals = sorted((r for r in records if r["kind"] == "eval" and r.get("scope", "global") == "global"),
                   key=lambda r: r["step"])  # fmt: skip
    per = args.local_steps if method == "fedavg" else 1  # steps per record
    kind = "round" if method == "fedavg" else "split"
    steps = sorted((r for r in records if r["kind"] == kind), key=lambda r: r["step"])
    elapsed, cumulative = 0.0, {0: 0.0}
    for r in steps:
        elapsed += r["modelled_s"]
        cumulative[r["step"]] = elapsed
    out = {
        "final_eval_loss": summary["final_eval_loss"],
        "initial_eval_loss": summary.get("initial_eval_loss"),
        "eval_steps": [r["step"] * per for r in evals],
        "eval_loss": [r["loss"] for r in evals],
        "eval_modelled_s": [cumulative.get(r["step"]) for r in evals],
        "modelled_s": summary["modelled_s"],
        "records_modelled_s": elapsed,
        "bytes_up": summary["bytes_up"],
        "bytes_down": summary["bytes_down"],
        "steps": len(steps) * per,
        "wall_s": summary.get("wall_s"),
        "process_tokens": summary.get("tokens"),
    }
    if method == "fedavg":
        out.update(
            updates_left_out=summary["updates_left_out"],
            bytes_up_records=sum(r["bytes_up"] for r in steps),
            bytes_down_records=sum(r["bytes_down"] for r in steps),
        )
        return out
    workers = len(steps[0]["bytes_up"]) if steps else 0
    regulated = [r for r in records if r["kind"] == "batch_sizes"]
    out.update(
        batch_sizes=summary["batch_sizes"],
        regulated_sizes=regulated[0]["sizes"] if regulated else None,
        per_sequence_s=regulated[0].get("per_sequence_s") if regulated else None,
        sizes_per_step=sorted({tuple(r["batch_sizes"]) for r in steps}),
        bytes_up_per_worker=[sum(r["bytes_up"][w] for r in steps) for w in range(workers)],
        bytes_down_per_worker=[sum(r["bytes_down"][w] for r in steps) for w in range(workers)],
        part_up_per_worker=[sum(r["part_sync_bytes"] for r in steps if w in r["part_senders"]) for w in range(workers)],
        part_down=sum(r["part_sync_bytes"] for r in steps),
        excluded=sum(len(r["excluded"]) for r in steps),
        worker_steps_left_out=summary.get("worker_steps_left_out"),
        step_modelled_s=[r["modelled_s"] for r in steps],
        waiting_s=[max(r["arrived_s"]) - min(r["arrived_s"]) for r in steps],
    )
    return out


# ---------------------------------------------------------------------------- the analysis


def loss_at(entry: dict, x_key: str, limit: float) -> float | None:
    """The eval loss of the last eval at or before `limit` on the x axis (None: no eval there)."""
    found = None
    for x, loss in zip(entry[x_key], entry["eval_loss"], strict=True):
        if x is not None and x <= limit + 1e-9:
            found = loss
    return found


def spread(values: list[float | None]) -> dict:
    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "min": None, "max": None, "per_seed": values}
    return {"median": statistics.median(known), "min": min(known), "max": max(known), "per_seed": values}


def checkpoints(results: dict) -> list[int]:
    """The steps (on the eval grid) at which the table compares methods: 1/4 and 1/2 of the run."""
    every, steps = results["eval_every"], results["steps"]
    return sorted({max(every, (steps * k // 4) // every * every) for k in (1, 2)})


def analyse(results: dict) -> dict:
    runs = [r for r in results["runs"] if ok(r)]
    seq_per_step = results["workers"] * results["batch_size"]
    groups = {m: sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"]) for m in results["methods"]}
    groups = {m: g for m, g in groups.items() if g}
    totals = {m: statistics.median(r["modelled_s"] for r in g) for m, g in groups.items()}
    budget = min(totals.values()) if totals else None
    rows = []
    for method, group in groups.items():
        steps = results["steps"]
        up = [r["bytes_up"] / steps for r in group]
        down = [r["bytes_down"] / steps for r in group]
        row = {
            "method": method,
            "label": METHODS[method][0],
            "seeds": [r["seed"] for r in group],
            "final": spread([r["final_eval_loss"] for r in group]),
            "at_steps": {str(s): spread([loss_at(r, "eval_steps", s) for r in group]) for s in checkpoints(results)},
            "at_budget": spread([loss_at(r, "eval_modelled_s", budget) for r in group]),
            "modelled_s": spread([r["modelled_s"] for r in group]),
            "bytes_up_per_step": spread(up),
            "bytes_down_per_step": spread(down),
            "failed_runs": [r["name"] for r in results["runs"] if r["method"] == method and not ok(r)],
        }
        if method == "fedavg":  # every client uploads and downloads the same bytes each round
            per_worker_up = [u / results["workers"] for u in up]
            per_worker_down = [d / results["workers"] for d in down]
        else:
            per_worker_up = [b / steps for r in group for b in r["bytes_up_per_worker"]]
            per_worker_down = [b / steps for r in group for b in r["bytes_down_per_worker"]]
            row["batch_sizes"] = {r["seed"]: r["batch_sizes"] for r in group}
        row["per_worker_up"] = spread(per_worker_up)
        row["per_worker_down"] = spread(per_worker_down)
        rows.append(row)
    return {"rows": rows, "budget_s": budget, "budget_method": min(totals, key=totals.get) if totals else None,
            "sequences_per_step": seq_per_step}  # fmt: skip


def checks(results: dict) -> list[str]:
    """What looks wrong: non-finite or rising eval losses, bytes or modelled seconds that do not
    add up between the per-step records and the summary, activations of an unexpected size."""
    found = []
    payload_up = results["seq_len"] * (results["d_model"] * 4 + 8)  # fp32 activations + int64 labels, a sequence
    payload_down = results["seq_len"] * results["d_model"] * 4  # fp32 gradients, a sequence
    for r in results["runs"]:
        if r.get("rc") != 0:
            continue
        losses = r["eval_loss"]
        if not all(math.isfinite(x) for x in losses):
            found.append(f"CHECK: {r['name']}: a non-finite eval loss")
        elif losses[-1] > losses[0] or losses[-1] > min(losses) + 0.05:
            found.append(f"CHECK: {r['name']}: eval loss rises, {min(losses):.4f} at best, {losses[-1]:.4f} at the end")
        if r["steps"] != results["steps"]:
            found.append(f"CHECK: {r['name']}: {r['steps']} steps recorded, {results['steps']} expected")
        if abs(r["records_modelled_s"] - r["modelled_s"]) > 1e-6 * max(1.0, r["modelled_s"]):
            found.append(f"CHECK: {r['name']}: modelled_s {r['modelled_s']:.3f} in the summary, "
                         f"{r['records_modelled_s']:.3f} summed over the records")  # fmt: skip
        if r["method"] == "fedavg":
            if (r["bytes_up_records"], r["bytes_down_records"]) != (r["bytes_up"], r["bytes_down"]):
                found.append(f"CHECK: {r['name']}: the rounds' bytes do not sum to the summary's")
            if r["updates_left_out"]:
                found.append(f"CHECK: {r['name']}: {r['updates_left_out']} updates left out (no deadline, no faults)")
            continue
        if (sum(r["bytes_up_per_worker"]), sum(r["bytes_down_per_worker"])) != (r["bytes_up"], r["bytes_down"]):
            found.append(f"CHECK: {r['name']}: the steps' bytes do not sum to the summary's")
        if r["excluded"] or r["worker_steps_left_out"]:
            found.append(f"CHECK: {r['name']}: {r['excluded']} worker steps left out (no faults were injected)")
        if len(r["sizes_per_step"]) != 1 or sum(r["sizes_per_step"][0]) != results["workers"] * results["batch_size"]:
            found.append(f"CHECK: {r['name']}: batch sizes per step {r['sizes_per_step']}")
        sizes = r["batch_sizes"]
        for w, size in enumerate(sizes):  # less the workers' parts synced (each way)
            over_up = (r["bytes_up_per_worker"][w] - r["part_up_per_worker"][w]) / r["steps"] - size * payload_up
            over_down = (r["bytes_down_per_worker"][w] - r["part_down"]) / r["steps"] - size * payload_down
            # Two messages up (activations, labels) and one down, each with a small header.
            if not (0 <= over_up <= 1024 and 0 <= over_down <= 512):
                found.append(f"CHECK: {r['name']}: worker {w} sends {over_up:+.0f} / receives {over_down:+.0f} bytes "
                             f"a step beyond its {size} sequences' payload")  # fmt: skip
    return found


def fmt_spread(s: dict, spec: str = ".4f", scale: float = 1.0) -> str:
    if s["median"] is None:
        return "-"
    mid, low, high = (format(s[k] / scale, spec) for k in ("median", "min", "max"))
    return f"{mid} ({low}..{high})"


def kilobytes(total: dict, per_worker: dict) -> str:
    """The median total, and the per-worker median with its min..max, in KB."""
    if total["median"] is None:
        return "-"
    return (
        f"{total['median'] / 1e3:.1f}; per worker {per_worker['median'] / 1e3:.1f} "
        f"[{per_worker['min'] / 1e3:.1f}..{per_worker['max'] / 1e3:.1f}]"
    )


def table(analysis: dict, results: dict) -> str:
    points = checkpoints(results)
    seq = analysis["sequences_per_step"]
    budget = analysis["budget_s"]
    header = [
        "method", "final eval loss: median (min..max)",
        *(f"eval loss at step {s} ({s * seq} seq)" for s in points),
        f"eval loss at {budget:.1f} modelled s" if budget is not None else "eval loss at the modelled budget",
        "modelled s total", "KB up / step: total; per worker [min..max]",
        "KB down / step: total; per worker [min..max]",
        "batch sizes (per seed)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in analysis["rows"]:
        failed = f" ({len(r['failed_runs'])} run(s) failed)" if r["failed_runs"] else ""
        sizes = "; ".join(f"s{seed}: {sizes}" for seed, sizes in r.get("batch_sizes", {}).items())
        if r["method"] != "merged-br" and sizes:
            sizes = "fixed, " + str(next(iter(r["batch_sizes"].values())))
        lines.append(
            f"| {r['label']}{failed} | {fmt_spread(r['final'])} | "
            + " | ".join(fmt_spread(r["at_steps"][str(s)]) for s in points)
            + f" | {fmt_spread(r['at_budget'])} | {fmt_spread(r['modelled_s'], '.1f')} | "
            f"{kilobytes(r['bytes_up_per_step'], r['per_worker_up'])} | "
            f"{kilobytes(r['bytes_down_per_step'], r['per_worker_down'])} | {sizes or '-'} |"
        )
    return "\n".join(lines)


def plots(results: dict, analysis: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if ok(r)]
    seq = analysis["sequences_per_step"]
    seeds = sorted({r["seed"] for r in runs})
    made = []
    axes = {
        "eval_steps": ("eval-loss-vs-sequences", f"sequences processed (one split step = {seq})"),
        "eval_modelled_s": ("eval-loss-vs-modelled-time", "modelled wall-clock (s, median over seeds)"),
    }
    for x_key, (stem, xlabel) in axes.items():
        figure, ax = plt.subplots(figsize=(7, 4.5))
        tail_top, bottom = -math.inf, math.inf
        for method in results["methods"]:
            group = [r for r in runs if r["method"] == method]
            if not group:
                continue
            xs, mid, low, high = band(group, x_key)
            if x_key == "eval_steps":
                xs = [x * seq for x in xs]
            line = ax.plot(xs, mid, marker=".", label=METHODS[method][0])[0]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
            tail_top = max(tail_top, high[min(len(high) - 1, max(1, len(high) // 5))])
            bottom = min(bottom, min(low))
        if x_key == "eval_modelled_s" and analysis["budget_s"] is not None:
            ax.axvline(analysis["budget_s"], color="grey", linestyle="--", linewidth=1, label="modelled budget")
        if math.isfinite(tail_top):  # the methods part in the tail: show it, not the first evals' fall from ~5.5
            ax.set_ylim(bottom - 0.05 * (tail_top - bottom), tail_top)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval loss (global model)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"non-IID (Dirichlet 0.5), {results['workers']} workers; median, min..max over seeds "
                     f"{', '.join(map(str, seeds))}", fontsize=9)  # fmt: skip
        figure.tight_layout()
        path = out / f"{stem}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        made.append(path)
    return made


def report(results: dict, out: Path) -> None:
    analysis = analyse(results)
    text = table(analysis, results)
    print(text)
    failed = [r for r in results["runs"] if not ok(r)]
    seq = analysis["sequences_per_step"]
    notes = [
        f"Split runs: `configs/split.yaml`, FedAvg: `configs/federated.yaml`, both with "
        f"{' '.join('`' + s + '`' for s in results['shared'])}; per method: "
        + "; ".join(
            f"{METHODS[m][0]}: {' '.join('`' + s + '`' for s in results['method_settings'][m])}"
            for m in results["methods"]
        )  # fmt: skip
        + f". Seeds {', '.join(map(str, results['seeds']))}.",
        f"One step is {results['workers']} workers x {results['batch_size']} = {seq} sequences of "
        f"{results['seq_len']} tokens: a split step (the merged batch, or the workers one after another in "
        f"SplitFed v2); a FedAvg round is {results['local_steps']} local steps of each of the "
        f"{results['workers']} clients, so {results['local_steps']} steps, and {results['steps']} steps = "
        f"{results['steps'] // results['local_steps']} rounds, the same {results['steps'] * seq} sequences.",
        f"Eval loss at step S: the last eval at or before it (evals every {results['eval_every']} steps, "
        f"FedAvg every {results['eval_every'] // results['local_steps']} round(s)); the final loss is at equal "
        "sequences too.",
        f"Modelled budget: the smallest of the methods' median total modelled times "
        f"({analysis['budget_s']:.1f} s, {METHODS[analysis['budget_method']][0]}); each run's eval loss at its last "
        "eval at or before it (no interpolation).",
        "Modelled time: split, per step, the workers' part at their drawn speeds (devices.step_s per "
        "train.batch_size sequences of the worker's part), their activations over their links, the server's "
        "measured compute (real seconds on this machine), the gradients back, then the workers' parts synced "
        "through the server (their gradients up and the mean down, fp32, every step); FedAvg, per round, the "
        "model down, local_steps whole-model steps at devices.step_s each, the update up. The same "
        "devices.step_s stands for a worker's bottom (embedding + 1 block) and for a client's whole model, as the "
        "mode's configs define it.",
        "Bytes: per step, summed over the workers (per worker: median and min..max over workers and seeds). "
        "Split: activations + labels up, gradients down, and the workers' part (the embedding and the first "
        "block: their gradients) up and its mean down, every step; FedAvg: the update up and the model down "
        "once a round, divided by its local steps.",
        "Batch sizes: per worker and seed (the devices are drawn from the seed); batch regulation sizes them to "
        "the workers' speeds, keeping their sum.",
        f"Sweep: {results.get('total_s', 0) / 60:.1f} min for {len(results['runs'])} runs "
        f"({sum(1 for r in results['runs'] if r.get('reused'))} reused).",
    ]
    if results.get("sources_changed"):
        notes.append("WARNING: the package's sources changed during the sweep (digest "
                     f"{results['sources_before']} -> {results['sources_after']}).")  # fmt: skip
    notes += checks(results)
    for r in failed:
        notes.append(f"FAILED: {r['name']} (exit {r.get('rc')}): {r.get('stderr_tail', 'non-finite final loss')}")
    md = [
        "# Split learning: SplitFed v2, merged features, batch regulation, and FedAvg", "", text, "",
        "## How to read it", "", *(f"- {n}" for n in notes), "",
        "## Re-run", "", "```", results["command"], "```", "",
        "Table and plots again from results.json: `.venv/bin/python benchmarks/split.py --plot-only"
        + (f" --out {out}" if out != DEFAULT_OUT else "") + "`", "",
    ]  # fmt: skip
    (out / "results.md").write_text("\n".join(md))
    results["analysis"] = analysis
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    paths = plots(results, analysis, out)
    print("\n" + "\n".join(n for n in notes if n.startswith(("CHECK", "FAILED", "WARNING"))), file=sys.stderr)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, " + ", ".join(map(str, paths)), file=sys.stderr)


# ---------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200, help="split steps; FedAvg rounds = steps / local steps")
    parser.add_argument("--eval-every", type=int, default=10, help="in split steps; a multiple of --local-steps")
    parser.add_argument("--local-steps", type=int, default=10, help="FedAvg's local steps per round (L)")
    parser.add_argument("--workers", type=int, default=4, help="split workers = FedAvg clients, all in every round")
    parser.add_argument("--executors", type=int, default=2)
    parser.add_argument("--cut", type=int, default=1)
    add_sweep_arguments(parser, "split", DEFAULT_OUT)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        report(json.loads((args.out / "results.json").read_text()), args.out)
        return
    if args.steps % args.local_steps or args.eval_every % args.local_steps:
        parser.error(
            f"--steps ({args.steps}) and --eval-every ({args.eval_every}) must be multiples of "
            f"--local-steps ({args.local_steps}): FedAvg's rounds and evals land on the same sequences"
        )
    args.scratch = args.scratch.resolve()
    args.scratch.mkdir(parents=True, exist_ok=True)

    from cocodc.config import load_config

    small = load_config(METHODS["merged"][1], method_settings(args, "merged"))
    shared = [*SMALL, *SHARED, f"train.steps={args.steps}", *args.set]
    began = time.perf_counter()
    results = {
        "command": shlex.join([".venv/bin/python", "benchmarks/split.py", *sys.argv[1:]]),
        "shared": shared,
        "method_settings": {m: [s for s in method_settings(args, m) if s not in shared]
                            for m in args.methods},  # fmt: skip
        "methods": args.methods, "seeds": args.seeds, "steps": args.steps, "eval_every": args.eval_every,
        "local_steps": args.local_steps, "workers": args.workers, "executors": args.executors, "cut": args.cut,
        "batch_size": small.train.batch_size, "seq_len": small.train.seq_len, "d_model": small.model.d_model,
        **provenance(), "runs": [],
    }  # fmt: skip

    def save() -> None:
        results["total_s"] = round(time.perf_counter() - began, 1)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    plan = [(seed, method) for seed in args.seeds for method in args.methods]
    for i, (seed, method) in enumerate(plan, 1):  # one after another: the machine's cores are shared
        entry = run(args, method, seed)
        results["runs"].append(entry)
        save()
        progress(entry, f"{i}/{len(plan)}")
    seal(results)
    save()
    report(results, args.out)


if __name__ == "__main__":
    main()
