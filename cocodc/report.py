"""`cocodc report RUN...`: eval loss of the global model against inner steps and wall-clock, for
any runs, as one PNG, and a table of where each run ended."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from cocodc.config import SyncConfig
from cocodc.metrics import read_records


class ReportError(ValueError):
    """A run directory that cannot be reported on; the message is shown to the user as is."""


def load_curve(run: Path) -> dict:
    """A run's label, config and global eval curve: steps, losses, wall-clock seconds."""
    metrics, config_file = run / "metrics.jsonl", run / "config.yaml"
    if not metrics.is_file() or not config_file.is_file():
        raise ReportError(f"{run} is not a run directory (no metrics.jsonl and config.yaml)")
    config = yaml.safe_load(config_file.read_text())
    evals = sorted(
        (r for r in read_records(metrics) if r["kind"] == "eval" and r["scope"] == "global"), key=lambda r: r["step"]
    )
    if not evals:
        raise ReportError(f"{run} has no eval records yet")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    return {
        "run": run.name,
        "label": label(config),
        "unit": "round" if config.get("mode") == "federated" else "inner step",
        "steps": [r["step"] for r in evals],
        "loss": [r["loss"] for r in evals],
        "wall_s": [r.get("wall_s", float("nan")) for r in evals],
        "summary": summary,
    }


def label(config: dict) -> str:
    if config.get("mode") == "federated":
        return federated_label(config["federated"])
    if config.get("mode") == "split":
        return split_label(config["split"])
    sync = config["sync"]
    method = sync["method"]
    if method in ("ddp", "diloco"):
        return method
    # A run from before dc_normaliser was written down used the running normaliser.
    settings = SyncConfig(**{"dc_normaliser": "running", **sync})
    parts = [method, f"P={sync['fragments']}", f"tau={sync['delay']}", f"alpha={settings.mix:g}"]
    if method == "cocodc":
        rule = settings.dc_normaliser if settings.dc_adaptive else "constant"
        parts.append(f"lambda={settings.compensation_lambda:g} {rule}")
    if sync.get("schedule") == "adaptive":
        parts.append("adaptive schedule")
    if sync.get("quantize", "fp32") != "fp32":
        parts.append(sync["quantize"])
    return " ".join(parts)


def federated_label(federated: dict) -> str:
    parts = [federated["strategy"]]
    if federated["strategy"] == "fedprox":
        parts.append(f"mu={federated['proximal_mu']:g}")
    if federated.get("server_lr") is not None:
        parts.append(f"server lr={federated['server_lr']:g}")
    if federated["quantize"] != "fp32":
        parts.append(federated["quantize"])
    if federated["lora_rank"]:
        parts.append(f"LoRA r={federated['lora_rank']}")
    return " ".join(parts)


def split_label(split: dict) -> str:
    parts = ["merged features" if split["merge"] else "SplitFed v2", f"{split['shape']} shape", f"cut {split['cut']}"]
    if split["aggregate_every"] > 1:
        parts.append(f"FedAvg every {split['aggregate_every']}")
    if split["batch_regulation"]:
        parts.append("batch regulation")
    if split["quantize"] != "fp32":
        parts.append(split["quantize"])
    return " ".join(parts)


def plot_curves(curves: Sequence[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    # Past the default cycle's 10 colours, two curves would share one.
    palette = plt.get_cmap("tab20").colors if len(curves) > 10 else None
    for index, curve in enumerate(curves):
        colour = palette[index % len(palette)] if palette else None
        name = (
            curve["label"] if len({c["label"] for c in curves}) == len(curves) else f"{curve['run']}: {curve['label']}"
        )
        line = by_step.plot(curve["steps"], curve["loss"], marker=".", label=name, color=colour)[0]
        by_time.plot(curve["wall_s"], curve["loss"], marker=".", color=line.get_color())
    # The runs part in the tail: show it, not the first steps' fall.
    top = max(c["loss"][len(c["loss"]) // 5] for c in curves)
    bottom = min(min(c["loss"]) for c in curves)
    by_step.set_ylim(bottom - 0.05 * (top - bottom), top)
    by_step.set_xlabel(" / ".join(sorted({c["unit"] for c in curves})))
    by_step.set_ylabel("eval loss (global model)")
    by_time.set_xlabel("wall-clock (s)")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cocodc report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (runs/<name>)")
    parser.add_argument(
        "-o", "--out", type=Path, default=None, help="the PNG (default: report.png in the run, or here)"
    )
    options = parser.parse_args(argv)
    curves = [load_curve(run) for run in options.runs]
    out = options.out or (options.runs[0] / "report.png" if len(options.runs) == 1 else Path("report.png"))
    plot_curves(curves, out)
    width = max(len(c["run"]) for c in curves)
    print(f"{'run':<{width}}  {'final loss':>10}  {'steps':>6}  {'wall s':>7}  config")
    for c in curves:
        print(
            f"{c['run']:<{width}}  {c['loss'][-1]:>10.4f}  {c['steps'][-1]:>6}  {c['wall_s'][-1]:>7.1f}  {c['label']}"
        )
    print(f"wrote {out}")
    return 0
