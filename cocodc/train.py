"""The trainer, under torchrun: `torchrun --nproc-per-node N -m cocodc.train -c X.yaml [...]`.

It wires the parts together (topology, data, model, inner optimizer, outer sync, metrics,
checkpoints) and holds no algorithm of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cocodc import checkpoint
from cocodc.comm import CommEngine
from cocodc.comm.wan import LinkModel
from cocodc.config import Config, ConfigError, load_config
from cocodc.data import BPETokenizer, ByteTokenizer, Tokenizer, load_rank_data, tokenizer_training_texts
from cocodc.metrics import Metrics, truncate_after
from cocodc.model import Transformer, lm_loss
from cocodc.sync import OuterSync
from cocodc.topology import Topology, init_topology, shutdown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cocodc train", description="Train across regions.")
    parser.add_argument("-c", "--config", required=True, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.steps=100 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="checkpoint and exit after STEP, as if preempted (continue with --resume)",
    )
    return parser


def check_run_dir(config: Config, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into an old one; raises ConfigError or CheckpointError."""
    run_dir = config.run_dir
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other")
    if resume:
        checkpoint.latest_step(run_dir / "checkpoints")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"run directory {run_dir} exists; pass --resume to continue it, "
            "--overwrite to replace it, or --set run.name=<new name>"
        )


def lr_at(step: int, config: Config) -> float:
    """Linear warmup to train.lr, then cosine decay to train.lr * train.min_lr_ratio."""
    t = config.train
    if step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def inner_optimizer(model: nn.Module, config: Config) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    t = config.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
    )


