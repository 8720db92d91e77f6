"""The entry point under torchrun: `torchrun --nproc-per-node N -m cocodc.train -c X.yaml [...]`.

It joins the process groups, builds the shared parts (trainer.py) and runs the configured mode.
"""

from __future__ import annotations

import argparse
import signal
import sys

import torch

from cocodc import checkpoint
from cocodc.comm import CommEngine, CommError
from cocodc.config import Config, ConfigError, load_config
from cocodc.data import load_rank_data
from cocodc.model import Transformer
from cocodc.modes.regions import RegionsMode
from cocodc.topology import init_topology, shutdown
from cocodc.trainer import Interrupted, Trainer, build_tokenizer, open_run, threads_per_rank


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


def run(config: Config, *, resume: bool = False, overwrite: bool = False, stop_at: int | None = None) -> None:
    topology = init_topology(config)
    torch.set_num_threads(threads_per_rank(config))
    setup = CommEngine(topology.setup_group, name="setup")
    start_step, state = open_run(config, topology, setup, resume=resume, overwrite=overwrite, stop_at=stop_at)
    tokenizer = build_tokenizer(config, topology, setup)
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
    model = Transformer(config.model, tokenizer.vocab_size, config.train.seq_len).to(topology.device)
    timeout = config.topology.timeout_s
    world = CommEngine(topology.world_group, name="world", timeout_s=timeout)
    intra = CommEngine(topology.intra_group, name=f"region {topology.region}", timeout_s=timeout)
    trainer = Trainer(config, topology, world, intra, data, model, start_step)
    trainer.run(RegionsMode(config, topology, model, intra), state, stop_at)
    setup.barrier()  # torn down together: a group destroyed while a peer still talks to it can abort


def _stop_on(signum: int, _frame: object) -> None:
    # Once: a dying launcher's death signal and torchrun's stop can both arrive, and a second
    # interrupt must not cut the rescue or the shutdown short.
    for other in (signal.SIGTERM, signal.SIGINT):
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_on)
    try:
        config = load_config(args.config, args.overrides)
        run(config, resume=args.resume, overwrite=args.overwrite, stop_at=args.stop_at)
    except (ConfigError, checkpoint.CheckpointError, FloatingPointError, CommError, Interrupted) as err:
        print(f"cocodc: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
