"""The parts every mode shares, and the inner-step loop.

A mode (modes/regions.py today) is what happens around the inner step: it hands the loop the
module to step through, a hook after every step, a view of the global parameters for eval and
its own stateful parts. The loop, the checkpoint of the list of parts, eval, metrics and the
summary are the same for every mode.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import yaml
from torch import nn

from cocodc import checkpoint, kernels
from cocodc.comm import CommEngine, CommError
from cocodc.config import Config, ConfigError, tokenizer_file
from cocodc.data import BPETokenizer, ByteTokenizer, RankData, Tokenizer, tokenizer_training_texts
from cocodc.memory import storage_bytes, tensors_in
from cocodc.metrics import Metrics, truncate_after
from cocodc.model import lm_loss
from cocodc.parallel import like_params, local_tree, no_gradient_sync
from cocodc.run_dir import RUN_README, check_run_dir, checkpoint_regions, checkpoint_root
from cocodc.throughput import Throughput
from cocodc.topology import Topology


class Interrupted(RuntimeError):
    """The process was told to stop (SIGTERM from a scheduler or the launcher, SIGINT)."""


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class Mode(Protocol):
    """What a mode hands the inner-step loop."""

    method: str
    train_model: nn.Module  # what the inner step runs forward and backward through
    wan: CommEngine  # the slow link's engine: its bytes and waits go into the summary
    parts: dict[str, Stateful]  # the mode's state, saved in this order after the model and optimizer
    keeps_region_copies: bool  # regions hold their own parameters (eval.per_region is meaningful)

    def step(self, trainer: Trainer) -> tuple[float, float]:
        """One step of the loop (an inner step, or a federated round): its loss and compute time."""
        ...

    def after_step(self) -> list[dict[str, Any]]: ...

    def finish(self) -> list[dict[str, Any]]: ...

    def global_view(self) -> contextlib.AbstractContextManager[None]: ...

    def join(self, trainer: Trainer) -> None:
        """Before the first step: a mode whose members can fail and come back (regions with ft)
        joins the others here, and may move `trainer` to their step."""
        ...

    def rescue_state(self) -> dict[str, Any]:
        """What of the mode's state can be saved without the network (a peer is lost)."""
        ...

    def state_bytes(self) -> dict[str, int]:
        """This rank's bytes of the mode's own state ("outer") and the most that transfers running
        across inner steps held at once ("in_flight_peak")."""
        ...

    def describe(self) -> str:
        """The run's shape for the first console line, e.g. "2 regions x 1 ranks | 300 steps of ..."."""
        ...

    def tokens_per_step(self) -> int: ...

    def summary(self) -> dict[str, Any]:
        """The mode's own keys of summary.json (computed on every rank: may use the network)."""
        ...


# ------------------------------------------------------------------ the run directory


def open_run(
    config: Config, topology: Topology, setup: CommEngine, *, resume: bool, overwrite: bool, stop_at: int | None
) -> int:
    """Check, create or reopen the run directory; returns the step to start from (a resume's
    checkpoint, checked). With ft, every region's job shares the directory and starts or restarts
    on its own: the launcher checked and cleared it once for all."""
    run_dir, ckpt_root = config.run_dir, checkpoint_root(config, topology.region)
    if not config.ft.enabled:
        check_run_dir(config, resume, overwrite)
    setup.barrier()  # every rank has checked before the leader changes anything
    if topology.is_leader:
        if overwrite and not config.ft.enabled:
            shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = run_dir / f"config.yaml.{os.getpid()}.tmp"
        saved.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        saved.replace(run_dir / "config.yaml")
        (run_dir / "README.txt").write_text(RUN_README)
    start_step = 0
    if resume:
        start_step = checkpoint.latest_step(ckpt_root)
        checkpoint.check_compatible(ckpt_root, start_step, config, checkpoint_regions(config, topology.region))
        if topology.is_region_leader:
            truncate_after(Metrics.path(run_dir, topology.region), start_step)
    if stop_at is not None and stop_at <= start_step:
        raise ConfigError(f"--stop-at {stop_at} must come after the step training starts from ({start_step})")
    setup.barrier()
    return start_step


