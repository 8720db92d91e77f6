"""Inner-step throughput with each feature off and on, side by side: one process, a config's model,
the trainer's own forward/backward and AdamW step.

    python benchmarks/throughput.py [configs/tiny.yaml] [--steps 20] [--repeats 3] [--only NAME ...]
        [--out benchmarks/results/throughput/<device>]

Every variant is the config with a few keys set (VARIANTS). The variants run in turns, `repeats`
rounds of `steps` timed steps each after a warm-up, so a machine that slows down slows them all;
each row is the median step over all its rounds, and its speed-up is against the baseline of the
same run. Writes table.md, rows.csv and throughput.png to --out.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

from cocodc.config import Config, load_config
from cocodc.throughput import Throughput, peak_memory_bytes
from cocodc.topology import pick_device
from cocodc.train import build_model
from cocodc.trainer import forward_backward, inner_optimizer, uses_bf16

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "baseline (defaults)": [],
    "loss in one piece": ["train.loss_chunk_tokens=0"],
    "loss in 256-token chunks": ["train.loss_chunk_tokens=256"],
    "activation checkpointing: selective": ["train.activation_checkpointing=selective"],
    "activation checkpointing: full": ["train.activation_checkpointing=full"],
    "2 micro-batches of half the batch": ["train.grad_accum=2", "HALF_BATCH"],
    "compile": ["train.compile=true"],
    "compile + activation checkpointing: full": ["train.compile=true", "train.activation_checkpointing=full"],
}


class Variant:
    """A variant's model, optimizer and batch, stepped `steps` at a time."""

    def __init__(self, name: str, config: Config, device: torch.device):
        self.name, self.config, self.device = name, config, device
        vocab = 256 if config.data.tokenizer == "bytes" else config.data.vocab_size
        self.model = build_model(config, vocab, device)
        self.optimizer = inner_optimizer(self.model, config)
        rows = config.train.batch_size * config.train.grad_accum
        generator = torch.Generator().manual_seed(0)
        self.batch = torch.randint(0, vocab, (rows, config.train.seq_len + 1), generator=generator).to(device)
        self.tokens = rows * config.train.seq_len
        self.throughput = Throughput(self.model, config.train.seq_len, device, uses_bf16(config, device), 1)
        self.times: list[float] = []
        self.peak: int | None = None  # CUDA's allocator peak; a CPU process's peak RSS is not a variant's

    def run(self, steps: int, timed: bool = True) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for _ in range(steps):
            began = time.perf_counter()
            loss = forward_backward(self.model, self.batch, self.config, self.device)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss.item()  # waits for the device
            if timed:
                self.times.append(time.perf_counter() - began)
        if self.device.type == "cuda":
            self.peak = max(self.peak or 0, peak_memory_bytes(self.device))

    def row(self) -> dict:
        step_s = statistics.median(self.times)
        speed = self.throughput.at(self.tokens / step_s)
        return {"variant": self.name, "step_ms": 1e3 * step_s, "tokens_per_s": self.tokens / step_s,
                "tflops": speed["tflops"], "mfu": speed["mfu"],
                "peak_memory_gib": self.peak / 2**30 if self.peak is not None else None}  # fmt: skip


def config_of(path: str, settings: list[str]) -> Config:
    base = load_config(path)
    extra = [s for s in settings if s != "HALF_BATCH"]
    if "HALF_BATCH" in settings:
        extra.append(f"train.batch_size={max(1, base.train.batch_size // 2)}")
    return load_config(path, extra)


def measure(path: str, names: list[str], steps: int, repeats: int) -> list[dict]:
    """Each named variant of the config at `path`, in turns; its row of figures."""
    variants = []
    for name in names:
        config = config_of(path, VARIANTS[name])
        variants.append(Variant(name, config, pick_device(config)))
        variants[-1].run(2, timed=False)  # allocators, kernels, compilation
    for _ in range(repeats):
        for variant in variants:
            variant.run(steps)
    rows = [v.row() for v in variants]
    for row in rows:
        row["speedup"] = rows[0]["step_ms"] / row["step_ms"]
    return rows


def write(rows: list[dict], out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "rows.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [title, "", "| variant | step ms (median) | tokens/s | TFLOP/s | MFU | peak memory GiB | vs baseline |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        peak = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.3g} | {mfu} | "
                     f"{peak} | {r['speedup']:.2f}x |")  # fmt: skip
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    ax.barh([r["variant"] for r in rows][::-1], [r["tokens_per_s"] for r in rows][::-1], color="#3b75af")
    ax.axvline(rows[0]["tokens_per_s"], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("tokens / s (one process)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    names = [n for n in VARIANTS if n in args.only]
    names = names if names[0] == "baseline (defaults)" else ["baseline (defaults)", *names]
    device = pick_device(load_config(args.config))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    out = args.out or REPO / "benchmarks" / "results" / "throughput" / where.split(",")[0].replace(" ", "-")
    rows = measure(args.config, names, args.steps, args.repeats)
    title = (f"{Path(args.config).stem} on {where}: median of {args.repeats} x {args.steps} steps a variant, "
             f"in turns (torch {torch.__version__})")  # fmt: skip
    write(rows, out, title)


if __name__ == "__main__":
    main()