def evaluate(
    model: nn.Module,
    batches: list[torch.Tensor],
    share: int,
    shares: int,
    engine: CommEngine,
    device: torch.device,
    autocast: Any,
) -> float:
    """Mean eval loss; the batches are dealt over `shares` ranks and summed through `engine`."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast():
        for batch in batches[share::shares]:
            batch = batch.to(device)
            count = batch[:, 1:].numel()
            totals += torch.tensor([lm_loss(model, batch).item() * count, count], device=device, dtype=torch.float64)
    model.train(was_training)
    totals = engine.all_reduce_mean(totals).wait()
    return (totals[0] / totals[1]).item()


def build_tokenizer(config: Config, topology: Topology, world: CommEngine) -> Tokenizer:
    if config.data.tokenizer == "bytes":
        return ByteTokenizer()
    path = config.run_dir / "tokenizer.json"
    if topology.is_leader and not path.exists():
        BPETokenizer.train(tokenizer_training_texts(config.data), config.data.vocab_size).save(path)
    world.barrier()
    return BPETokenizer.load(path)


def wan_engine(config: Config, topology: Topology) -> CommEngine:
    """The engine over the WAN: the inter-region group (the world for ddp), with the link model
    when one is configured (a netem-emulated WAN delays the real packets instead)."""
    ddp = config.sync.method == "ddp"
    group = topology.world_group if ddp else topology.inter_group
    w = config.wan
    if not w.enabled or w.emulation != "model":
        return CommEngine(group)
    link = LinkModel.build(
        topology.regions, w.latency_ms, w.bandwidth_mbps, w.jitter_ms, seed=config.seed + topology.rank
    )
    if ddp:
        link = link.for_ranks([r // topology.ranks_per_region for r in range(topology.world_size)])
    return CommEngine(group, link)


@dataclass
class Totals:
    """Running sums that survive a resume."""

    compute_s: float = 0.0
    wall_s: float = 0.0
    eval_s: float = 0.0
    checkpoint_s: float = 0.0
    initial_eval_loss: float = float("nan")
    wan: dict[str, float] = field(default_factory=lambda: {"bytes_sent": 0, "bytes_received": 0, "blocked_s": 0.0})


def run(config: Config, *, resume: bool = False, overwrite: bool = False, stop_at: int | None = None) -> None:
    topology = init_topology(config)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(config.train.threads or max(1, (os.cpu_count() or 1) // local_ranks))
    world = CommEngine(topology.world_group)
    run_dir, ckpt_root = config.run_dir, config.run_dir / "checkpoints"
    check_run_dir(config, resume, overwrite)
    world.barrier()  # every rank has checked before the leader changes anything
    if topology.is_leader:
        if overwrite:
            shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    start_step, state = 0, None
    if resume:
        start_step = checkpoint.latest_step(ckpt_root)
        checkpoint.check_compatible(ckpt_root, start_step, config, topology.world_size)
        state = checkpoint.load_rank(ckpt_root, start_step, topology.rank)
        if topology.is_leader:
            truncate_after(run_dir / "metrics.jsonl", start_step)
    if stop_at is not None and stop_at <= start_step:
        raise ConfigError(f"--stop-at {stop_at} must come after the step training starts from ({start_step})")
    world.barrier()

    device = topology.device
    tokenizer = build_tokenizer(config, topology, world)
    data = load_rank_data(
        config.data,
        tokenizer,
        seed=config.seed,
        batch_size=config.train.batch_size,
        seq_len=config.train.seq_len,
        eval_batch_count=config.eval.batches,
        regions=topology.regions,
        ranks_per_region=topology.ranks_per_region,
        rank=topology.rank,
    )
    torch.manual_seed(config.seed)
    model = Transformer(config.model, tokenizer.vocab_size, config.train.seq_len).to(device)
    optimizer = inner_optimizer(model, config)
    method = config.sync.method
    intra = CommEngine(topology.intra_group)
    wan = wan_engine(config, topology)
    outer = OuterSync(model, config.sync, wan, intra=intra) if method != "ddp" else None
    totals = Totals()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if outer is not None:
            outer.load_state_dict(state["outer"])
        data.loader.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        totals = Totals(**state["totals"])
        wan.bytes_sent, wan.bytes_received = totals.wan["bytes_sent"], totals.wan["bytes_received"]
        wan.blocked_s = totals.wan["blocked_s"]

    train_model: nn.Module = model
    if method == "ddp" and topology.world_size > 1:
        train_model = DistributedDataParallel(model, process_group=topology.world_group)
        train_model.register_comm_hook(wan, lambda engine, bucket: engine.all_reduce_mean(bucket.buffer()).future())
    elif topology.ranks_per_region > 1:
        train_model = DistributedDataParallel(model, process_group=topology.intra_group)

    use_bf16 = config.train.precision == "bf16" or (config.train.precision == "auto" and device.type == "cuda")

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    metrics = Metrics(config, topology.region, topology.is_region_leader, topology.is_leader, start_step)

    def eval_global(step: int) -> float:
        began = time.perf_counter()
        with outer.global_parameters() if outer is not None else contextlib.nullcontext():
            loss = evaluate(model, data.eval_batches, topology.rank, topology.world_size, world, device, autocast)
        metrics.eval(step, loss, "global", totals.wall_s)
        if config.eval.per_region and outer is not None:
            region_loss = evaluate(
                model, data.eval_batches, topology.local_index, topology.ranks_per_region, intra, device, autocast
            )
            metrics.eval(step, region_loss, "region", totals.wall_s)
        totals.eval_s += time.perf_counter() - began
        return loss

    def save(step: int) -> None:
        began = time.perf_counter()
        totals.wan = {"bytes_sent": wan.bytes_sent, "bytes_received": wan.bytes_received, "blocked_s": wan.blocked_s}
        checkpoint.save_rank(
            ckpt_root,
            step,
            topology.rank,
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "outer": outer.state_dict() if outer is not None else None,
                "data": data.loader.state_dict(),
                "rng": torch.get_rng_state(),
                "totals": vars(totals),
            },
        )
        world.barrier()
        if topology.is_leader:
            checkpoint.commit(ckpt_root, step, config, config.checkpoint.keep)
        totals.checkpoint_s += time.perf_counter() - began

    if topology.is_leader:
        params = sum(p.numel() for p in model.parameters())
        metrics.console.print(
            f"cocodc: {method} | {topology.regions} regions x {topology.ranks_per_region} ranks | "
            f"{params / 1e6:.2f}M params | {config.train.steps} steps of {topology.world_size} x "
            f"{config.train.batch_size} x {config.train.seq_len} tokens | {device.type} | {run_dir}"
            + (f" | resumed at step {start_step}" if resume else "")
        )
    segment_start, segment_wall = time.perf_counter(), totals.wall_s
    if start_step == 0:
        totals.initial_eval_loss = eval_global(0)

    tokens_per_step = topology.world_size * config.train.batch_size * config.train.seq_len
    last_step = min(config.train.steps, stop_at) if stop_at is not None else config.train.steps
    step = start_step
    for step in range(start_step + 1, last_step + 1):
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data.loader.next_batch().to(device, non_blocking=True)
        began = time.perf_counter()
        with autocast():
            loss = lm_loss(train_model, batch)
        loss.backward()
        if config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        step_s = time.perf_counter() - began
        totals.compute_s += step_s
        if outer is not None:
            outer.step()
            metrics.sync(outer.pop_records())
        totals.wall_s = segment_wall + time.perf_counter() - segment_start
        metrics.train(
            step,
            loss_value,
            lr,
            step_s,
            tokens_per_step * (step - start_step) / (totals.wall_s - segment_wall),
            log=step % config.train.log_every == 0,
        )
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training diverged at step {step}: loss is {loss_value}")
        if config.eval.every and step % config.eval.every == 0 and step != config.train.steps:
            eval_global(step)
        if config.checkpoint.every and step % config.checkpoint.every == 0 and step != last_step:
            save(step)

    if step < config.train.steps:  # stopped early on purpose
        save(step)
        metrics.close(None)
        if topology.is_leader:
            metrics.console.print(f"stopped after step {step}; continue with --resume")
        return
    if outer is not None:
        outer.finish()
        metrics.sync(outer.pop_records())
    final_loss = eval_global(config.train.steps)
    if step > start_step:
        save(config.train.steps)
    totals.wall_s = segment_wall + time.perf_counter() - segment_start
    summary = summarize(config, topology, totals, wan, world, final_loss, tokens_per_step)
    if topology.is_leader:
        path = run_dir / "summary.json"
        path.with_suffix(".tmp").write_text(json.dumps(summary, indent=2) + "\n")
        path.with_suffix(".tmp").replace(path)
        metrics.console.print(
            f"done: eval ppl {summary['initial_eval_ppl']:.2f} -> {summary['final_eval_ppl']:.2f} | "
            f"{summary['tokens_per_s'] / 1e3:.1f}k tok/s | {summary['wall_s']:.1f}s | "
            f"compute fraction {summary['compute_fraction']:.3f} | {path}"
        )
    metrics.close(summary)


def summarize(
    config: Config,
    topology: Topology,
    totals: Totals,
    wan: CommEngine,
    world: CommEngine,
    final_loss: float,
    tokens_per_step: int,
) -> dict[str, Any]:
    busy = totals.wall_s - totals.eval_s - totals.checkpoint_s
    # Means over ranks; WAN bytes are per region (every local rank of a region carries its share).
    per_rank = torch.tensor(
        [wan.bytes_sent, wan.bytes_received, wan.blocked_s, totals.compute_s / busy],
        dtype=torch.float64,
        device=topology.device,
    )
    sent, received, blocked, compute_fraction = world.all_reduce_mean(per_rank).wait().tolist()
    return {
        "method": config.sync.method,
        "regions": topology.regions,
        "ranks_per_region": topology.ranks_per_region,
        "steps": config.train.steps,
        "initial_eval_loss": totals.initial_eval_loss,
        "initial_eval_ppl": math.exp(totals.initial_eval_loss),
        "final_eval_loss": final_loss,
        "final_eval_ppl": math.exp(final_loss),
        "tokens": tokens_per_step * config.train.steps,
        "wall_s": totals.wall_s,
        "tokens_per_s": tokens_per_step * config.train.steps / totals.wall_s,
        "compute_fraction": compute_fraction,
        "blocked_s": blocked,
        "eval_s": totals.eval_s,
        "checkpoint_s": totals.checkpoint_s,
        "bytes_sent": round(sent * topology.ranks_per_region),
        "bytes_received": round(received * topology.ranks_per_region),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        run(config, resume=args.resume, overwrite=args.overwrite, stop_at=args.stop_at)
    except (ConfigError, checkpoint.CheckpointError, FloatingPointError) as err:
        print(f"cocodc: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