def build_tokenizer(config: Config, topology: Topology, setup: CommEngine) -> Tokenizer:
    """The run's tokenizer: bytes, or the one in the run directory's tokenizer.json, which the
    leader trains (bpe) or copies (hf:PATH) there at the run's start."""
    if config.data.tokenizer == "bytes":
        return ByteTokenizer()
    path = config.run_dir / "tokenizer.json"
    if config.data.tokenizer.startswith("hf:"):  # read by every rank: a bad file stops them all alike
        tokenizer = BPETokenizer.load(tokenizer_file(config.data.tokenizer))
        if topology.is_leader:
            tokenizer.save(path)
        return tokenizer
    if topology.is_leader and not path.exists():
        BPETokenizer.train(tokenizer_training_texts(config.data), config.data.vocab_size).save(path)
    setup.barrier()
    return BPETokenizer.load(path)


# ------------------------------------------------------------------ optimisation


def lr_at(step: int, config: Config, steps: int | None = None) -> float:
    """Linear warmup to train.lr, then cosine decay to train.lr * train.min_lr_ratio at `steps`
    (train.steps unless given)."""
    t = config.train
    steps = t.steps if steps is None else steps
    if step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def inner_optimizer(model: nn.Module, config: Config) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    t = config.train
    cuda = bool(trainable) and trainable[0].device.type == "cuda"
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        # One fused kernel for every parameter on CUDA; on the CPU (no fused kernel) one op per
        # tensor list rather than per tensor.
        **({"fused": True} if cuda else {"foreach": True}),
    )


def uses_bf16(config: Config, device: torch.device) -> bool:
    return config.train.precision == "bf16" or (config.train.precision == "auto" and device.type == "cuda")


def autocast_for(config: Config, device: torch.device) -> contextlib.AbstractContextManager[None]:
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(config, device) else contextlib.nullcontext()


def forward_backward(
    model: nn.Module,
    batch: torch.Tensor,
    config: Config,
    device: torch.device,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The gradients of an inner step's `batch` (train.grad_accum micro-batches, the region's
    reduction after the last only), with `penalty()` added to the loss; returns the mean loss."""
    accum, losses = config.train.grad_accum, []
    for index, micro in enumerate(batch.chunk(accum)):
        last = index == accum - 1
        with contextlib.nullcontext() if last else no_gradient_sync(model):
            with autocast_for(config, device):
                loss = lm_loss(model, micro)
            scaled = loss / accum
            (scaled + penalty() if penalty is not None and last else scaled).backward()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


def evaluate(
    model: nn.Module,
    batches: list[torch.Tensor],
    share: int,
    shares: int,
    engine: CommEngine,
    device: torch.device,
    autocast: contextlib.AbstractContextManager[None],
    lockstep: bool = False,
) -> float:
    """Mean eval loss; the batches are dealt over `shares` ranks and summed through `engine`.
    `lockstep`: every rank runs as many forwards (a sharded model gathers its parameters in each),
    those past a rank's share on its first batch, not counted."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    mine = batches[share::shares]
    rounds = -(-len(batches) // shares) if lockstep else len(mine)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast:
        for index in range(rounds):
            batch = (mine[index] if index < len(mine) else batches[0]).to(device)
            count = batch[:, 1:].numel() if index < len(mine) else 0
            totals += torch.tensor([lm_loss(model, batch).item() * count, count], device=device, dtype=torch.float64)
    model.train(was_training)
    totals = engine.all_reduce_mean(totals).wait()
    return (totals[0] / totals[1]).item()


# ------------------------------------------------------------------ state that survives a resume


@dataclass
class Totals:
    """Running sums that survive a resume."""

    compute_s: float = 0.0
    wall_s: float = 0.0
    eval_s: float = 0.0
    checkpoint_s: float = 0.0
    initial_eval_loss: float = float("nan")

    def state_dict(self) -> dict[str, float]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, float]) -> None:
        vars(self).update(state)


class RngState:
    """torch's CPU generator (the model draws no random numbers on the device while training)."""

    def state_dict(self) -> torch.Tensor:
        return torch.get_rng_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        torch.set_rng_state(state)


class EngineCounters:
    """An engine's bytes and time blocked. Saved after the mode's parts: saving those may wait for
    transfers in flight, and that wait belongs in the totals."""

    def __init__(self, engine: CommEngine, ranks_per_region: int = 1):
        self.engine, self.engine_ranks = engine, ranks_per_region

    def state_dict(self) -> dict[str, float]:
        e = self.engine
        return {"bytes_sent": e.bytes_sent, "bytes_received": e.bytes_received, "blocked_s": e.blocked_s}

    def load_state_dict(self, state: dict[str, float]) -> None:
        e = self.engine
        e.bytes_sent, e.bytes_received, e.blocked_s = state["bytes_sent"], state["bytes_received"], state["blocked_s"]

    def load_resharded(self, states: list[dict[str, float]]) -> None:
        """The region's counts from its saved ranks', shared out over this run's ranks."""
        ranks = self.engine_ranks
        self.engine.bytes_sent = sum(s["bytes_sent"] for s in states) / ranks
        self.engine.bytes_received = sum(s["bytes_received"] for s in states) / ranks
        self.engine.blocked_s = sum(s["blocked_s"] for s in states) / len(states)


