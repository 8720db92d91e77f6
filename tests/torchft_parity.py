"""One region of the torchft parity check; run by tests/test_parity.py under torchrun, 2 processes.

Every process trains the same tiny Transformer twice from the same initial weights on the same
batches: once with cocodc's OuterSync over the torchrun gloo group, once with torchft 0.2.0's
DiLoCo (its own Manager, lighthouse and gloo group), then saves both final models.

usage: torchft_parity.py OUT_DIR LIGHTHOUSE_ADDR H P TAU ALPHA STEPS
"""

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torchft.local_sgd import DiLoCo
from torchft.manager import Manager
from torchft.process_group import ProcessGroupGloo

from cocodc.config import ModelConfig, SyncConfig
from cocodc.model import Transformer, lm_loss
from cocodc.sync import OuterSync
from cocodc.sync.fragments import block_groups

VOCAB, SEQ, BATCH = 32, 16, 4


def fresh_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(n_layers=4, d_model=32, n_heads=2), VOCAB, SEQ)


def fragment_modules(model: Transformer, count: int) -> list[nn.Module]:
    """cocodc's strided fragments as modules: the embedding joins block 0's fragment, the final
    norm and head the last block's, as `split_model` assigns them."""
    groups = block_groups(len(model.blocks), count, "strided")
    last = next(p for p, members in enumerate(groups) if len(model.blocks) - 1 in members)
    fragments = []
    for p, members in enumerate(groups):
        modules = [model.embed] if p == 0 else []
        modules += [model.blocks[b] for b in members]
        modules += [model.norm, model.head] if p == last else []
        fragments.append(nn.ModuleList(modules))
    return fragments


def batches(region: int, steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + region)
    return [torch.randint(VOCAB, (BATCH, SEQ + 1), generator=generator) for _ in range(steps)]


def inner_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    lm_loss(model, batch).backward()
    optimizer.step()
    optimizer.zero_grad()


def run_cocodc(config: SyncConfig, data: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    model = fresh_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    outer = OuterSync(model, config, group=dist.group.WORLD)
    for batch in data:
        inner_step(model, optimizer, batch)
        outer.step()
    outer.finish()
    return model.state_dict()


def run_torchft(config: SyncConfig, data: list[torch.Tensor], region: int, lighthouse: str) -> dict[str, torch.Tensor]:
    model = fresh_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fragments = fragment_modules(model, config.fragments)
    outer_optimizers = [
        torch.optim.SGD(f.parameters(), lr=config.outer_lr, momentum=config.outer_momentum, nesterov=True)
        for f in fragments
    ]
    store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    manager = Manager(
        pg=ProcessGroupGloo(),
        min_replica_size=2,
        use_async_quorum=False,
        load_state_dict=None,
        state_dict=None,
        replica_id=f"region{region}",
        store_addr="localhost",
        store_port=store.port,
        rank=0,
        world_size=1,
        lighthouse_addr=lighthouse,
        port=0,
        hostname="localhost",
        init_sync=False,
        timeout=timedelta(seconds=60),
    )
    try:
        with DiLoCo(
            manager,
            fragments,
            optimizer,
            outer_optimizers,
            sync_every=config.sync_every,
            fragment_sync_delay=config.delay,
            fragment_update_alpha=config.alpha,
        ):
            for batch in data:
                inner_step(model, optimizer, batch)
        assert manager.current_step() == len(data) // (config.sync_every // config.fragments)
    finally:
        manager.shutdown(wait=False)
    return model.state_dict()


def main() -> None:
    out, lighthouse = Path(sys.argv[1]), sys.argv[2]
    sync_every, fragments, delay, alpha, steps = map(float, sys.argv[3:8])
    config = SyncConfig(
        method="streaming", sync_every=int(sync_every), fragments=int(fragments), delay=int(delay), alpha=alpha
    )
    dist.init_process_group("gloo")
    region = dist.get_rank()
    data = batches(region, int(steps))
    ours = run_cocodc(config, data)
    theirs = run_torchft(config, data, region, lighthouse)
    torch.save({"cocodc": ours, "torchft": theirs}, out / f"region{region}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
