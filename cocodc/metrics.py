"""Where a run's numbers go: console progress, JSON lines, and wandb.

One writer per file: region 0's leader writes `metrics.jsonl` (its own records and the global
evals), the leader of region m > 0 writes `metrics-region<m>.jsonl`, so regions on different
hosts of a shared filesystem never append to one file. `read_records(run/metrics.jsonl)` merges
them back. With wandb enabled every region is one run in a group named after the experiment,
with inner-step and outer-step axes.
"""

from __future__ import annotations

import json
import math
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cocodc.config import Config
from cocodc.topology import Topology


def region_files(path: Path) -> list[Path]:
    """A run's metrics.jsonl and the files of its other regions, in region order."""
    prefix = f"{path.stem}-region"
    others = sorted(path.parent.glob(f"{prefix}*{path.suffix}"), key=lambda p: int(p.stem.removeprefix(prefix)))
    return [path, *others]


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every region's records of the run whose metrics.jsonl is `path`, ordered by step (stable)."""
    if not path.exists():
        raise FileNotFoundError(path)
    return sorted((r for p in region_files(path) for r in _read(p)), key=lambda r: r["step"])


def truncate_after(path: Path, step: int) -> None:
    """Drop the records a stopped run wrote to `path` after its last checkpoint."""
    if path.exists():
        kept = [r for r in _read(path) if r["step"] <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Console:
    """A progress bar on a terminal; a plain line every tenth of the run anywhere else."""

    def __init__(self, total_steps: int, start_step: int, unit: str = "step", tag: str = ""):
        self.total, self.start, self.unit = total_steps, start_step, unit
        self.tag = f"{tag} | " if tag else ""  # whose lines, where several jobs share a terminal
        self.every = max(1, total_steps // 10)
        self.started = time.perf_counter()
        self.bar = (
            tqdm(
                total=total_steps, initial=start_step, unit=unit, desc=tag or None, dynamic_ncols=True, file=sys.stderr
            )
            if sys.stderr.isatty()
            else None
        )

    def update(self, step: int, loss: float, tokens_per_s: float, speed: dict[str, Any]) -> None:
        rate = f"{tokens_per_s / 1e3:.1f}k tok/s | {speed['tflops']:.3g} TFLOP/s"
        if speed["mfu"] is not None:
            rate += f" | MFU {100 * speed['mfu']:.1f}%"
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f} | {rate}", refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.every == 0 or step == self.total:
            done = step - self.start
            eta = (time.perf_counter() - self.started) / max(done, 1) * (self.total - step)
            self.print(f"{self.unit} {step}/{self.total} | loss {loss:.4f} | {rate} | eta {_duration(eta)}")

    def print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(self.tag + line, file=sys.stderr)
        else:
            print(self.tag + line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Metrics:
    def __init__(self, config: Config, topology: Topology, start_step: int):
        self.region, self.is_leader = topology.region, topology.is_leader
        self.run_dir = config.run_dir
        leads = topology.is_region_leader
        self.jsonl = open(self.path(self.run_dir, self.region), "a") if leads else None  # noqa: SIM115
        # The loop's step: an inner step, or a federated round (the x axis on the dashboard too).
        self.unit, self.axis = ("round", "round") if config.mode == "federated" else ("step", "inner_step")
        tag = f"region {self.region}" if config.ft.enabled else ""  # with ft, every region's job reports
        self.console = Console(config.steps, start_step, self.unit, tag) if self.is_leader else None
        self.wandb = _start_wandb(config, self.region) if leads and config.wandb.mode != "disabled" else None

    @staticmethod
    def path(run_dir: Path, region: int) -> Path:
        return run_dir / ("metrics.jsonl" if region == 0 else f"metrics-region{region}.jsonl")

    @staticmethod
    def summary_path(run_dir: Path, region: int) -> Path:
        """Region 0's leader writes the run's summary; with ft, every region's leader its own."""
        return run_dir / ("summary.json" if region == 0 else f"summary-region{region}.json")

    def print(self, line: str) -> None:
        if self.console is not None:
            self.console.print(line)

    def _write(self, record: dict[str, Any]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def train(
        self, step: int, loss: float, lr: float, step_s: float, tokens_per_s: float, speed: dict[str, Any], log: bool
    ) -> None:
        """`speed`: this rank's tflops, mfu (None where the device's peak is unknown) and
        peak_memory_bytes (throughput.py)."""
        if self.console is not None:
            self.console.update(step, loss, tokens_per_s, speed)
        if not log:
            return
        self._write(
            {
                "kind": "train",
                "step": step,
                "region": self.region,
                "loss": loss,
                "lr": lr,
                "step_s": step_s,
                "tokens_per_s": tokens_per_s,
                **speed,
            }
        )
        if self.wandb is not None:
            self.wandb.log(
                {
                    self.axis: step,
                    "train/loss": loss,
                    "train/lr": lr,
                    "train/step_s": step_s,
                    "train/tokens_per_s": tokens_per_s,
                    **{f"train/{key}": value for key, value in speed.items() if value is not None},
                }
            )

    def eval(self, step: int, loss: float, scope: str, wall_s: float) -> None:
        """scope: "global" (the outer parameters; written by rank 0) or "region" (live parameters);
        wall_s: the training loop's wall-clock so far."""
        if scope == "global" and not self.is_leader:
            return
        record = {"kind": "eval", "step": step, "scope": scope, "loss": loss, "ppl": math.exp(loss), "wall_s": wall_s}
        if scope == "region":
            record["region"] = self.region
        self._write(record)
        if self.wandb is not None:
            prefix = "eval" if scope == "global" else "eval_region"
            self.wandb.log({self.axis: step, f"{prefix}/loss": loss, f"{prefix}/ppl": math.exp(loss)})
        if self.console is not None:
            self.console.print(f"eval  {self.unit} {step:>6} | {scope} loss {loss:.4f} | ppl {math.exp(loss):.2f}")

    def records(self, records: list[dict[str, Any]]) -> None:
        """A mode's own records (`sync`, `decision`, ...), tagged with the region."""
        for record in records:
            self._write({**record, "region": self.region})
            if record["kind"] == "round":
                self._round(record)
            if record["kind"] == "split":
                self._split(record)
            if record["kind"] == "groups":
                self._groups(record)
            if record["kind"] == "group" and self.wandb is not None:
                g = record["group"]
                self.wandb.log(
                    {
                        "round": record["round"],
                        f"group{g}/edge_s": record["edge_s"],
                        f"group{g}/modelled_s": record["modelled_s"],
                        f"group{g}/accepted": len(record["accepted"]),
                    }
                )
            if record["kind"] == "batch_sizes":
                self.print(f"step {record['step']:>6} | batch regulation: worker batch sizes {record['sizes']}")
            if record["kind"] in ("membership", "dropped"):
                self._membership(record)
            if record["kind"] != "sync":
                continue
            if record["excluded"]:
                self.print(
                    f"sync  step {record['step']:>6} | fragment {record['fragment']}: the update of region(s) "
                    f"{', '.join(map(str, record['excluded']))} "
                    + ("is not finite or healed to join, " if "regions" in record else "is not finite ")
                    + "and was left out of the mean"
                )
            if self.wandb is not None:
                # A list does not chart: wandb gets how many regions were left out.
                values = {k: len(v) if isinstance(v, list) else v for k, v in record.items()}
                self.wandb.log(
                    {
                        "outer_step": record["outer_step"],
                        "inner_step": record["step"],
                        **{f"sync/{k}": v for k, v in values.items() if k not in ("kind", "outer_step", "step")},
                    }
                )

    def _membership(self, record: dict[str, Any]) -> None:
        """ft: a quorum whose members changed, or a sync dropped; a console line and the dashboard."""
        step = record["step"]
        if record["kind"] == "dropped":
            self.print(
                f"sync  step {step:>6} | fragment {record['fragment']} sent at step {record['send_step']} "
                f"was dropped: {record['reason']}"
            )
            if self.wandb is not None:
                self.wandb.log({self.axis: step, "ft/dropped_fragment": record["fragment"]})
            return
        self.print(
            f"ft    step {step:>6} | region {self.region}: quorum of regions {record['regions']}"
            + (f", {record['left']} left" if record["left"] else "")
            + (f", {record['joined']} joined" if record["joined"] else "")
            + (f", in-flight fragments {record['dropped']} dropped" if record["dropped"] else "")
            + (" (healed from a peer)" if record["healed"] else "")
            + f" | quorum {record['quorum_s']:.2f}s"
        )
        if self.wandb is not None:
            self.wandb.log(
                {
                    self.axis: step,
                    "ft/regions": len(record["regions"]),
                    "ft/left": len(record["left"]),
                    "ft/joined": len(record["joined"]),
                    "ft/quorum_s": record["quorum_s"],
                }
            )

    def _groups(self, record: dict[str, Any]) -> None:
        """The hierarchical mode's groups as planned: a console line each."""
        chosen = "by the rule" if record["rule"] else "as set"
        for g in record["groups"]:
            self.print(
                f"group {g['group']}: {len(g['members'])} clients, divergence {g['divergence']:.3f} | tunes the top "
                f"{g['depth']} blocks, {g['edge_rounds']} edge rounds a round ({chosen})"
            )

    def _round(self, record: dict[str, Any]) -> None:
        """A federated round's record: a console line for every client left out, counts to wandb."""
        reasons = {"late": "arrived after the deadline", "failed": "failed", "not_finite": "sent a non-finite update"}
        for key, why in reasons.items():
            if record[key]:
                clients = ", ".join(map(str, record[key]))
                self.print(f"round {record['round']:>5} | client(s) {clients} {why}: left out of the aggregate")
        if self.wandb is not None:
            import wandb  # started already: _start_wandb imported it

            charted: dict[str, Any] = {}
            for key, value in record.items():
                if isinstance(value, list):  # the clients left out: how many
                    charted[f"round/{key}"] = len(value)
                elif isinstance(value, dict):  # the per-client losses: a histogram per round, of the finite
                    finite = [v for v in value.values() if math.isfinite(v)]
                    if finite:
                        charted[f"round/{key}"] = wandb.Histogram(finite)
                elif key not in ("round", "kind"):
                    charted[f"round/{key}"] = value
            self.wandb.log({"round": record["round"], **charted})

    def _split(self, record: dict[str, Any]) -> None:
        """A split-learning step's record: a console line for workers left out; totals to wandb."""
        if record["excluded"]:
            workers = ", ".join(map(str, record["excluded"]))
            self.print(f"step {record['step']:>6} | worker(s) {workers} failed or sent non-finite values: left out")
        if self.wandb is not None:
            self.wandb.log(
                {
                    "inner_step": record["step"],
                    "split/modelled_s": record["modelled_s"],
                    "split/bytes_up": sum(record["bytes_up"]),
                    "split/bytes_down": sum(record["bytes_down"]),
                    "split/excluded": len(record["excluded"]),
                }
            )

    def summary(self, summary: dict[str, Any]) -> None:
        if self.is_leader:
            path = self.summary_path(self.run_dir, self.region)
            path.with_suffix(".tmp").write_text(json.dumps(summary, indent=2) + "\n")
            path.with_suffix(".tmp").replace(path)
            self.print(
                f"done: eval ppl {summary['initial_eval_ppl']:.2f} -> {summary['final_eval_ppl']:.2f} | "
                f"{summary['tokens_per_s'] / 1e3:.1f}k tok/s | {summary['tflops']:.3g} TFLOP/s per rank"
                + (f" (MFU {100 * summary['mfu']:.1f}%)" if summary["mfu"] is not None else "")
                + f" | peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB | {summary['wall_s']:.1f}s | "
                f"compute fraction {summary['compute_fraction']:.3f} | {path}"
            )
        if self.wandb is not None:
            self.wandb.summary.update(summary)

    def close(self) -> None:
        if self.console is not None:
            self.console.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.jsonl is not None:
            self.jsonl.close()


def _start_wandb(config: Config, region: int) -> Any:
    import wandb

    run_dir = config.run_dir
    role = f"region{region}"
    if config.mode in ("federated", "split"):
        role = "server" if region == 0 else f"executor{region}"
    id_file = run_dir / f"wandb-region{region}.id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    run = wandb.init(
        project=config.wandb.project,
        entity=config.wandb.entity,
        group=config.run.name,
        name=f"{config.run.name}-{role}",
        job_type=role.rstrip("0123456789"),
        id=run_id,
        resume="allow",
        mode=config.wandb.mode,
        dir=str(run_dir),
        config={**config.to_dict(), "region": region},
        settings=wandb.Settings(console="off", quiet=True),
    )
    axis = "round" if config.mode == "federated" else "inner_step"
    run.define_metric(axis)
    run.define_metric("outer_step")
    for prefix in ("train", "eval", "eval_region"):
        run.define_metric(f"{prefix}/*", step_metric=axis)
    run.define_metric("sync/*", step_metric="outer_step")
    run.define_metric("round/*", step_metric="round")
    run.define_metric("split/*", step_metric="inner_step")
    return run
