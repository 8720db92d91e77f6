"""The comm engine: codecs, the link model, and every operation over a real 2-process gloo group."""

import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cocodc.comm import CommEngine
from cocodc.comm.codec import BLOCK, CODECS, get_codec
from cocodc.comm.wan import LinkModel

from conftest import gloo_group


def _values(numel: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    # Magnitudes spread over several decades, as pseudo-gradients are.
    return torch.randn(numel, generator=generator) * torch.rand(numel, generator=generator) ** 4


@pytest.mark.parametrize(
    "name, numel, size",
    [
        ("fp32", 1000, 4000),
        ("bf16", 1000, 2000),
        ("fp8", 1000, 8 * 4 + 1000),  # 8 blocks of 128 (the last one partial), one fp32 scale each
        ("int8", 1000, 8 * 4 + 1000),
        ("e3m0", 1000, 8 * 4 + 500),
        ("e3m0", 1, 4 + 1),
        ("e3m0", 256, 2 * 4 + 128),
    ],
)
def test_encoded_sizes_are_exact(name, numel, size):
    codec = get_codec(name)
    assert codec.encoded_bytes(numel) == size
    payload = codec.encode(_values(numel))
    assert payload.dtype == torch.uint8 and payload.numel() == size


def test_four_bit_payload_is_under_a_seventh_of_fp32():
    numel = 64 * BLOCK
    ratio = get_codec("e3m0").encoded_bytes(numel) / get_codec("fp32").encoded_bytes(numel)
    assert ratio == 68 / 512 < 1 / 7


def _block_bound(name: str, x: torch.Tensor) -> torch.Tensor:
    """The largest error each format may make on each value, given its block's absmax."""
    blocks = torch.nn.functional.pad(x, (0, -x.numel() % BLOCK)).view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True).expand_as(blocks).reshape(-1)[: x.numel()]
    magnitude = x.abs()
    if name == "fp32":
        return torch.zeros_like(x)
    if name == "bf16":
        return magnitude * 2.0**-8
    if name == "int8":
        return absmax / 254 * (1 + 1e-6)
    if name == "fp8":  # 3 mantissa bits; below the smallest normal, half the subnormal spacing
        return torch.maximum(magnitude * 2.0**-4, absmax / 448 * 2.0**-10)
    # e3m0: the nearest power of two is within a third of the value; below 2^-6 of absmax, zero
    # or 2^-6 is within 2^-7 of absmax.
    return torch.maximum(magnitude / 3, absmax * 2.0**-7) * (1 + 1e-6)


@pytest.mark.parametrize("name", list(CODECS))
def test_round_trip_error_within_the_format_bound(name):
    codec = get_codec(name)
    x = _values(1000)
    decoded = codec.decode(codec.encode(x), x.numel())
    assert decoded.dtype == torch.float32 and decoded.shape == x.shape
    assert ((decoded - x).abs() <= _block_bound(name, x)).all()


def test_e3m0_codes_by_hand():
    # absmax 1: magnitudes round to the nearest of 0, 2^-6 ... 2^-1, 1 (ties up, zero below 2^-7).
    x = torch.tensor([1.0, -0.75, 0.7, 0.4, -0.3, 0.2, 0.01, 0.005, 0.0, -(2.0**-6)])
    decoded = get_codec("e3m0").decode(get_codec("e3m0").encode(x), x.numel())
    expected = torch.tensor([1.0, -1.0, 0.5, 0.5, -0.25, 0.25, 2.0**-6, 0.0, 0.0, -(2.0**-6)])
    assert torch.equal(decoded, expected)


def test_unknown_codec_is_named():
    with pytest.raises(ValueError, match="unknown codec 'fp4'"):
        get_codec("fp4")


def test_link_model_ring_times_by_hand():
    # 2 regions, 100 ms one-way, 100 Mbit/s = 12.5 MB/s. A ring all-reduce of 1.25 MB: 2 steps of
    # (0.1 s + 0.625 MB / 12.5 MB/s) = 0.3 s; an all-gather of 1.25 MB: 1 step of 0.2 s.
    link = LinkModel.build(2, 100, 100)
    assert link.all_reduce_s(1_250_000) == pytest.approx(0.3)
    assert link.all_gather_s(1_250_000) == pytest.approx(0.2)
    assert link.transfer_s(0, 1, 125_000) == pytest.approx(0.11)
    assert link.broadcast_s(1_250_000, src=1) == pytest.approx(0.2)
    assert LinkModel.build(2, 0, 0).all_reduce_s(10**9) == 0.0


