"""The `cocodc` command.

`cocodc train -c X.yaml [--set k=v ...]` checks the config and the run directory, then starts
torchrun with one process per rank on this host (or runs in place when already under torchrun).
For several hosts, run torchrun yourself: `torchrun --nnodes ... -m cocodc.train -c X.yaml`.
"""

from __future__ import annotations

import argparse
import os
import sys

from cocodc import __version__, checkpoint
from cocodc.config import ConfigError, load_config


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def train_command(args: list[str]) -> int:
    from cocodc import train

    if _under_torchrun():
        return train.main(args)
    options = train.build_parser().parse_args(args)
    try:
        config = load_config(options.config, options.overrides)
        train.check_run_dir(config, options.resume, options.overwrite)
        world_size = config.topology.regions * config.topology.ranks_per_region
        if options.resume:
            root = config.run_dir / "checkpoints"
            checkpoint.check_compatible(root, checkpoint.latest_step(root), config, world_size)
    except (ConfigError, checkpoint.CheckpointError) as err:
        print(f"cocodc: error: {err}", file=sys.stderr)
        return 2
    if world_size == 1:
        return train.main(args)
    # torchrun would set one thread per process and warn; share the cores out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={world_size}",
        "-m",
        "cocodc.train",
        *args,
    ]
    sys.stdout.flush()
    os.execv(sys.executable, command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cocodc", description="Train language models across regions.")
    parser.add_argument("--version", action="version", version=f"cocodc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("train", help="train a model (see `cocodc train --help`)", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    parser.parse_args(argv[:1])  # --help, --version, or a known command; argparse exits on anything else
    return train_command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