def state_parts(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    mode: Mode,
    loader: Stateful,
    totals: Totals,
    ranks_per_region: int = 1,
) -> dict[str, Stateful]:
    """Every part a checkpoint holds, in the order they are saved: the region's (model, optimizer,
    the mode's), then each rank's own (OWN_PARTS)."""
    return {
        "model": checkpoint.ModelState(model),
        "optimizer": checkpoint.OptimizerState(model, optimizer),
        **mode.parts,
        "wan": EngineCounters(mode.wan, ranks_per_region),
        "data": loader,
        "rng": RngState(),
        "totals": totals,
    }


OWN_PARTS = ("wan", "data", "rng", "totals")


class Checkpointer:
    """Saves and restores the named stateful parts: the region's in one sharded checkpoint, each
    rank's own in a small file (checkpoint.py). A resume with another number of ranks per region,
    or the other parallelism, reshards the region's parts; each rank's own parts then continue from
    the saved ranks' (`load_resharded` where a part has it, else the region's first rank's).

    With checkpoint.async_save, a save returns once the region's state is copied to host memory; a
    background thread writes it and commits the step, and the next save (or `wait`) waits for it."""

    def __init__(self, config: Config, topology: Topology, world: CommEngine, parts: dict[str, Stateful]):
        self.config, self.topology, self.world, self.parts = config, topology, world, parts
        self.root = checkpoint_root(config, topology.region)
        self.region_parts = {name: part for name, part in parts.items() if name not in OWN_PARTS}
        self.own_parts = {name: part for name, part in parts.items() if name in OWN_PARTS}
        self.params = dict(parts["model"].model.named_parameters())
        self._writing: threading.Thread | None = None  # an async save not yet committed
        self._failure: str | None = None  # why it failed

    def _region_state(self, saved: dict[str, Any] | None = None) -> dict[str, Any]:
        """The region's parts as DCP saves them (per-parameter tensors laid out like the parameters,
        packed); with the `saved` keys of a checkpoint, the form to load it into."""
        state = {}
        for name, part in self.region_parts.items():
            prefix = f"{name}.tensors."
            if saved is not None and hasattr(part, "checkpoint_template"):
                tree = part.checkpoint_template({k.removeprefix(prefix) for k in saved if k.startswith(prefix)})
            else:
                tree = part.state_dict()
            laid_out = tree if getattr(part, "distributed", False) else like_params(tree, self.params)
            state[name] = checkpoint.pack(laid_out)
            if saved is not None:  # tensors the part creates as it trains (AdamW's state, a server's moments)
                for key, meta in saved.items():
                    path = key.removeprefix(prefix)
                    if key.startswith(prefix) and path not in state[name]["tensors"]:
                        state[name]["tensors"][path] = torch.empty(meta.size, dtype=meta.properties.dtype)
        return state

    def save(self, step: int) -> None:
        self.wait()
        t = self.topology
        region_state = self._region_state()
        own = {name: part.state_dict() for name, part in self.own_parts.items()}
        checkpoint.save_rank(self.root, step, t.rank, {"step": step, **own})
        if t.save_groups is not None:
            region_group, job_group = t.save_groups
            future = checkpoint.save_region_async(self.root, step, t.region, region_state, region_group)
            self._writing = threading.Thread(
                target=self._commit_when_written,
                args=(step, future, region_group, job_group),
                name="checkpoint",
                daemon=True,
            )
            self._writing.start()
            return
        try:
            checkpoint.save_region(self.root, step, t.region, region_state, t.intra_group)
        except checkpoint.CheckpointError as err:  # a peer of the region lost mid-save: rescue what this rank has
            if isinstance(err.__cause__, Interrupted):  # stopped mid-save: said as a stop, not a lost peer
                raise err.__cause__ from None
            raise CommError(str(err)) from None
        self.world.barrier()
        if t.is_leader:
            checkpoint.commit(self.root, step, self.config, self.config.checkpoint.keep)

    def _commit_when_written(
        self, step: int, future: Future, region_group: dist.ProcessGroup, job_group: dist.ProcessGroup
    ) -> None:
        try:
            future.result()
            dist.barrier(group=job_group)
            if self.topology.is_leader:
                checkpoint.commit(self.root, step, self.config, self.config.checkpoint.keep)
        except BaseException as err:  # DCP's CheckpointException is no Exception
            cause = checkpoint.cause_of(err, region_group)
            self._failure = f"saving {checkpoint.step_dir(self.root, step)} failed ({first_line(cause)})"

    def wait(self) -> None:
        """The async save in progress, written and committed (a CommError if it failed: a peer lost)."""
        if self._writing is None:
            return
        self._writing.join()
        self._writing = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise CommError(failure)

    def restore(self, step: int) -> None:
        t = self.topology
        state = self._region_state(checkpoint.saved_keys(self.root, step, t.region))
        checkpoint.load_region(self.root, step, t.region, state, t.intra_group)
        for name, part in self.region_parts.items():
            tree = checkpoint.unpack(state[name])
            part.load_state_dict(tree if getattr(part, "distributed", False) else local_tree(tree))
        _, saved_per_region = checkpoint.saved_shape(self.root, step)
        if saved_per_region == t.ranks_per_region:
            own = checkpoint.load_rank(self.root, step, t.rank)
            for name, part in self.own_parts.items():
                part.load_state_dict(own[name])
            return
        first = t.region * saved_per_region
        saved = [checkpoint.load_rank(self.root, step, first + k) for k in range(saved_per_region)]
        for name, part in self.own_parts.items():
            states = [s[name] for s in saved]
            if hasattr(part, "load_resharded"):
                part.load_resharded(states)
            else:
                part.load_state_dict(states[0])

    def rescue(self, step: int, names: list[str], extra: dict[str, Any]) -> Path:
        """This rank's `names` parts as they are and `extra` (its local shards where the region
        shards), outside the resumable checkpoints (a peer is lost, so no complete checkpoint can
        be written)."""
        path = self.root / "rescue" / f"rank{self.topology.rank}-step{step}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"step": step, **{n: self.parts[n].state_dict() for n in names}, **extra}
        checkpoint.atomic_save(path, local_tree(state))
        return path


