"""Cross-region training in your own PyTorch loop: one process per region, under torchrun.

    torchrun --standalone --nproc-per-node 2 examples/plain_torch.py --out runs/plain \
        [--method streaming|cocodc] [--steps 48] [--stop-at STEP] [--resume]

Each region trains the tiny model on its shard of the shipped corpus with AdamW; `OuterSync`
streams fragments of it between the regions while training goes on. At the end the global model
is evaluated; every rank prints a JSON summary and writes it with its global copy to
`final-rank<r>.pt`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

import cocodc
from cocodc.checkpoint import atomic_save
from cocodc.config import DataConfig, ModelConfig
from cocodc.data import ByteTokenizer, load_rank_data
from cocodc.model import lm_loss


def eval_loss(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """The mean loss over the eval batches, averaged over the regions."""
    with torch.no_grad():
        loss = torch.tensor([sum(lm_loss(model, b).item() for b in batches) / len(batches)])
    dist.all_reduce(loss)
    return loss.item() / dist.get_world_size()


def refuse(why: str, out: Path | str = "runs/plain") -> NoReturn:
    """One line on what is wrong and the command that runs the example."""
    launch = f"torchrun --standalone --nproc-per-node 2 examples/plain_torch.py --out {out}"
    print(f"plain_torch: {why}. Run: {launch}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.error = refuse  # a bad argument: one line with the launch command, not argparse's usage
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--method", choices=["streaming", "cocodc"], default="streaming")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    if int(os.environ.get("WORLD_SIZE", 1)) < 2:
        refuse("it needs one process per region (at least 2), started by torchrun", args.out)
    dist.init_process_group("gloo")
    region, regions = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    data = load_rank_data(DataConfig(), ByteTokenizer(), seed=0, batch_size=8, seq_len=64, eval_batch_count=4,
                          regions=regions, ranks_per_region=1, rank=region)  # fmt: skip
    model = cocodc.Transformer(ModelConfig(n_layers=2, d_model=64, n_heads=2), vocab_size=256, max_seq_len=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sync = cocodc.SyncConfig(method=args.method, sync_every=8, fragments=2, delay=2)
    outer = cocodc.OuterSync(model, sync, group=dist.group.WORLD)  # the regions' group: here, the world
    outer.attach(optimizer)  # outer.step() after every optimizer.step()

    parts = {"model": model, "optimizer": optimizer, "outer": outer, "data": data.loader}
    checkpoint = args.out / f"rank{region}.pt"
    start = 0
    if args.resume:
        state = torch.load(checkpoint, weights_only=True)
        for name, part in parts.items():
            part.load_state_dict(state[name])
        start = state["step"]
    initial = eval_loss(model, data.eval_batches) if start == 0 else None

    for step in range(start + 1, args.steps + 1):
        loss = lm_loss(model, data.loader.next_batch())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == args.stop_at:
            args.out.mkdir(parents=True, exist_ok=True)
            atomic_save(checkpoint, {"step": step, **{name: part.state_dict() for name, part in parts.items()}})
            dist.destroy_process_group()
            return

    outer.finish()  # apply what is still in flight
    with outer.global_parameters():
        final = eval_loss(model, data.eval_batches)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"region": region, "initial_eval_loss": initial, "final_eval_loss": final}
    summary["inner_steps"] = outer.inner_step
    global_copy = [p.clone() for params in outer.global_params for p in params]
    torch.save({"summary": summary, "global": global_copy}, args.out / f"final-rank{region}.pt")
    print(json.dumps(summary), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
