"""Cross-region training in an accelerate script: one process per region.

    accelerate launch --num_processes 2 examples/accelerate_loop.py --out runs/acc   # on GPUs
    torchrun --standalone --nproc-per-node 2 examples/accelerate_loop.py --out runs/acc   # on CPUs

(accelerate 1.15's own launcher starts a single process on a CPU-only machine; under torchrun the
`Accelerator` joins the job as MULTI_CPU over gloo.) The inner steps accumulate gradients over
`--accumulate` micro-batches; `OuterSync` counts an inner step only when the optimizer really
steps. `save_state`/`load_state` carry the outer state with everything else: accelerate writes
from the main process only, so every region's parts travel in one `cocodc.RegionState`.

The model is not passed to `accelerator.prepare`: with one process per region, accelerate's DDP
would average gradients across the regions at every step, which is what the outer sync replaces.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from accelerate import Accelerator

import cocodc
from cocodc.config import DataConfig, ModelConfig
from cocodc.data import ByteTokenizer, load_rank_data
from cocodc.model import lm_loss


def eval_loss(accelerator: Accelerator, model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        loss = torch.tensor([sum(lm_loss(model, b).item() for b in batches) / len(batches)], device=accelerator.device)
    return accelerator.reduce(loss, reduction="mean").item()


def refuse(why: str, out: Path | str = "runs/acc") -> NoReturn:
    """One line on what is wrong and the commands that run the example."""
    print(
        f"accelerate_loop: {why}. Run: torchrun --standalone --nproc-per-node 2 examples/accelerate_loop.py --out "
        f"{out} (on GPUs: accelerate launch --num_processes 2 examples/accelerate_loop.py --out {out})",
        file=sys.stderr,
    )
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.error = refuse  # a bad argument: one line with the launch command, not argparse's usage
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--method", choices=["streaming", "cocodc"], default="cocodc")
    parser.add_argument("--steps", type=int, default=48, help="optimizer steps")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    # Without `cpu`, accelerate on a machine with no GPU runs every process alone.
    accelerator = Accelerator(gradient_accumulation_steps=args.accumulate, cpu=not torch.cuda.is_available())
    region, regions = accelerator.process_index, accelerator.num_processes
    if regions < 2:
        refuse(
            f"{regions} process, but it needs one per region (at least 2); accelerate launch starts one on a "
            "CPU-only machine",
            args.out,
        )
    torch.manual_seed(0)
    data = load_rank_data(DataConfig(), ByteTokenizer(), seed=0, batch_size=8, seq_len=64, eval_batch_count=4,
                          regions=regions, ranks_per_region=1, rank=region)  # fmt: skip
    model = cocodc.Transformer(ModelConfig(n_layers=2, d_model=64, n_heads=2), 256, 64).to(accelerator.device)
    optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=3e-3))
    sync = cocodc.SyncConfig(method=args.method, sync_every=8, fragments=2, delay=2)
    outer = cocodc.OuterSync(model, sync, group=dist.group.WORLD)
    outer.attach(optimizer)  # fires on real optimizer steps only
    parts = {"model": model, "optimizer": optimizer.optimizer, "outer": outer, "data": data.loader}
    accelerator.register_for_checkpointing(cocodc.RegionState(parts))
    checkpoint = args.out / "state"
    if args.resume:
        accelerator.load_state(checkpoint)
    initial = eval_loss(accelerator, model, data.eval_batches) if not args.resume else None

    while outer.inner_step < args.steps:
        with accelerator.accumulate(model):
            loss = lm_loss(model, data.loader.next_batch().to(accelerator.device))
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients and outer.inner_step == args.stop_at:
            accelerator.save_state(checkpoint)
            accelerator.end_training()
            return

    outer.finish()
    with outer.global_parameters():
        final = eval_loss(accelerator, model, data.eval_batches)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"region": region, "initial_eval_loss": initial, "final_eval_loss": final}
    summary |= {"inner_steps": outer.inner_step, "batches_read": data.loader.state_dict()["position"] // 8}
    global_copy = [p.clone() for params in outer.global_params for p in params]
    torch.save({"summary": summary, "global": global_copy}, args.out / f"final-rank{region}.pt")
    print(json.dumps(summary), flush=True)
    # The process group goes down here, not in the interpreter's teardown at exit: there, a gloo
    # thread still running can abort the process.
    accelerator.end_training()


if __name__ == "__main__":
    main()
