"""Async collectives and point-to-point over one ProcessGroup, with byte and time accounting.

Every operation returns a `Handle` at once. Bytes are those a rank puts on (and takes off) the
wire under bandwidth-optimal algorithms, whatever the backend really runs: a ring all-reduce
moves 2 (n - 1) / n of the payload each way, a ring all-gather n - 1 payloads, a broadcast one
payload over each link from the source. So totals compare across backends. With a `LinkModel`, a
handle completes no earlier than the modelled arrival of its last byte, in wall-clock; transfers
queue on the links they share.

Nothing hangs silently: `Handle.wait(timeout)` raises a `CommError` naming the operation, the group
and the peer(s) when the backend has not finished in time, and turns a backend failure (a peer's
process died) into one as well. Its default deadline follows the transfer: the engine's
`timeout_s` plus twice the time the operation's bytes are expected to take on the link (from its
configured bandwidth and latency, else the rate measured on earlier transfers), so a big transfer
on a slow link does not trip it and a silent peer is still caught.

Point-to-point matches messages by tag, and the reduce-scatter mean exchanges its reduced chunks
point-to-point: both need a backend that matches by tag (gloo, the WAN backend). NCCL ignores tags.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from cocodc import kernels
from cocodc.comm.codec import CODECS, Codec, get_codec
from cocodc.comm.wan import LinkModel

Algorithm = Literal["auto", "gather", "reduce_scatter"]

# What a point-to-point message can carry; a header precedes its body: dtype code, codec code
# (-1: none), ndim, the sender's wall-clock time in microseconds, the shape.
_DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.uint8,
    torch.int8,
    torch.int32,
    torch.int64,
]
_MAX_DIMS = 8
_HEADER = 4 + _MAX_DIMS
# Every user tag becomes three wire tags (header, body, and one left to the reduce-scatter's
# gather stage), which must fit gloo's 32-bit tag.
_MAX_TAG = 2**26
_POLL_S = 0.001
_RATE_BYTES = 1 << 20  # transfers smaller than this measure latency more than the link's rate


class CommError(RuntimeError):
    """An operation that failed or did not complete in time; the one-line message names the
    operation, the group and the peer(s)."""


class _Collective:
    """A collective's work: it reports completion through `is_completed()` and a future."""

    def __init__(self, work: dist.Work):
        self.work = work

    def done(self) -> bool:
        return self.work.is_completed()

    def wait(self, deadline: float | None) -> bool:
        """Whether the work completed by `deadline` (None: no limit); raises its error."""
        if deadline is not None:
            # A backend's own wait(timeout) may ignore the limit or, for gloo, break the connection.
            while not self.work.is_completed():
                if time.perf_counter() >= deadline:
                    return False
                time.sleep(_POLL_S)
        self.work.wait()
        return True

    def future(self) -> torch.futures.Future:
        return self.work.get_future()


class _Thread:
    """Work done on a thread of its own: gloo's point-to-point works report completion only from
    inside their `wait()`, and a receive posts its body once the header is in."""

    def __init__(self, run: Callable[[Handle], object]):
        self._run = run
        self._done = threading.Event()
        self._future: torch.futures.Future = torch.futures.Future()
        self.value: object = None
        self.error: Exception | None = None

    def start(self, handle: Handle) -> None:
        self._thread = threading.Thread(target=self._main, args=(handle,), daemon=True)
        self._thread.start()

    def _main(self, handle: Handle) -> None:
        try:
            self.value = self._run(handle)
        except Exception as err:
            self.error = err
        self._done.set()
        if self.error is not None:
            self._future.set_exception(self.error)
        else:
            self._future.set_result(None)

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, deadline: float | None) -> bool:
        if not self._done.wait(None if deadline is None else max(0.0, deadline - time.perf_counter())):
            return False
        # The thread still resolves the future (in C++) after `done`: one that a process's exit
        # catches there aborts it ("terminate called without an active exception", seen in CI).
        # The future's callbacks run on the thread and may wait too; it cannot join itself.
        if threading.current_thread() is not self._thread:
            self._thread.join()
        if self.error is not None:
            raise self.error
        return True

    def future(self) -> torch.futures.Future:
        return self._future