# ------------------------------------------------------------------ the loop


class Trainer:
    """The inner-step loop: lr schedule, batches, forward/backward/step, the mode's hook, eval,
    metrics and checkpoints."""

    def __init__(
        self,
        config: Config,
        topology: Topology,
        world: CommEngine,
        intra: CommEngine,
        data: RankData,
        model: nn.Module,
        start_step: int,
    ):
        self.config, self.topology, self.world, self.intra = config, topology, world, intra
        self.data, self.model, self.start_step = data, model, start_step
        self.device = topology.device
        self.optimizer = inner_optimizer(model, config)
        self.totals = Totals()
        self.metrics = Metrics(config, topology, start_step)
        self.step = start_step
        self.grad_bytes: int | None = None  # measured at the first backward of this process
        self.throughput = Throughput(
            model, config.train.seq_len, self.device, uses_bf16(config, self.device), topology.world_size
        )

    def inner_step(
        self,
        train_model: nn.Module,
        wan: CommEngine,
        *,
        batch: torch.Tensor | None = None,
        lr: float | None = None,
        penalty: Callable[[], torch.Tensor] | None = None,
    ) -> tuple[float, float]:
        """One AdamW step on `batch` (the loader's next unless given) at `lr` (the schedule's at
        this step unless given), with `penalty()` added to the loss; returns the loss (without the
        penalty) and the compute time: the step's wall-clock less what it spent waiting for the
        link, as DDP's all-reduce does."""
        lr = lr_at(self.step, self.config) if lr is None else lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.data.loader.next_batch() if batch is None else batch
        batch = batch.to(self.device, non_blocking=True)
        began, blocked = time.perf_counter(), wan.blocked_s
        try:
            loss = forward_backward(train_model, batch, self.config, self.device, penalty)
            if self.grad_bytes is None:
                self.grad_bytes = storage_bytes(p.grad for p in self.optimizer_parameters())
            if self.config.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.optimizer_parameters(), self.config.train.grad_clip)
            self.optimizer.step()
        finally:  # a failed step (a federated client's, which the round survives) leaves no gradients
            self.optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        return loss_value, time.perf_counter() - began - (wan.blocked_s - blocked)

    def optimizer_parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def evaluate(self, mode: Mode) -> float:
        """Eval loss of the global parameters (and of each region's own, with eval.per_region)."""
        began, t, world = time.perf_counter(), self.topology, self.world
        batches, autocast = self.data.eval_batches, autocast_for(self.config, self.device)
        lockstep = self.config.topology.parallel == "fsdp"
        with mode.global_view():  # dealt over the job's ranks: with ft, every region evaluates all
            loss = evaluate(self.model, batches, world.rank, world.size, world, self.device, autocast, lockstep)
        self.metrics.eval(self.step, loss, "global", self.totals.wall_s)
        if self.config.eval.per_region and mode.keeps_region_copies:
            own = evaluate(
                self.model, batches, t.local_index, t.ranks_per_region, self.intra, self.device, autocast, lockstep
            )
            self.metrics.eval(self.step, own, "region", self.totals.wall_s)
        self.totals.eval_s += time.perf_counter() - began
        return loss

    def run(self, mode: Mode, stop_at: int | None) -> dict[str, Any] | None:
        """Train to train.steps (or stop after `stop_at`); returns the summary, or None if stopped
        early. A lost peer raises CommError after this rank's state is rescued."""
        parts = state_parts(
            self.model, self.optimizer, mode, self.data.loader, self.totals, self.topology.ranks_per_region
        )
        checkpointer = Checkpointer(self.config, self.topology, self.world, parts)
        try:  # the metrics (and wandb's run) are closed whatever happens from here
            if self.start_step:
                checkpointer.restore(self.start_step)
            mode.join(self)
            self._announce(mode)
            return self._loop(mode, checkpointer, stop_at)
        except (CommError, Interrupted) as err:
            raise self._rescue(checkpointer, mode, err) from None
        except RuntimeError as err:  # the backend's own word, from a collective no engine ran (or wrapped)
            if not backend_failure(err):
                raise
            lost = CommError(f"a collective outside the comm engine failed: {first_line(err)}")
            raise self._rescue(checkpointer, mode, lost) from None
        finally:
            self.metrics.close()

    def _rescue(self, checkpointer: Checkpointer, mode: Mode, err: Exception) -> Exception:
        """Save what this rank has and say where; the error to raise in place of `err`. The process
        is on its way out: a stop signal (torchrun stops the other workers when one exits) must not
        cut the rescue or the shutdown short, so they are ignored from here on."""
        for stop in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop, signal.SIG_IGN)
        rescued = checkpointer.rescue(self.step, ["model", "optimizer", "data"], mode.rescue_state())
        try:
            step = checkpoint.latest_step(checkpointer.root)
            last = f"the last complete checkpoint is step {step} (--resume continues it)"
        except checkpoint.CheckpointError:
            last = "there is no complete checkpoint"
        return type(err)(f"{err} at step {self.step}; this rank's state is in {rescued}; {last}")

    def _loop(self, mode: Mode, checkpointer: Checkpointer, stop_at: int | None) -> dict[str, Any] | None:
        config, totals = self.config, self.totals
        segment_start, segment_wall = time.perf_counter(), totals.wall_s
        if self.start_step == 0:
            totals.initial_eval_loss = self.evaluate(mode)
        tokens_per_step, steps = mode.tokens_per_step(), config.steps
        last_step = min(steps, stop_at) if stop_at is not None else steps

        def save() -> None:
            began = time.perf_counter()
            checkpointer.save(self.step)
            totals.checkpoint_s += time.perf_counter() - began

        for step in range(self.start_step + 1, last_step + 1):
            self.step = step
            loss, compute_s = mode.step(self)
            totals.compute_s += compute_s
            if step == self.start_step + 1:
                sizes = self.state_bytes(mode)
                shown = " | ".join(f"{key} {value / 2**20:.2f} MiB" for key, value in sizes.items())
                self.metrics.print(f"state per rank: {shown} (in_flight: the peak so far)")
            self.metrics.records(mode.after_step())
            totals.wall_s = segment_wall + time.perf_counter() - segment_start
            tokens_per_s = tokens_per_step * (step - self.start_step) / (totals.wall_s - segment_wall)
            lr = self.optimizer.param_groups[0]["lr"]
            speed = self.throughput.at(tokens_per_s)
            self.metrics.train(step, loss, lr, compute_s, tokens_per_s, speed, log=step % config.train.log_every == 0)
            if config.eval.every and step % config.eval.every == 0 and step != steps:
                self.evaluate(mode)
            if config.checkpoint.every and step % config.checkpoint.every == 0 and step != last_step:
                save()

        if self.step < steps:  # stopped early on purpose
            save()
            checkpointer.wait()
            self.metrics.print(f"stopped after step {self.step}; continue with --resume")
            return None
        self.metrics.records(mode.finish())
        final_loss = self.evaluate(mode)
        if self.step > self.start_step:
            save()
            checkpointer.wait()
        totals.wall_s = segment_wall + time.perf_counter() - segment_start
        summary = self._summary(mode, final_loss, tokens_per_step)
        self.metrics.summary(summary)
        return summary

    def _announce(self, mode: Mode) -> None:
        params = sum(p.numel() for p in self.model.parameters())
        self.metrics.print(
            f"cocodc: {mode.method} | {mode.describe()} | {params / 1e6:.2f}M params | "
            f"{self.device.type} (outer-sync kernels: {kernels.serving(self.device)}) | {self.config.run_dir}"
            + (f" | resumed at step {self.start_step}" if self.start_step else "")
        )

    def _summary(self, mode: Mode, final_loss: float, tokens_per_step: int) -> dict[str, Any]:
        totals, t, wan = self.totals, self.topology, mode.wan
        busy = totals.wall_s - totals.eval_s - totals.checkpoint_s
        # Means over ranks; WAN bytes are per region (every local rank of a region carries its share).
        per_rank = torch.tensor(
            [wan.bytes_sent, wan.bytes_received, wan.blocked_s, totals.compute_s / busy],
            dtype=torch.float64,
            device=self.device,
        )
        sent, received, blocked, compute_fraction = self.world.all_reduce_mean(per_rank).wait().tolist()
        steps = self.config.steps
        speed = self.throughput.at(tokens_per_step * steps / totals.wall_s)
        peaks = self.world.all_gather(torch.tensor([speed["peak_memory_bytes"]], dtype=torch.float64)).wait()
        speed["peak_memory_bytes"] = int(peaks.max().item())  # the rank that held the most
        return {
            "method": mode.method,
            "kernels": kernels.serving(self.device),
            "steps": steps,
            "initial_eval_loss": totals.initial_eval_loss,
            "initial_eval_ppl": math.exp(totals.initial_eval_loss),
            "final_eval_loss": final_loss,
            "final_eval_ppl": math.exp(final_loss),
            "tokens": tokens_per_step * steps,
            "wall_s": totals.wall_s,
            "tokens_per_s": tokens_per_step * steps / totals.wall_s,
            **speed,
            "compute_fraction": compute_fraction,
            "blocked_s": blocked,
            "eval_s": totals.eval_s,
            "checkpoint_s": totals.checkpoint_s,
            "bytes_sent": round(sent * t.ranks_per_region),
            "bytes_received": round(received * t.ranks_per_region),
            "state_bytes_per_rank": self.state_bytes(mode),
            **mode.summary(),
        }

    def state_bytes(self, mode: Mode) -> dict[str, int]:
        """This rank's training state in bytes: parameters, gradients (at their first backward),
        inner optimizer, the mode's own state (the outer sync's buffers, `outer_host` those it keeps
        in host memory) and the most that fragments in flight held at once."""
        return {
            "model": storage_bytes(self.model.parameters()),
            "grads": self.grad_bytes or 0,
            "optimizer": storage_bytes(tensors_in(self.optimizer.state_dict()["state"])),
            "outer": 0,
            "outer_host": 0,
            "in_flight_peak": 0,
            **mode.state_bytes(),
        }


def backend_failure(err: RuntimeError) -> bool:
    """Whether `err` is the backend's word that a peer is gone (gloo and NCCL raise RuntimeError),
    or an engine's CommError that a DDP hook's future wrapped in a RuntimeError."""
    return isinstance(err, dist.DistError) or any(
        mark in str(err) for mark in ("CommError: ", "gloo", "NCCL", "Connection closed by peer", "Connection reset")
    )


def first_line(err: BaseException) -> str:
    """The message's first line, from the engine's own words where a wrapper holds them."""
    text = str(err).split("CommError: ", 1)[-1]
    return next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)


def threads_per_rank(config: Config) -> int:
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return config.train.threads or max(1, (os.cpu_count() or 1) // local_ranks)
