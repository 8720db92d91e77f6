"""Async collectives over one ProcessGroup, with byte and time accounting.

Bytes are those a rank puts on (and takes off) the wire under a ring all-reduce of n ranks:
2 (n - 1) / n of the payload each way. That is what a bandwidth-optimal all-reduce must move,
whatever algorithm the backend picks, so totals are comparable across backends.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class Handle:
    """An operation in flight: `wait()` returns its result; accounting fills in as it goes."""

    def __init__(self, engine: CommEngine, work: dist.Work | None, result: torch.Tensor, wire_bytes: int):
        self._engine, self._work, self._result = engine, work, result
        self.bytes_sent = self.bytes_received = wire_bytes
        self.blocked_s = 0.0
        self.started_at = time.perf_counter()
        self.finished_at: float | None = None if work is not None else self.started_at

    def is_done(self) -> bool:
        return self.finished_at is not None or self._work.is_completed()

    def wait(self) -> torch.Tensor:
        if self.finished_at is None:
            begin = time.perf_counter()
            self._work.wait()
            self.finished_at = time.perf_counter()
            self.blocked_s = self.finished_at - begin
            self._engine.blocked_s += self.blocked_s
            self._result.div_(self._engine.size)
        return self._result

    def future(self) -> torch.futures.Future:
        """A future of the result, for DDP comm hooks."""
        size = self._engine.size
        if self._work is None:
            done = torch.futures.Future()
            done.set_result(self._result)
            return done

        def mean(fut: torch.futures.Future) -> torch.Tensor:
            self.finished_at = time.perf_counter()
            return fut.value()[0].div_(size)

        return self._work.get_future().then(mean)


class CommEngine:
    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self.bytes_sent = 0
        self.bytes_received = 0
        self.blocked_s = 0.0

    def ring_bytes(self, nbytes: int) -> int:
        return 2 * (self.size - 1) * nbytes // self.size

    def all_reduce_mean(self, tensor: torch.Tensor) -> Handle:
        """Start an in-place mean of `tensor` over the group; the handle's `wait()` returns it."""
        if self.size == 1:
            return Handle(self, None, tensor, 0)
        wire = self.ring_bytes(tensor.numel() * tensor.element_size())
        self.bytes_sent += wire
        self.bytes_received += wire
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return Handle(self, work, tensor, wire)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)