class Handle:
    """An operation in flight: `wait()` returns its result; accounting fills in as it goes."""

    def __init__(
        self,
        engine: CommEngine,
        what: str,
        pending: _Collective | _Thread | None,
        finish: Callable[[Handle], object],
        *,
        started_at: float,
        ready_at: float,
        sent: int = 0,
        received: int = 0,
        weights: list[float] | torch.Tensor | None = None,
    ):
        self._engine, self.what, self._pending, self._finish = engine, what, pending, finish
        self._lock = threading.Lock()
        self._result: object = None
        self.bytes_sent, self.bytes_received = sent, received
        self.started_at = started_at
        self.ready_at = ready_at  # when the link model says the last byte arrives
        self.modelled_s = ready_at - started_at  # the link model's time, queueing included (0 without one)
        self.finished_at: float | None = None
        self.blocked_s = 0.0  # time spent inside wait(), or the future's sleep for the link model
        self.weights = weights

    @property
    def weights(self) -> list[float] | None:
        """Reductions: every member's weight, in group-rank order (read from the device on first use,
        so that a DDP hook's reduction does not wait for the device inside backward)."""
        if isinstance(self._weights, torch.Tensor):
            self._weights = self._weights.tolist()
        return self._weights

    @weights.setter
    def weights(self, weights: list[float] | torch.Tensor | None) -> None:
        self._weights = weights

    @classmethod
    def completed(cls, engine: CommEngine, result: object, *, weights: list[float] | None = None) -> Handle:
        now = time.perf_counter()
        handle = cls(engine, "done", None, lambda _: result, started_at=now, ready_at=now, weights=weights)
        handle._result, handle.finished_at = result, now
        return handle

    @property
    def elapsed_s(self) -> float:
        """From the start to the result being available (after `wait()`)."""
        return self.finished_at - self.started_at if self.finished_at is not None else float("nan")

    def is_done(self) -> bool:
        if self.finished_at is not None:
            return True
        return self._pending.done() and time.perf_counter() >= self.ready_at

    def wait(self, timeout: float | None = None) -> object:
        """The result, once the backend is done and the link model's time has passed.

        Raises `CommError` when the backend has not finished within `timeout` seconds (None: the
        engine's `timeout_s`; if that is None too, as long as the backend takes) or failed. The
        sleep until the modelled arrival comes after and is not part of the timeout.
        """
        if self.finished_at is None:
            begin = time.perf_counter()
            limit, allowance = self._engine.timeout_s if timeout is None else timeout, 0.0
            if timeout is None and limit is not None:
                allowance = self._engine.allowance_s(max(self.bytes_sent, self.bytes_received))
                limit += allowance
            try:
                done = self._pending.wait(None if limit is None else begin + limit)
            except CommError:
                raise
            except RuntimeError as err:
                raise self._engine._failure(self.what, err) from err
            if not done:
                why = f" (the timeout and {allowance:.3g} s for its bytes on the link)" if allowance else ""
                raise CommError(f"{self.what} did not complete within {limit:.3g} s{why}")
            self._complete(begin)
        return self._result

    def _complete(self, begin: float) -> object:
        with self._lock:
            if self.finished_at is None:
                self._result = self._finish(self)
                remaining = self.ready_at - time.perf_counter()
                if remaining > 0:
                    time.sleep(remaining)
                self.finished_at = time.perf_counter()
                self.blocked_s = self.finished_at - begin
                self._engine._observe_rate(
                    max(self.bytes_sent, self.bytes_received), self.finished_at - self.started_at
                )
                self._engine._count_blocked(begin, self.finished_at)
        return self._result

    def future(self) -> torch.futures.Future:
        """A future of `wait()`'s result, for DDP comm hooks. It completes on the backend's
        thread, which also sleeps out the link model's time: that sleep counts as blocked."""
        if self.finished_at is not None:
            done: torch.futures.Future = torch.futures.Future()
            done.set_result(self._result)
            return done

        def complete(backend: torch.futures.Future) -> object:
            try:
                backend.wait()
            except RuntimeError as err:
                raise self._engine._failure(self.what, err) from err
            return self._complete(time.perf_counter())

        return self._pending.future().then(complete)


# torch 2.13 renamed all_gather_into_tensor (and deprecated the old name); earlier releases have only that.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class _Reduction:
    """One member's part of a weighted reduction."""

    codec: Codec
    values: torch.Tensor | None  # flat, in `dtype`, on the wire's device; None at weight 0
    minus: torch.Tensor | None  # subtracted from the body as it is encoded (the gather path)
    dtype: torch.dtype  # every member's: fp32, or float64 for an unquantized float64 tensor
    body: int  # values encoded by the codec; the `tail` after them travel in fp32
    tail: int
    weight: float
    mean: bool
    like: torch.Tensor  # the caller's tensor: the result takes its shape, dtype and device

    def shaped(self, result: torch.Tensor) -> torch.Tensor:
        return result.view(self.like.shape).to(self.like.device, self.like.dtype)