def test_link_model_per_pair_and_slowest_ring_link():
    # Three regions; the ring 0->1->2->0 is held back by its slowest link, 2->0 (300 ms, 10 Mbit/s).
    latency = [[0, 10, 50], [10, 0, 20], [300, 20, 0]]
    bandwidth = [[0, 100, 100], [100, 0, 100], [10, 100, 0]]
    link = LinkModel.build(3, latency, bandwidth)
    step = 0.3 + 125_000 / 1.25e6
    assert link.all_gather_s(125_000) == pytest.approx(2 * step)
    assert link.transfer_s(0, 2, 0) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="3 x 3 matrix"):
        LinkModel.build(3, [[0, 1], [1, 0]], 100)


def test_link_model_jitter_stays_within_bounds_and_for_ranks_expands_regions():
    link = LinkModel.build(2, 100, 0, jitter_ms=20, seed=3)
    draws = [link.transfer_s(0, 1, 0) for _ in range(200)]
    assert min(draws) >= 0.08 and max(draws) <= 0.12 and len(set(draws)) > 100
    per_rank = LinkModel.build(2, 100, 100).for_ranks([0, 0, 1, 1])
    assert per_rank.latency_s[0][1] == 0.0 and per_rank.latency_s[1][2] == pytest.approx(0.1)
    assert per_rank.bandwidth_Bps[3][0] == pytest.approx(12.5e6)


def _engine_worker(rank: int, store: str, results) -> None:
    with gloo_group(rank, store):
        engine = CommEngine(dist.group.WORLD)
        out = {}
        # fp32 mean, in place; a ring moves 2 (n-1)/n of 4 floats each way.
        handle = engine.all_reduce_mean(torch.tensor([1.0, 2.0, 3.0, 4.0]) * (rank + 1))
        out["mean"] = handle.wait().tolist(), handle.bytes_sent
        # bf16 payloads averaged in fp32: 256 + 1 is not a bf16 number, 128.5 is an fp32 one.
        out["bf16"] = engine.all_reduce_mean(torch.tensor([[256.0], [1.0]][rank]), "bf16").wait().item()
        # e3m0 payloads of 1000 values: each rank sends its 532 bytes to the other one.
        x = _values(1000) * (1 - 2 * rank)
        handle = engine.all_reduce_mean(x, "e3m0")
        out["e3m0"] = handle.wait().abs().max().item(), handle.bytes_sent
        # Odd-sized 4-bit codes with two values riding along in fp32: 1/3 is no power of two.
        ride = torch.tensor([1.0, -1.0, 0.5, 1 / 3, 100.0 * (rank + 1)])
        out["tail"] = engine.all_reduce_mean(ride, "e3m0", exact_tail=2).wait().tolist()
        out["gather"] = engine.all_gather(torch.full((2, 3), float(rank))).wait().tolist()
        out["broadcast"] = engine.broadcast(torch.full((3,), float(rank)), src=1).wait().tolist()
        if rank == 0:
            sent = engine.send(torch.arange(6, dtype=torch.int32).view(2, 3), dst=1)
            sent.wait()
            out["p2p"] = sent.bytes_sent
        else:
            received = engine.recv(src=0).wait()
            out["p2p"] = received.dtype, received.tolist()
        # With a link model, a handle completes no earlier than the model says.
        slow = CommEngine(dist.group.WORLD, LinkModel.build(2, 150, 8))  # 1 MB/s
        handle = slow.all_reduce_mean(torch.zeros(25_000))  # 100 kB: 2 * (0.15 + 0.05) = 0.4 s
        done_at_once = handle.is_done()
        began = time.perf_counter()
        handle.wait()
        out["link"] = done_at_once, handle.modelled_s, handle.elapsed_s, time.perf_counter() - began, slow.blocked_s
        results[rank] = out


def test_engine_operations_over_two_real_processes(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_engine_worker, args=(str(tmp_path / "store"), results), nprocs=2)
    for rank in (0, 1):
        out = results[rank]
        assert out["mean"] == ([1.5, 3.0, 4.5, 6.0], 16)
        assert out["bf16"] == 128.5
        # The two regions sent exact opposites: the decoded mean is exactly zero; 532 bytes each.
        assert out["e3m0"] == (0.0, 532)
        assert out["gather"] == [[[0.0] * 3] * 2, [[1.0] * 3] * 2]
        assert out["broadcast"] == [1.0, 1.0, 1.0]
        assert out["tail"] == [1.0, -1.0, 0.5, pytest.approx(1 / 3, abs=1e-7), 150.0]
        done_at_once, modelled, elapsed, blocked, engine_blocked = out["link"]
        assert not done_at_once
        assert modelled == pytest.approx(0.4)
        assert elapsed >= modelled and blocked >= modelled - 0.05
        assert engine_blocked == pytest.approx(blocked, abs=0.01)
    assert results[0]["p2p"] == 10 * 8 + 6 * 4  # header + body
    assert results[1]["p2p"] == (torch.int32, [[0, 1, 2], [3, 4, 5]])
    assert math.isclose(results[0]["link"][1], results[1]["link"][1])
