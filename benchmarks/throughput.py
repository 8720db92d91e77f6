"""Inner-step throughput: forward, backward and AdamW step of a config's model on one process.

    python benchmarks/throughput.py configs/tiny.yaml [more configs] [--steps 20] [--threads 1 2]

Prints a table (parameters, step time, tokens/s per thread count) and writes throughput.png.
The inner step's speed decides how long a link must be hidden behind compute, so it is the
first number to know before choosing sync.delay.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cocodc.config import load_config
from cocodc.model import Transformer, lm_loss
from cocodc.topology import pick_device
from cocodc.trainer import inner_optimizer


def measure(config_path: str, steps: int, threads: int) -> dict:
    config = load_config(config_path)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = pick_device(config)
    vocab = 256 if config.data.tokenizer == "bytes" else config.data.vocab_size
    model = Transformer(config.model, vocab, config.train.seq_len).to(device)
    optimizer = inner_optimizer(model, config)
    batch = torch.randint(0, vocab, (config.train.batch_size, config.train.seq_len + 1), device=device)
    bf16 = device.type == "cuda" and config.train.precision != "fp32"
    times = []
    for _ in range(steps + 2):  # the first two warm up allocators and kernels
        began = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = lm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - began)
    step_s = sorted(times[2:])[len(times[2:]) // 2]
    return {
        "config": Path(config_path).stem,
        "threads": threads,
        "params": sum(p.numel() for p in model.parameters()),
        "step_ms": 1e3 * step_s,
        "tokens_per_s": config.train.batch_size * config.train.seq_len / step_s,
        "device": device.type,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    parser.add_argument("--plot", default="throughput.png")
    args = parser.parse_args()
    rows = [measure(c, args.steps, t) for c in args.configs for t in sorted(set(args.threads))]
    print(f"| {'config':<12} | device | threads | {'params':>10} | step ms (median) | tokens/s |")
    print(f"|{'-' * 14}|--------|---------|{'-' * 12}|------------------|----------|")
    for r in rows:
        print(
            f"| {r['config']:<12} | {r['device']:<6} | {r['threads']:>7} | {r['params']:>10,} | "
            f"{r['step_ms']:>16.1f} | {r['tokens_per_s']:>8.0f} |"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['config']}\n{r['threads']} thr" for r in rows]
    ax.bar(labels, [r["tokens_per_s"] for r in rows], color="#3b75af")
    ax.set_ylabel("tokens / s (one process)")
    ax.set_title("Inner-step throughput")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