def _backend_of(group: dist.ProcessGroup | None) -> str:
    """The group's backends: "cpu:gloo", "cuda:nccl", or both (a group made with no backend named,
    as accelerate does); a group torch.distributed did not register (torchft's, rebuilt at every
    quorum) names its one."""
    if group is None:
        return "gloo"
    try:
        return dist.get_backend_config(group)
    except (KeyError, ValueError, TypeError):  # not in the registry, or no default group at all
        return group.name()


class CommEngine:
    """Operations over `group` (None: a group of one), timed by `link`, reported as the `name`
    group of `members` (one label per group rank) in errors."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        link: LinkModel | None = None,
        *,
        name: str = "group",
        members: Sequence[str] | None = None,
        timeout_s: float | None = None,
        expected_link: tuple[float, float] | None = None,
    ):
        """`expected_link`: (latency in s, bandwidth in bytes/s; 0: unknown) of the group's slowest
        link, for deadlines; unknown, the rate measured on earlier transfers is used."""
        self.name = name
        self.timeout_s = timeout_s
        self.link_latency_s, self.link_Bps = expected_link or (0.0, 0.0)
        self.measured_Bps = 0.0  # a running mean of the rate of transfers of at least _RATE_BYTES
        self._lock = threading.Lock()  # counters and the link model, also touched by backend threads
        self.rebind(group, link, members=members)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.blocked_s = 0.0
        self._blocked_until = -math.inf

    def rebind(
        self, group: dist.ProcessGroup | None, link: LinkModel | None = None, *, members: Sequence[str] | None = None
    ) -> None:
        """Run over `group` from now on, keeping the counters: torchft rebuilds the inter-region
        group whenever its quorum changes. Nothing may be in flight on the old group."""
        # Asked of the group itself: torchft's reconfigurable groups are not in torch's registry.
        size = group.size() if group is not None else 1
        if link is not None and link.size != size:
            raise ValueError(f"the link model has {link.size} ranks but the group has {size}")
        members = list(members) if members is not None else [f"rank {r}" for r in range(size)]
        if len(members) != size:
            raise ValueError(f"{len(members)} member labels for a group of {size}")
        self.group, self.size, self.link, self.members = group, size, link, members
        self.rank = group.rank() if group is not None else 0
        self.backend = _backend_of(group)
        self.tagged_p2p = "gloo" in self.backend
        # Where tensors travel: gloo moves CPU tensors, NCCL CUDA ones.
        self.device = torch.device("cpu") if self.tagged_p2p else torch.device("cuda", torch.cuda.current_device())
        # Tags count from 0 on every group: a member new to it counts as the others do.
        self._receives: dict[tuple[int, int], threading.Event] = {}
        self._reductions = 0

    @property
    def label(self) -> str:
        group = self.name if self.name.endswith("group") else f"{self.name} group"
        return f"the {group} ({', '.join(self.members)})"

    def _failure(self, what: str, err: BaseException) -> CommError:
        """`err` from the backend as a CommError: its first line, without gloo's source location."""
        lines = str(err).strip().splitlines() or [type(err).__name__]
        brief = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).split(". ")[0]
        return CommError(f"{what} failed: {brief[:160]}")

    def allowance_s(self, nbytes: int) -> float:
        """What a transfer of `nbytes` adds to `timeout_s`: twice its expected time on the link."""
        rate = self.link_Bps or self.measured_Bps
        return 2.0 * (self.link_latency_s + (nbytes / rate if rate > 0 else 0.0))

    def _observe_rate(self, nbytes: int, seconds: float) -> None:
        if nbytes >= _RATE_BYTES and seconds > 0:
            with self._lock:
                rate = nbytes / seconds
                self.measured_Bps = rate if not self.measured_Bps else 0.5 * (self.measured_Bps + rate)

    def _count_blocked(self, begin: float, end: float) -> None:
        """Add a wait to `blocked_s`; waits that overlap (the main thread's and the backend's) count once."""
        with self._lock:
            begin = max(begin, self._blocked_until)
            if end > begin:
                self.blocked_s += end - begin
                self._blocked_until = end

    def _start(
        self,
        what: str,
        pending: _Collective | _Thread,
        finish: Callable[[Handle], object],
        now: float,
        sent: int,
        received: int,
        timing: Callable[[LinkModel, float], float] | None,
    ) -> Handle:
        with self._lock:
            self.bytes_sent += sent
            self.bytes_received += received
            ready = timing(self.link, now) if self.link is not None and timing is not None else now
        handle = Handle(self, what, pending, finish, started_at=now, ready_at=ready, sent=sent, received=received)
        if isinstance(pending, _Thread):
            pending.start(handle)
        return handle

    def all_reduce(
        self,
        tensor: torch.Tensor,
        codec: Codec | str = "fp32",
        *,
        mean: bool = True,
        minus: torch.Tensor | None = None,
        exact_tail: int = 0,
        weight: float = 1.0,
        algorithm: Algorithm = "auto",
    ) -> Handle:
        """sum_m w_m x_m / sum_m w_m over the group's members m (with `mean`; else the sum);
        `wait()` returns it (the shape and dtype of `tensor`, on its device; zeros if every weight
        is 0) and `handle.weights` holds every member's weight, which rode along in fp32.

        A member with weight 0 takes no part: its tensor is never read (it may hold NaN). fp32
        runs one all-reduce of [w x | w at this rank's index] (in float64 for a float64 tensor).
        Other codecs quantize the outgoing values and accumulate in fp32 after decoding, in rank
        order, so every member holds the same result: "gather" all-gathers every member's encoded
        payload (quantized once, bytes (n - 1) x payload); "reduce_scatter" sends member j the
        encoded j-th chunk of every payload (an all-to-all), member j reduces it, re-encodes it and
        sends it to all (quantized twice, bytes about 2 (n - 1) / n x payload); `choose_algorithm`
        says which one auto takes. The last `exact_tail` values travel in fp32 whatever the codec
        (a few numbers riding along with a payload). With `minus` (as many values as the body), the
        body reduced is tensor's minus it; the gather path encodes the difference in the same pass
        (`cocodc.kernels`), never writing it out.
        """
        codec = get_codec(codec) if isinstance(codec, str) else codec
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"a member's weight must be finite and >= 0, not {weight}")
        if not 0 <= exact_tail <= tensor.numel():
            raise ValueError(f"exact_tail={exact_tail} for a tensor of {tensor.numel()} values")
        body = tensor.numel() - exact_tail
        if minus is not None and minus.numel() != body:
            raise ValueError(f"minus has {minus.numel()} values for a body of {body}")
        path = choose_algorithm(codec, tensor.numel(), self.size, exact_tail=exact_tail, requested=algorithm)
        if path == "reduce_scatter" and not self.tagged_p2p:
            if algorithm != "auto":
                raise ValueError(
                    f"the reduce-scatter mean needs point-to-point matched by tag (gloo), not {self.backend}"
                )
            path = "gather"
        # Unquantized, a float64 tensor (a sum of losses, byte counts) keeps its precision.
        dtype = tensor.dtype if path == "all_reduce" and tensor.dtype == torch.float64 else torch.float32
        # A member of weight 0 never reads its tensor.
        values = tensor.detach().reshape(-1).to(self.device, dtype) if weight else None
        if minus is not None:
            minus = minus.detach().reshape(-1).to(self.device, dtype)
            if path != "gather" or self.size == 1:
                # Only the gather path encodes in the same pass; elsewhere the difference is written here.
                if values is not None:
                    difference = values[:body] - minus
                    values = torch.cat([difference, values[body:]]) if exact_tail else difference
                minus = None
        job = _Reduction(codec, values, minus, dtype, body, exact_tail, weight, mean, tensor)
        if self.size == 1:
            total = (
                values * weight if values is not None else torch.zeros(tensor.numel(), dtype=dtype, device=self.device)
            )
            return Handle.completed(self, job.shaped(_scaled(total, [weight], mean)), weights=[weight])
        start = {"all_reduce": self._all_reduce_fp32, "gather": self._gather_mean, "reduce_scatter": self._scatter_mean}
        return start[path](job)

    def all_reduce_mean(self, tensor: torch.Tensor, codec: Codec | str = "fp32", **options: Any) -> Handle:
        """`all_reduce` with `mean=True`."""
        return self.all_reduce(tensor, codec, mean=True, **options)

    def all_reduce_sum(self, tensor: torch.Tensor, codec: Codec | str = "fp32", **options: Any) -> Handle:
        """`all_reduce` with `mean=False`."""
        return self.all_reduce(tensor, codec, mean=False, **options)

    def _all_reduce_fp32(self, job: _Reduction) -> Handle:
        numel, n = job.body + job.tail, self.size
        payload = torch.zeros(numel + n, dtype=job.dtype, device=self.device)
        if job.values is not None:
            torch.mul(job.values, job.weight, out=payload[:numel])
        payload[numel + self.rank] = job.weight
        now = time.perf_counter()
        work = dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

        def finish(handle: Handle) -> torch.Tensor:
            handle.weights = payload[numel:]
            return job.shaped(_scaled(payload[:numel], payload[numel:], job.mean))

        nbytes = payload.numel() * 4
        wire = reduction_bytes("all_reduce", job.codec, numel, job.tail, n, itemsize=payload.element_size())
        what = f"all-reduce on {self.label}"
        return self._start(what, _Collective(work), finish, now, wire, wire, lambda m, t: m.all_reduce(nbytes, t))

    def _gather_mean(self, job: _Reduction) -> Handle:
        width = _row_width(job.codec, job.body, job.tail)
        row = _pack(job.codec, job.values, job.body, job.weight, width, self.device, job.minus)
        rows = torch.empty(self.size, width, dtype=torch.uint8, device=self.device)
        now = time.perf_counter()
        work = _all_gather_single(rows.view(-1), row, group=self.group, async_op=True)

        def finish(handle: Handle) -> torch.Tensor:
            result, handle.weights = _reduce_rows(job.codec, rows, job.body, job.tail, job.mean)
            return job.shaped(result)

        wire = reduction_bytes("gather", job.codec, job.body + job.tail, job.tail, self.size)
        what = f"all-reduce (gather) on {self.label}"
        return self._start(what, _Collective(work), finish, now, wire, wire, lambda m, t: m.all_gather(width, t))

    def _scatter_mean(self, job: _Reduction) -> Handle:
        n, codec = self.size, job.codec
        chunk = -(-job.body // n)
        width = _row_width(codec, chunk, job.tail)
        code_bytes = codec.encoded_bytes(chunk)
        rows = _scatter_rows(codec, job.values, job.body, job.tail, job.weight, n, self.device)
        received = torch.empty_like(rows)
        now = time.perf_counter()
        work = dist.all_to_all_single(received, rows, group=self.group, async_op=True)
        # Every member runs its reductions in the same order, so the count names this one everywhere.
        tag = 3 * (self._reductions % _MAX_TAG) + 2
        self._reductions += 1

        def run(handle: Handle) -> torch.Tensor:
            work.wait()
            mine, handle.weights = _reduce_rows(codec, received, chunk, job.tail, job.mean)
            codes = torch.empty(n, _words(code_bytes), dtype=torch.uint8, device=self.device)
            codes[self.rank, :code_bytes] = kernels.encode(codec, mine[:chunk])
            peers = [p for p in range(n) if p != self.rank]
            works = [dist.isend(codes[self.rank, :code_bytes], group_dst=p, group=self.group, tag=tag) for p in peers]
            works += [dist.irecv(codes[p, :code_bytes], group_src=p, group=self.group, tag=tag) for p in peers]
            for each in works:
                each.wait()
            return job.shaped(_assemble(codec, codes[:, :code_bytes], chunk, job.body, mine[chunk:]))

        def timing(link: LinkModel, now: float) -> float:
            return link.all_to_all(code_bytes, link.all_to_all(width, now))  # both stages go peer to peer

        wire = reduction_bytes("reduce_scatter", codec, job.body + job.tail, job.tail, n)
        pending = _Thread(run)
        what = f"all-reduce (reduce-scatter) on {self.label}"
        return self._start(what, pending, lambda _: pending.value, now, wire, wire, timing)

    def all_gather(self, tensor: torch.Tensor) -> Handle:
        """Every rank's `tensor` (same shape everywhere), stacked in rank order: [size, *shape]."""
        if self.size == 1:
            return Handle.completed(self, tensor.unsqueeze(0).clone())
        wire = tensor.detach().reshape(-1).to(self.device)
        gathered = torch.empty(self.size, wire.numel(), dtype=tensor.dtype, device=self.device)
        now = time.perf_counter()
        work = _all_gather_single(gathered.view(-1), wire, group=self.group, async_op=True)
        nbytes = wire.numel() * wire.element_size()
        moved = (self.size - 1) * nbytes

        def finish(_: Handle) -> torch.Tensor:
            return gathered.view(self.size, *tensor.shape).to(tensor.device)

        what = f"all-gather on {self.label}"
        return self._start(what, _Collective(work), finish, now, moved, moved, lambda m, t: m.all_gather(nbytes, t))

    def broadcast(self, tensor: torch.Tensor, src: int) -> Handle:
        """`tensor` from group rank `src` to every rank, in place."""
        if self.size == 1:
            return Handle.completed(self, tensor)
        wire = tensor.to(self.device)
        now = time.perf_counter()
        work = dist.broadcast(wire, group_src=src, group=self.group, async_op=True)
        nbytes = tensor.numel() * tensor.element_size()
        sent, received = ((self.size - 1) * nbytes, 0) if self.rank == src else (0, nbytes)

        def finish(_: Handle) -> torch.Tensor:
            return tensor if wire is tensor else tensor.copy_(wire)

        what = f"broadcast from {self.members[src]} on {self.label}"
        return self._start(
            what, _Collective(work), finish, now, sent, received, lambda m, t: m.broadcast(nbytes, src, t)
        )

    def send(self, tensor: torch.Tensor, dst: int, *, tag: int = 0, codec: Codec | str | None = None) -> Handle:
        """Send `tensor` (any shape, a dtype of `_DTYPES`) to group rank `dst`, where
        `recv(src, tag=tag)` receives it. With a codec, a floating tensor travels encoded and
        arrives as fp32. Bytes: a header of 96 and the body (its encoded size with a codec). The
        handle completes once the peer has it and, with a link model, no earlier than its arrival."""
        self._check_peer(dst, tag)
        header, body = self._message(tensor, codec)
        now = time.perf_counter()
        works = [dist.isend(header, group_dst=dst, group=self.group, tag=3 * tag)]
        if body.numel():
            works.append(dist.isend(body, group_dst=dst, group=self.group, tag=3 * tag + 1))

        def run(_: Handle) -> None:
            for work in works:
                work.wait()

        nbytes = header.numel() * 8 + body.numel()
        what = f"send to {self.members[dst]} on {self.label} (tag {tag})"
        return self._start(
            what, _Thread(run), lambda _: None, now, nbytes, 0, lambda m, t: m.transfer(self.rank, dst, nbytes, t)
        )

    def recv(self, src: int, *, tag: int = 0, device: torch.device | str = "cpu") -> Handle:
        """Receive what group rank `src` sends with `tag`; `wait()` returns it on `device`.

        The header (dtype, shape, codec) is received at once; a thread posts the body's receive
        the moment the header is in, so the caller need not know the shape, the transfer overlaps
        whatever the caller does, and two peers that send each other large bodies both complete.
        Receives from one peer with one tag are matched to its sends in order.
        """
        self._check_peer(src, tag)
        header = torch.zeros(_HEADER, dtype=torch.int64, device=self.device)
        now = time.perf_counter()
        header_work = dist.irecv(header, group_src=src, group=self.group, tag=3 * tag)
        with self._lock:
            previous = self._receives.get((src, tag))
            posted = self._receives[(src, tag)] = threading.Event()

        def run(handle: Handle) -> torch.Tensor:
            try:
                header_work.wait()
                dtype, codec, shape, sent_us = _read_header(header)
                numel = math.prod(shape)
                nbytes = codec.encoded_bytes(numel) if codec is not None else numel * dtype.itemsize
                body = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                if previous is not None:
                    previous.wait()  # its body was sent before this one
                body_work = dist.irecv(body, group_src=src, group=self.group, tag=3 * tag + 1) if nbytes else None
            finally:
                posted.set()
            self._arrived(handle, src, header.numel() * 8 + nbytes, sent_us)
            if body_work is not None:
                body_work.wait()
            value = codec.decode(body, numel) if codec is not None else body.view(dtype)
            return value.view(shape).to(device)

        what = f"receive from {self.members[src]} on {self.label} (tag {tag})"
        pending = _Thread(run)
        return self._start(what, pending, lambda _: pending.value, now, 0, 0, None)

    def _check_peer(self, peer: int, tag: int) -> None:
        if not self.tagged_p2p:
            # Messages are matched by tag and their bodies posted from a thread: without tags (NCCL)
            # they could pair up wrongly or deadlock against the main thread's collectives.
            raise ValueError(f"point-to-point needs a backend that matches tags (gloo), not {self.backend}")
        if not 0 <= peer < self.size or peer == self.rank:
            raise ValueError(f"rank {self.rank} cannot exchange with rank {peer} in a group of {self.size}")
        if not 0 <= tag < _MAX_TAG:
            raise ValueError(f"tag {tag} is not in [0, {_MAX_TAG})")

    def _message(self, tensor: torch.Tensor, codec: Codec | str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The header and the body bytes of a point-to-point message, on the wire's device."""
        if tensor.dim() > _MAX_DIMS:
            raise ValueError(f"cannot send a {tensor.dim()}-d tensor (at most {_MAX_DIMS} dimensions)")
        if codec is not None:
            codec = get_codec(codec) if isinstance(codec, str) else codec
            if not tensor.is_floating_point():
                raise ValueError(f"a codec encodes floating tensors, not {tensor.dtype}")
            flat = tensor.detach().reshape(-1).float()
            body, dtype, code = codec.encode(flat), torch.float32, list(CODECS).index(codec.name)
        elif tensor.dtype in _DTYPES:
            body, dtype, code = tensor.detach().contiguous().reshape(-1).view(torch.uint8), tensor.dtype, -1
        else:
            raise ValueError(f"cannot send a {tensor.dtype} tensor; one of {', '.join(map(str, _DTYPES))}")
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[:4] = torch.tensor([_DTYPES.index(dtype), code, tensor.dim(), int(time.time() * 1e6)])
        header[4 : 4 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        return header.to(self.device), body.to(self.device)

    def _arrived(self, handle: Handle, src: int, nbytes: int, sent_us: int) -> None:
        """A receive's header is in: count its bytes and model the transfer from its send on."""
        now = time.perf_counter()
        sent_at = now - max(0.0, time.time() - sent_us / 1e6)  # the send, on this rank's clock
        with self._lock:
            self.bytes_received += nbytes
            handle.bytes_received = nbytes
            if self.link is not None:
                handle.ready_at = self.link.transfer(src, self.rank, nbytes, sent_at)
                handle.modelled_s = handle.ready_at - sent_at

    def barrier(self, timeout: float | None = None) -> None:
        """Every rank has reached this point; raises CommError past `timeout` (see `Handle.wait`)."""
        if self.size > 1:
            now = time.perf_counter()
            work = dist.barrier(group=self.group, async_op=True)
            self._start(f"barrier on {self.label}", _Collective(work), lambda _: None, now, 0, 0, None).wait(timeout)


def choose_algorithm(
    codec: Codec | str, numel: int, members: int, *, exact_tail: int = 0, requested: Algorithm = "auto"
) -> str:
    """The path a reduction of `numel` values over `members` takes: "all_reduce" for fp32; else
    "gather" or "reduce_scatter" as requested. Auto keeps the gather (quantized once, the more
    accurate) while it sends no more bytes than an fp32 all-reduce would, and takes the
    reduce-scatter past that point: from 16 members at e3m0, 8 at int8 or fp8, 5 at bf16."""
    codec = get_codec(codec) if isinstance(codec, str) else codec
    if requested not in ("auto", "gather", "reduce_scatter"):
        raise ValueError(f"unknown algorithm {requested!r}; choose auto, gather or reduce_scatter")
    if codec.name == "fp32":
        return "all_reduce"
    if numel == exact_tail:
        return "gather"  # nothing to scatter
    if requested != "auto":
        return requested
    gather, fp32 = (reduction_bytes(path, codec, numel, exact_tail, members) for path in ("gather", "all_reduce"))
    return "reduce_scatter" if gather > fp32 else "gather"


def reduction_bytes(path: str, codec: Codec, numel: int, tail: int, n: int, *, itemsize: int = 4) -> int:
    """The bytes a member sends (as many as it receives) to reduce `numel` values, the last
    `tail` of them in fp32, over `n` members by `path` (see `choose_algorithm`); every
    member's weight rides along. `itemsize`: bytes per value of the unquantized all-reduce."""
    body = numel - tail
    if path == "all_reduce":
        return 2 * (n - 1) * itemsize * (numel + n) // n
    if path == "gather":
        return (n - 1) * _row_width(codec, body, tail)
    chunk = -(-body // n)
    return (n - 1) * (_row_width(codec, chunk, tail) + codec.encoded_bytes(chunk))


def _words(nbytes: int) -> int:
    """`nbytes` rounded up to whole fp32 words, so fp32 parts after them stay aligned."""
    return nbytes + -nbytes % 4


def _row_width(codec: Codec, numel: int, tail: int) -> int:
    return _words(codec.encoded_bytes(numel)) + 4 * (tail + 1)


def _pack(
    codec: Codec,
    values: torch.Tensor | None,
    numel: int,
    weight: float,
    width: int,
    device: torch.device,
    minus: torch.Tensor | None = None,
) -> torch.Tensor:
    """One member's row of a quantized reduction: [codes of values[:numel] (- minus) | padding to
    a word | values[numel:] in fp32 | weight in fp32]. Weight 0 sends zeros (0.0 is four zero bytes)."""
    row = torch.zeros(width, dtype=torch.uint8, device=device)
    if values is None:
        return row
    codes = kernels.encode(codec, values[:numel], minus)
    extras = torch.cat([values[numel:], values.new_tensor([weight])]).view(torch.uint8)
    row[: codes.numel()] = codes
    row[width - extras.numel() :] = extras
    return row


def _scatter_rows(
    codec: Codec, values: torch.Tensor | None, body: int, tail: int, weight: float, n: int, device: torch.device
) -> torch.Tensor:
    """Row j goes to member j: the j-th of n equal chunks of the body (zero-padded), with the tail."""
    chunk = -(-body // n)
    width = _row_width(codec, chunk, tail)
    rows = torch.zeros(n, width, dtype=torch.uint8, device=device)
    if values is None:
        return rows
    chunks = torch.nn.functional.pad(values[:body], (0, n * chunk - body)).view(n, chunk)
    for j in range(n):
        rows[j] = _pack(codec, torch.cat([chunks[j], values[body:]]), chunk, weight, width, device)
    return rows


def _reduce_rows(
    codec: Codec, rows: torch.Tensor, numel: int, tail: int, mean: bool
) -> tuple[torch.Tensor, list[float]]:
    """Every member's row decoded and summed with its weight in rank order, in fp32; rows of
    weight 0 are never read. Returns [numel values | tail values] and the weights."""
    width = rows.shape[1]
    extras = rows[:, width - 4 * (tail + 1) :].contiguous().view(torch.float32)
    weights = extras[:, -1].tolist()
    riding = torch.zeros(tail, dtype=torch.float32, device=rows.device)
    for part, weight in zip(extras, weights, strict=True):
        if weight:
            riding += weight * part[:-1]
    body = kernels.decode_sum(codec, rows, numel, weights, mean)
    return torch.cat([body, _scaled(riding, weights, mean)]), weights


def _assemble(codec: Codec, codes: Sequence[torch.Tensor], chunk: int, body: int, tail: torch.Tensor) -> torch.Tensor:
    """The reduced chunks, decoded in member order and cut to the body, then the tail."""
    return torch.cat([torch.cat([kernels.decode(codec, row, chunk) for row in codes])[:body], tail])


def _scaled(total: torch.Tensor, weights: Sequence[float] | torch.Tensor, mean: bool) -> torch.Tensor:
    """The sum, or the weighted mean (zeros when every weight is 0); weights on the device stay there."""
    if not mean:
        return total
    if isinstance(weights, torch.Tensor):
        weight = weights.sum()
        return torch.where(weight > 0, total / weight, torch.zeros_like(total))
    weight = sum(weights)
    return total / weight if weight > 0 else torch.zeros_like(total)


def _read_header(header: torch.Tensor) -> tuple[torch.dtype, Codec | None, list[int], int]:
    dtype, code, ndim, sent_us, *shape = header.tolist()
    codec = list(CODECS.values())[code] if code >= 0 else None
    return _DTYPES[dtype], codec, shape[:ndim], sent_us


def simulate_all_reduce(
    members: Sequence[torch.Tensor | None],
    weights: Sequence[float],
    codec: Codec | str,
    algorithm: Literal["gather", "reduce_scatter"],
    *,
    exact_tail: int = 0,
    mean: bool = True,
) -> torch.Tensor:
    """What every member's quantized `all_reduce_mean`/`all_reduce_sum` returns for these
    members' flat tensors (None where the weight is 0), computed in one process with the engine's
    own arithmetic, bit for bit: for tests, and to measure each path's error."""
    codec = get_codec(codec) if isinstance(codec, str) else codec
    n, device = len(members), next(x.device for x in members if x is not None)
    body = next(x.numel() for x in members if x is not None) - exact_tail
    values = [x.float() if w else None for x, w in zip(members, weights, strict=True)]
    if algorithm == "gather":
        width = _row_width(codec, body, exact_tail)
        rows = torch.stack([_pack(codec, x, body, w, width, device) for x, w in zip(values, weights, strict=True)])
        return _reduce_rows(codec, rows, body, exact_tail, mean)[0]
    chunk = -(-body // n)
    scattered = [_scatter_rows(codec, x, body, exact_tail, w, n, device) for x, w in zip(values, weights, strict=True)]
    reduced = [
        _reduce_rows(codec, torch.stack([s[j] for s in scattered]), chunk, exact_tail, mean)[0] for j in range(n)
    ]
    codes = [kernels.encode(codec, part[:chunk]) for part in reduced]
    return _assemble(codec, codes, chunk, body, reduced[0][chunk:])
