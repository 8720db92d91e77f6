"""The entry point under torchrun: `torchrun --nproc-per-node N -m cocodc.train -c X.yaml [...]`.

It joins the process groups, builds the shared parts (trainer.py) and runs the configured mode.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

import torch
from torch import nn

from cocodc import checkpoint, kernels
from cocodc.comm import CommEngine, CommError
from cocodc.config import Config, ConfigError, load_config
from cocodc.data import RankData, hub_reachable, load_client_data, load_rank_data
from cocodc.hf_model import build_hf_model
from cocodc.model import Transformer
from cocodc.model_io import load_pretrained
from cocodc.modes.federated import FederatedMode
from cocodc.modes.hierfed import HierarchicalMode
from cocodc.modes.regions import RegionsMode
from cocodc.modes.split import SplitMode
from cocodc.run_dir import build_parser
from cocodc.topology import REPORTED_EXIT, init_topology, shutdown
from cocodc.trainer import Interrupted, Mode, Trainer, build_tokenizer, open_run, threads_per_rank


def run(config: Config, *, resume: bool = False, overwrite: bool = False, stop_at: int | None = None) -> None:
    topology = init_topology(config)
    torch.set_num_threads(threads_per_rank(config))
    kernels.set_backend(config.train.kernels)
    if config.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any matmul
        torch.use_deterministic_algorithms(True, warn_only=True)  # an op with no such version warns
    setup = CommEngine(topology.setup_group, name="setup")
    config = reachable_data(config, topology.is_leader, setup)
    start_step = open_run(config, topology, setup, resume=resume, overwrite=overwrite, stop_at=stop_at)
    tokenizer = build_tokenizer(config, topology, setup)
    model = build_model(config, tokenizer.vocab_size, topology.device)
    timeout = config.topology.timeout_s
    world = CommEngine(topology.world_group, name="world", timeout_s=timeout)
    intra = CommEngine(topology.intra_group, name=f"region {topology.region}", timeout_s=timeout)
    data_args = dict(seed=config.seed, batch_size=config.train.batch_size, seq_len=config.train.seq_len)
    mode: Mode
    if config.mode in ("federated", "split"):
        clients = config.federated.clients if config.mode == "federated" else config.split.workers
        shards, evals = load_client_data(
            config.data, tokenizer, clients=clients, eval_batch_count=config.eval.batches, **data_args
        )
        data = RankData(shards, evals)
        if config.mode == "federated":
            mode_class = HierarchicalMode if config.federated.groups else FederatedMode
        else:
            mode_class = SplitMode
        mode = mode_class(config, topology, model, shards)
    else:
        data = load_rank_data(
            config.data,
            tokenizer,
            eval_batch_count=config.eval.batches,
            regions=topology.regions,
            ranks_per_region=topology.ranks_per_region,
            rank=topology.rank,
            grad_accum=config.train.grad_accum,
            **data_args,
        )
        mode = RegionsMode(config, topology, model, intra)
    trainer = Trainer(config, topology, world, intra, data, model, start_step)
    trainer.run(mode, stop_at)
    setup.barrier()  # torn down together: a group destroyed while a peer still talks to it can abort


def reachable_data(config: Config, leader: bool, setup: CommEngine) -> Config:
    """The config, or where its data.source is on a hub out of reach (this machine has no network),
    the same on the shipped corpus, said on the console. The leader decides for every rank."""
    source = config.data.source
    if not source.startswith("hf:") or Path(source.removeprefix("hf:")).exists():
        return config
    reachable = setup.broadcast(torch.tensor([float(hub_reachable()) if leader else 0.0]), 0).wait()
    if reachable.item():
        return config
    if leader:
        print(
            f"cocodc: the Hugging Face hub is out of reach: data.source {source} falls back to the shipped corpus "
            "(kjv); a resume needs the same (or data.source=kjv)",
            file=sys.stderr,
        )
    return dataclasses.replace(config, data=dataclasses.replace(config.data, source="kjv"))


def build_model(config: Config, vocab_size: int, device: torch.device) -> nn.Module:
    """The seeded model (the same on every rank), built on the meta device and made on `device`, or
    the transformers model of model.hf_config; from model.init_from; federated: with LoRA. Its
    blocks compiled with train.compile."""
    torch.manual_seed(config.seed)  # what draws from torch's generator (LoRA's A) draws alike on every rank
    m = config.model
    if m.hf_config:
        model = build_hf_model(m.hf_config, vocab_size, config.sync.blocks, config.train.activation_checkpointing)
    else:
        with torch.device("meta"):
            model = Transformer(m, vocab_size, m.max_seq_len or config.train.seq_len)
        model.materialize(device, config.seed)
        model.activation_checkpointing = config.train.activation_checkpointing
        model.loss_chunk_tokens = config.train.loss_chunk_tokens
    f = config.federated
    if config.model.init_from:
        load_pretrained(model, config.model.init_from)
    if config.mode == "federated" and f.lora_rank:
        from cocodc.federated.lora import add_lora  # peft imports transformers: seconds, only when asked

        model = add_lora(model, f.lora_rank, f.lora_alpha)
    if config.train.compile:
        for block in model.blocks:  # in place: the parameters keep their names
            block.compile()
    return model.to(device)  # LoRA's adapters are made where peft makes them


def _stop_on(signum: int, _frame: object) -> None:
    # Once: a dying launcher's death signal and torchrun's stop can both arrive, and a second
    # interrupt must not cut the rescue or the shutdown short.
    for other in (signal.SIGTERM, signal.SIGINT):
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    """The worker: the exit code (REPORTED_EXIT after a one-line error). Its process groups are left
    up after an error (a lost peer can leave them broken, and tearing those down can abort the
    process, which the launcher would then report as this rank's failure): end the process with
    `exit_now`."""
    args = build_parser().parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_on)
    try:
        config = load_config(args.config, args.overrides)
        if args.print_run_dir:
            print(config.run_dir)
            return 0
        run(config, resume=args.resume, overwrite=args.overwrite, stop_at=args.stop_at)
    except (ConfigError, checkpoint.CheckpointError, FloatingPointError, CommError, Interrupted) as err:
        # One write: the ranks share the launcher's stderr, and print's two (text, newline) would let
        # another rank's line land between them.
        sys.stderr.write(f"cocodc: error: {err}\n")
        return REPORTED_EXIT
    shutdown()
    return 0


def exit_now(code: int) -> NoReturn:
    """End the process once its output is out, skipping the interpreter's teardown of torch's
    modules (a second or more per rank, after everything is written) and of broken groups."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
