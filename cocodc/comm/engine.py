"""Async collectives and point-to-point over one ProcessGroup, with byte and time accounting.

Every operation returns a `Handle` at once. Bytes are those a rank puts on (and takes off) the
wire under bandwidth-optimal algorithms, whatever the backend really runs: a ring all-reduce
moves 2 (n - 1) / n of the payload each way, a ring all-gather n - 1 payloads, a broadcast one
payload over each link from the source. So totals compare across backends. With a `LinkModel`, a
handle completes no earlier than its start plus the modelled transfer time, in wall-clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from cocodc.comm.codec import Codec, get_codec
from cocodc.comm.wan import LinkModel

# Wire format of the header that precedes a point-to-point tensor: dtype code, ndim, shape.
_DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.uint8,
    torch.int8,
    torch.int32,
    torch.int64,
]
_MAX_DIMS = 8


class Handle:
    """An operation in flight: `wait()` returns its result; accounting fills in as it goes."""

    def __init__(
        self,
        engine: CommEngine,
        works: Sequence[dist.Work],
        finish: Callable[[Handle], object],
        *,
        sent: int = 0,
        received: int = 0,
        modelled_s: float = 0.0,
    ):
        self._engine, self._works, self._finish = engine, list(works), finish
        self._result: object = None
        self.bytes_sent, self.bytes_received = sent, received
        self.modelled_s = modelled_s  # the link model's transfer time (0 without one)
        self.started_at = time.perf_counter()
        self.finished_at: float | None = None
        self.blocked_s = 0.0  # time spent inside wait()

    @classmethod
    def completed(cls, engine: CommEngine, result: object) -> Handle:
        handle = cls(engine, [], lambda _: result)
        handle.wait()
        return handle

    @property
    def ready_at(self) -> float:
        return self.started_at + self.modelled_s

    @property
    def elapsed_s(self) -> float:
        """From the start to the result being available (after `wait()`)."""
        return self.finished_at - self.started_at if self.finished_at is not None else float("nan")

    def is_done(self) -> bool:
        if self.finished_at is not None:
            return True
        return all(work.is_completed() for work in self._works) and time.perf_counter() >= self.ready_at

    def wait(self) -> object:
        if self.finished_at is None:
            begin = time.perf_counter()
            for work in self._works:
                work.wait()
            self._result = self._finish(self)
            self._finish_no_earlier_than_the_link()
            self.blocked_s = self.finished_at - begin
            self._engine.blocked_s += self.blocked_s
        return self._result

    def _finish_no_earlier_than_the_link(self) -> None:
        remaining = self.ready_at - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        self.finished_at = time.perf_counter()

    def future(self) -> torch.futures.Future:
        """A future of the result, for DDP comm hooks (one collective, link model included)."""
        if not self._works:
            done = torch.futures.Future()
            done.set_result(self.wait())
            return done
        (work,) = self._works

        def finish(_: torch.futures.Future) -> object:
            result = self._finish(self)
            self._finish_no_earlier_than_the_link()
            return result

        return work.get_future().then(finish)


class CommEngine:
    def __init__(self, group: dist.ProcessGroup | None, link: LinkModel | None = None):
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        if link is not None and link.size != self.size:
            raise ValueError(f"the link model has {link.size} ranks but the group has {self.size}")
        self.link = link
        self.bytes_sent = 0
        self.bytes_received = 0
        self.blocked_s = 0.0

    def _start(
        self,
        works: Sequence[dist.Work],
        finish: Callable[[Handle], object],
        sent: int,
        received: int,
        modelled_s: Callable[[LinkModel], float],
    ) -> Handle:
        self.bytes_sent += sent
        self.bytes_received += received
        modelled = modelled_s(self.link) if self.link is not None else 0.0
        return Handle(self, works, finish, sent=sent, received=received, modelled_s=modelled)

    def all_reduce_mean(self, tensor: torch.Tensor, codec: Codec | str = "fp32", exact_tail: int = 0) -> Handle:
        """The mean of a flat fp32 `tensor` over the group; `wait()` returns it.

        fp32 reduces in place with one all-reduce. Any other codec gathers every rank's encoded
        payload, then decodes and sums them in rank order in fp32, so every rank holds the same
        mean and only the outgoing values were quantized. The last `exact_tail` values travel in
        fp32 whatever the codec (a few numbers riding along with a payload).
        """
        codec = get_codec(codec) if isinstance(codec, str) else codec
        if self.size == 1:
            return Handle.completed(self, tensor)
        if codec.name == "fp32":
            nbytes = tensor.numel() * tensor.element_size()
            wire = 2 * (self.size - 1) * nbytes // self.size
            work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
            return self._start([work], lambda _: tensor.div_(self.size), wire, wire, lambda m: m.all_reduce_s(nbytes))
        body = tensor.numel() - exact_tail
        encoded = codec.encode(tensor[:body])
        # Pad the codes to whole fp32 words so every gathered row (and its fp32 parts) stays aligned.
        aligned = encoded.numel() + -encoded.numel() % 4
        payload = torch.cat(
            [torch.nn.functional.pad(encoded, (0, aligned - encoded.numel())), tensor[body:].view(torch.uint8)]
        )
        gathered = torch.empty(self.size, payload.numel(), dtype=torch.uint8, device=payload.device)
        work = dist.all_gather_single(gathered.view(-1), payload, group=self.group, async_op=True)

        def mean(_: Handle) -> torch.Tensor:
            total = torch.zeros(tensor.numel(), dtype=torch.float32, device=tensor.device)
            for row in gathered:
                total[:body] += codec.decode(row[: encoded.numel()], body)
                total[body:] += row[aligned:].view(torch.float32)
            return total.div_(self.size)

        wire = (self.size - 1) * payload.numel()
        return self._start([work], mean, wire, wire, lambda m: m.all_gather_s(payload.numel()))

    def all_gather(self, tensor: torch.Tensor) -> Handle:
        """Every rank's `tensor` (same shape everywhere), stacked in rank order: [size, *shape]."""
        gathered = torch.empty(self.size, *tensor.shape, dtype=tensor.dtype, device=tensor.device)
        if self.size == 1:
            gathered[0] = tensor
            return Handle.completed(self, gathered)
        work = dist.all_gather_single(gathered.view(-1), tensor.reshape(-1), group=self.group, async_op=True)
        nbytes = tensor.numel() * tensor.element_size()
        wire = (self.size - 1) * nbytes
        return self._start([work], lambda _: gathered, wire, wire, lambda m: m.all_gather_s(nbytes))

    def broadcast(self, tensor: torch.Tensor, src: int) -> Handle:
        """`tensor` from group rank `src` to every rank, in place."""
        if self.size == 1:
            return Handle.completed(self, tensor)
        work = dist.broadcast(tensor, group_src=src, group=self.group, async_op=True)
        nbytes = tensor.numel() * tensor.element_size()
        sent, received = ((self.size - 1) * nbytes, 0) if self.rank == src else (0, nbytes)
        return self._start([work], lambda _: tensor, sent, received, lambda m: m.broadcast_s(nbytes, src))

    def send(self, tensor: torch.Tensor, dst: int) -> Handle:
        """Send a tensor of any shape and dtype to group rank `dst`; `recv(src)` there gets it."""
        if tensor.dtype not in _DTYPES or tensor.dim() > _MAX_DIMS:
            raise ValueError(f"cannot send a {tensor.dim()}-d {tensor.dtype} tensor")
        header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64)
        header[0], header[1] = _DTYPES.index(tensor.dtype), tensor.dim()
        header[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        body = tensor.contiguous()
        works = [
            dist.isend(header.to(tensor.device), group_dst=dst, group=self.group),
            dist.isend(body, group_dst=dst, group=self.group),
        ]
        nbytes = header.numel() * 8 + body.numel() * body.element_size()
        return self._start(works, lambda _: None, nbytes, 0, lambda m: m.transfer_s(self.rank, dst, nbytes))

    def recv(self, src: int, device: torch.device | str = "cpu") -> Handle:
        """Receive the tensor group rank `src` sends; `wait()` returns it. Its shape travels in a
        header, so the body is posted once the header is in: `is_done()` covers the header."""
        header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64, device=device)
        work = dist.irecv(header, group_src=src, group=self.group)

        def receive_body(handle: Handle) -> torch.Tensor:
            dtype, ndim = _DTYPES[int(header[0])], int(header[1])
            body = torch.empty(header[2 : 2 + ndim].tolist(), dtype=dtype, device=device)
            dist.irecv(body, group_src=src, group=self.group).wait()
            nbytes = header.numel() * 8 + body.numel() * body.element_size()
            handle.bytes_received = nbytes
            self.bytes_received += nbytes
            if self.link is not None:
                handle.modelled_s = self.link.transfer_s(src, self.rank, nbytes)
            return body

        return self._start([work], receive_body, 0, 0, lambda m: 0.0)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)
