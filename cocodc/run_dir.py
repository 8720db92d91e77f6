"""A run as `cocodc train` and `python -m cocodc.train` name it: their arguments, and the run
directory's layout and the checks made on it before any rank starts. Imported by the launcher, so
it imports no training code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cocodc.config import Config, ConfigError


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or written by an incompatible config."""


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
        "--print-run-dir",
        action="store_true",
        help="print the run directory the config and overrides name, and exit (for job scripts)",
    )
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="checkpoint and exit after STEP, as if preempted (continue with --resume)",
    )
    return parser


def checkpoint_root(config: Config, region: int) -> Path:
    """Where the run's checkpoints go; with ft, each region keeps its own (its job saves and
    resumes on its own)."""
    root = config.run_dir / "checkpoints"
    return root / f"region{region}" if config.ft.enabled else root


def checkpoint_regions(config: Config, region: int) -> range:
    """The regions whose state a checkpoint under `checkpoint_root(config, region)` holds."""
    return range(region, region + 1) if config.ft.enabled else range(config.shape[0])


def check_run_dir(config: Config, resume: bool, overwrite: bool, region: int = 0) -> None:
    """Refuse to mix a new run into an old one; raises ConfigError or CheckpointError."""
    run_dir = config.run_dir
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other")
    if resume:
        from cocodc import checkpoint  # torch.distributed.checkpoint: seconds, only to resume

        checkpoint.latest_step(checkpoint_root(config, region))
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"run directory {run_dir} exists; pass --resume to continue it, "
            "--overwrite to replace it, or --set run.name=<new name>"
        )


RUN_README = """A cocodc run directory (cocodc train ...; --resume continues it).

config.yaml               the resolved config: every key, defaults included
metrics.jsonl             records, one JSON object a line (train, eval, sync, decision; round or
                          split in those modes), written by region 0's leader (the server)
metrics-region<m>.jsonl   the same records of region m > 0 (one writer a file): read them all
                          together with cocodc.metrics.read_records("metrics.jsonl"), or plot
                          them with `cocodc report <this directory>`
summary.json              the run's summary: final eval loss, tokens/s, TFLOP/s, MFU, peak memory,
                          WAN bytes, the training state per rank (with ft.enabled, region m's own
                          in summary-region<m>.json)
checkpoints/              step_<N>/ sharded checkpoints, the newest complete one named in LATEST
                          (with ft.enabled, one such directory per region); rescue/: what each
                          rank held when a lost peer ended the run
tokenizer.json            the tokenizer (trained with data.tokenizer bpe, or hf:PATH's), with
tokenizer_config.json     its end-of-text token
wandb/                    wandb's files, with wandb.mode offline or online
"""
