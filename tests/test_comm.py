"""The comm engine: codecs, the two quantized means, and every operation over real gloo groups."""

import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cocodc.comm import CommEngine, CommError
from cocodc.comm.codec import BLOCK, CODECS, get_codec
from cocodc.comm.engine import choose_algorithm, reduction_bytes, simulate_all_reduce
from cocodc.comm.wan import LinkModel

from conftest import gloo_group

NAN = float("nan")


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


def block_bound(name: str, x: torch.Tensor) -> torch.Tensor:
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
    assert ((decoded - x).abs() <= block_bound(name, x)).all()


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("bad", [NAN, float("inf")])
def test_a_non_finite_value_decodes_non_finite(name, bad):
    # A block's scale comes from its absmax: a NaN or inf in it must not come out as finite zeros,
    # or a receiver that checks finiteness after decoding would take a broken update for a quiet one.
    x = _values(3 * BLOCK)
    x[BLOCK + 5] = bad
    codec = get_codec(name)
    decoded = codec.decode(codec.encode(x), x.numel())
    assert not decoded[BLOCK + 5].isfinite()
    unscaled = name in ("fp32", "bf16")
    assert decoded[BLOCK : 2 * BLOCK].isfinite().sum() == (BLOCK - 1 if unscaled else 0)
    assert decoded[:BLOCK].isfinite().all() and decoded[2 * BLOCK :].isfinite().all()


def test_e3m0_codes_by_hand():
    # absmax 1: magnitudes round to the nearest of 0, 2^-6 ... 2^-1, 1 (ties up, zero below 2^-7).
    x = torch.tensor([1.0, -0.75, 0.7, 0.4, -0.3, 0.2, 0.01, 0.005, 0.0, -(2.0**-6)])
    decoded = get_codec("e3m0").decode(get_codec("e3m0").encode(x), x.numel())
    expected = torch.tensor([1.0, -1.0, 0.5, 0.5, -0.25, 0.25, 2.0**-6, 0.0, 0.0, -(2.0**-6)])
    assert torch.equal(decoded, expected)


def test_unknown_codec_is_named():
    with pytest.raises(ValueError, match="unknown codec 'fp4'"):
        get_codec("fp4")


# Members 0 and 2 take part with weights 1 and 3; member 1 holds NaN and weight 0. The first six
# values, their weighted mean and their weighted sum are e3m0 numbers (a power of two times the
# absmax) in every block and in every 2-value chunk of a 3-member reduce-scatter; the last value
# rides along in fp32 (the mean's 3.5 is no e3m0 number there).
_MASKED = {
    0: (1.0, [4.0, 4.0, 4.0, 2.0, 8.0, -4.0, 5.0]),
    1: (0.0, [NAN] * 7),
    2: (3.0, [4.0, -4.0, 0.0, 0.0, 0.0, 0.0, 3.0]),
}
_MEAN = [4.0, -2.0, 1.0, 0.5, 2.0, -1.0, 3.5]  # (x0 + 3 x2) / 4
_SUM = [16.0, -8.0, 4.0, 2.0, 8.0, -4.0, 14.0]


@pytest.mark.parametrize("algorithm", ["gather", "reduce_scatter"])
def test_quantized_means_by_hand_skip_the_member_of_weight_zero(algorithm):
    members = [torch.tensor(values) for _, values in _MASKED.values()]
    weights = [weight for weight, _ in _MASKED.values()]
    mean = simulate_all_reduce(members, weights, "e3m0", algorithm, exact_tail=1)
    total = simulate_all_reduce(members, weights, "e3m0", algorithm, exact_tail=1, mean=False)
    assert mean.tolist() == _MEAN and total.tolist() == _SUM
    nobody = simulate_all_reduce([members[1], members[1]], [0.0, 0.0], "e3m0", algorithm)
    assert nobody.tolist() == [0.0] * 7  # documented: the mean over no member is zeros


def _int8_bound(x: torch.Tensor) -> torch.Tensor:
    """int8's largest error on each value: half a step of its block's absmax / 127."""
    blocks = torch.nn.functional.pad(x, (0, -x.numel() % BLOCK)).view(-1, BLOCK)
    return (blocks.abs().amax(dim=1, keepdim=True) / 254 * (1 + 1e-5)).expand_as(blocks).reshape(-1)[: x.numel()]


def test_quantized_means_stay_within_the_format_bounds():
    # Five members, one masked. Each member's encoding errs by at most its bound, so the decoded
    # mean by at most the weighted mean of the bounds; the gather encodes whole payloads, the
    # reduce-scatter chunks of 200 values (blocks start at each chunk). The reduce-scatter then
    # encodes the reduced chunk again: half a step more of that chunk's absmax.
    weights = [1.0, 2.0, 0.0, 1.0, 3.0]
    members = [_values(1000) * (m + 1) if w else torch.full((1000,), NAN) for m, w in enumerate(weights)]
    exact = sum(w * x for w, x in zip(weights, members, strict=True) if w) / sum(weights)

    def bound(chunk: int) -> torch.Tensor:
        pieces = [torch.cat([_int8_bound(c) for c in x.split(chunk)]) for x in members]
        return sum(w * b for w, b in zip(weights, pieces, strict=True) if w) / sum(weights)

    gather = simulate_all_reduce(members, weights, "int8", "gather")
    assert ((gather - exact).abs() <= bound(1000)).all()
    scattered = simulate_all_reduce(members, weights, "int8", "reduce_scatter")
    first = bound(200)
    reduced = zip(exact.split(200), first.split(200), strict=True)
    second = torch.cat([((r.abs() + b).max() / 254 * (1 + 1e-5)).expand_as(r) for r, b in reduced])
    assert ((scattered - exact).abs() <= first + second).all()


def test_auto_gathers_while_that_sends_fewer_bytes_than_fp32():
    # The gather sends (n - 1) encoded payloads, the fp32 ring 2 (n - 1) / n payloads of fp32: the
    # gather stops saving bytes at n = 16 for 4 bits, 8 for 8 bits, 5 for 16 bits.
    numel = 1 << 20
    for codec, first in (("e3m0", 16), ("int8", 8), ("fp8", 8), ("bf16", 5)):
        assert choose_algorithm(codec, numel, first - 1) == "gather"
        assert choose_algorithm(codec, numel, first) == "reduce_scatter"
        bytes_at = {
            n: [reduction_bytes(p, get_codec(codec), numel, 0, n) for p in ("gather", "all_reduce")]
            for n in (first - 1, first)
        }
        assert bytes_at[first - 1][0] <= bytes_at[first - 1][1] and bytes_at[first][0] > bytes_at[first][1]
    assert choose_algorithm("fp32", numel, 32) == "all_reduce"
    assert choose_algorithm("e3m0", numel, 32, requested="gather") == "gather"
    assert choose_algorithm("e3m0", 5, 32, exact_tail=5) == "gather"  # nothing to scatter
    # The reduce-scatter sends about 2 (n - 1) / n of one encoded payload.
    encoded = get_codec("e3m0").encoded_bytes(numel)
    assert reduction_bytes("reduce_scatter", get_codec("e3m0"), numel, 0, 32) == pytest.approx(
        2 * 31 / 32 * encoded, rel=1e-3
    )
    with pytest.raises(ValueError, match="unknown algorithm 'ring'"):
        choose_algorithm("e3m0", numel, 4, requested="ring")


def _spawn(worker: Callable[..., None], tmp_path: Path, nprocs: int = 2) -> dict:
    results = mp.Manager().dict()
    mp.spawn(worker, args=(str(tmp_path / "store"), results), nprocs=nprocs)
    return dict(results)


def _reduction_worker(rank: int, store: str, results) -> None:
    with gloo_group(rank, store, world_size=3):
        engine = CommEngine(dist.group.WORLD)
        weight, values = _MASKED[rank]
        out = {}
        for codec, algorithm in (("fp32", "auto"), ("e3m0", "gather"), ("e3m0", "reduce_scatter")):
            x = torch.tensor(values)
            mean = engine.all_reduce_mean(x, codec, exact_tail=1, weight=weight, algorithm=algorithm)
            total = engine.all_reduce_sum(x, codec, exact_tail=1, weight=weight, algorithm=algorithm)
            out[codec, algorithm] = mean.wait().tolist(), total.wait().tolist(), mean.weights, mean.bytes_sent
        # Values no codec holds exactly: every member gets, bit for bit, what the one-process
        # simulation (whose error is bounded above) computes.
        weights = [1.0, 0.0, 3.0]
        members = [_values(1000) * (m + 1) if w else torch.full((1000,), NAN) for m, w in enumerate(weights)]
        for algorithm in ("gather", "reduce_scatter"):
            mean = engine.all_reduce_mean(
                members[rank], "e3m0", exact_tail=2, weight=weights[rank], algorithm=algorithm
            )
            out["simulated", algorithm] = torch.equal(
                mean.wait(), simulate_all_reduce(members, weights, "e3m0", algorithm, exact_tail=2)
            )
        out["nobody"] = engine.all_reduce_mean(torch.full((2,), NAN), weight=0.0).wait().tolist()
        out["auto"] = engine.all_reduce_mean(members[rank], "e3m0", weight=weights[rank]).bytes_sent
        out["gather"] = engine.all_gather(torch.full((2,), float(rank))).wait().tolist()
        out["broadcast"] = engine.broadcast(torch.full((3,), float(rank)), src=2).wait().tolist()
        out["totals"] = engine.bytes_sent, engine.bytes_received
        results[rank] = out


def test_weighted_means_and_sums_over_three_processes(tmp_path):
    results = _spawn(_reduction_worker, tmp_path, nprocs=3)
    for rank in range(3):
        out = results[rank]
        # fp32: 7 values and 3 weights, 2 (n - 1) / n of them each way. e3m0 gather: a row of the 6
        # values' codes (4-byte scale + 3 bytes, padded to 8), the fp32 tail and the weight, to 2
        # peers. Reduce-scatter: rows of one 2-value chunk (8 + 8) to 2 peers, then the reduced
        # chunk's 5 bytes to 2 peers.
        for key, sent in (
            (("fp32", "auto"), 2 * 2 * 40 // 3),
            (("e3m0", "gather"), 2 * 16),
            (("e3m0", "reduce_scatter"), 2 * (16 + 5)),
        ):
            assert out[key] == (_MEAN, _SUM, [1.0, 0.0, 3.0], sent), key
        assert out["simulated", "gather"] is True and out["simulated", "reduce_scatter"] is True
        assert out["nobody"] == [0.0, 0.0]
        # auto gathers at n = 3: to each of 2 peers 532 bytes of e3m0 and the 4-byte weight (reduce-scatter: 726).
        assert out["auto"] == 2 * (532 + 4) == reduction_bytes("gather", get_codec("e3m0"), 1000, 0, 3)
        assert out["gather"] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
        assert out["broadcast"] == [2.0, 2.0, 2.0]
    assert results[2]["totals"][0] == results[0]["totals"][0] + 2 * 12  # the broadcast's source sends to both


def _torchft_worker(rank: int, store: str, results) -> None:
    # torchft's reconfigurable gloo group, configured by hand as its Manager does at a quorum: all
    # three members, then the two left after member 1 drops out (a new quorum, a new store prefix).
    from torchft.process_group import ProcessGroupGloo

    port = int(Path(store).read_text())
    tcp_store = dist.TCPStore("127.0.0.1", port, is_master=rank == 0, wait_for_workers=False)
    group = ProcessGroupGloo(timeout=timedelta(seconds=30))
    members = [_values(1000) * (m + 1) for m in range(3)]
    out = {}
    for quorum, ranks in ((1, [0, 1, 2]), (2, [0, 2])):
        if rank not in ranks:
            continue
        group.configure(f"127.0.0.1:{port}/torchft/{quorum}/0", f"region {rank}", ranks.index(rank), len(ranks))
        engine = CommEngine(group.parent, name="inter-region", members=[f"region {m}" for m in ranks])
        mine = members[rank]
        for algorithm in ("gather", "reduce_scatter"):
            mean = engine.all_reduce_mean(mine, "e3m0", algorithm=algorithm).wait()
            expected = simulate_all_reduce([members[m] for m in ranks], [1.0] * len(ranks), "e3m0", algorithm)
            out[quorum, algorithm] = torch.equal(mean, expected)
        out[quorum, "size"] = engine.size, engine.rank, engine.tagged_p2p
    results[rank] = out
    tcp_store.add("done", 1)
    while rank == 0 and tcp_store.add("done", 0) < 3:  # the store outlives its clients
        time.sleep(0.05)


def test_the_engine_runs_over_torchfts_reconfigurable_group(tmp_path):
    pytest.importorskip("torchft")
    with socket.socket() as probe:  # a free port for the store that torchft's quorums would share
        probe.bind(("127.0.0.1", 0))
        (tmp_path / "store").write_text(str(probe.getsockname()[1]))
    results = _spawn(_torchft_worker, tmp_path, nprocs=3)
    for rank, position in ((0, 0), (2, 1)):
        assert results[rank][1, "size"] == (3, rank, True) and results[rank][2, "size"] == (2, position, True)
        assert all(results[rank][key] for key in results[rank] if key[1] != "size")
    assert results[1] == {(1, "gather"): True, (1, "reduce_scatter"): True, (1, "size"): (3, 1, True)}


def _engine_worker(rank: int, store: str, results) -> None:
    with gloo_group(rank, store):
        engine = CommEngine(dist.group.WORLD)
        out = {}
        # fp32 mean of any shape; a ring moves 2 (n-1)/n of 4 floats and 2 weights each way.
        handle = engine.all_reduce_mean(torch.tensor([[1.0, 2.0], [3.0, 4.0]]) * (rank + 1))
        out["mean"] = handle.wait().tolist(), handle.bytes_sent, handle.weights
        # A float64 sum stays float64 (2^40 + 1 is no fp32 number): 8 bytes a value and a weight.
        handle = engine.all_reduce_sum(torch.tensor([2.0**40 + 1], dtype=torch.float64) * (rank + 1))
        out["float64"] = handle.wait().dtype, handle.wait().item(), handle.bytes_sent
        # A member of weight 0 reduces in the others' dtype although it reads nothing of its own.
        handle = engine.all_reduce_mean(torch.tensor([2.0**40 + 1], dtype=torch.float64), weight=1.0 - rank)
        out["float64 weight 0"] = handle.wait().dtype, handle.wait().item()
        # bf16 payloads averaged in fp32: 256 + 1 is not a bf16 number, 128.5 is an fp32 one.
        out["bf16"] = engine.all_reduce_mean(torch.tensor([[256.0], [1.0]][rank]), "bf16").wait().item()
        # e3m0 payloads of 1000 values: each rank sends its 532 bytes and its weight to the other one.
        x = _values(1000) * (1 - 2 * rank)
        handle = engine.all_reduce_mean(x, "e3m0")
        out["e3m0"] = handle.wait().abs().max().item(), handle.bytes_sent
        # Odd-sized 4-bit codes with two values riding along in fp32: 1/3 is no power of two.
        ride = torch.tensor([1.0, -1.0, 0.5, 1 / 3, 100.0 * (rank + 1)])
        out["tail"] = engine.all_reduce_mean(ride, "e3m0", exact_tail=2).wait().tolist()
        # With a link model (150 ms, 1 MB/s) a handle completes no earlier than the model says, and
        # a second all-reduce queues behind the first on the ring links.
        slow = CommEngine(dist.group.WORLD, LinkModel.build(2, 150, 8))
        first, second = (slow.all_reduce_mean(torch.zeros(25_000)) for _ in range(2))
        done_at_once = first.is_done()
        first.wait()
        second.wait()
        out["link"] = (
            done_at_once,
            first.modelled_s,
            second.ready_at - max(second.started_at, first.started_at + 0.250008),
            [(h.elapsed_s >= h.modelled_s, h.finished_at >= h.ready_at) for h in (first, second)],
            slow.blocked_s == first.blocked_s + second.blocked_s,
        )
        # A DDP comm hook's future sleeps out the link on the backend's thread; that counts as blocked.
        hooked = CommEngine(dist.group.WORLD, LinkModel.build(2, 500, 0))
        handle = hooked.all_reduce_mean(torch.full((4,), float(rank)))
        value = handle.future().wait().tolist()
        out["future"] = value, handle.finished_at >= handle.ready_at, hooked.blocked_s == handle.blocked_s > 0
        results[rank] = out


def test_engine_operations_over_two_real_processes(tmp_path):
    results = _spawn(_engine_worker, tmp_path)
    for rank in (0, 1):
        out = results[rank]
        assert out["mean"] == ([[1.5, 3.0], [4.5, 6.0]], 24, [1.0, 1.0])
        assert out["bf16"] == 128.5
        assert out["float64"] == (torch.float64, 3 * (2.0**40 + 1), 2 * 1 * 8 * 3 // 2)
        assert out["float64 weight 0"] == (torch.float64, 2.0**40 + 1)
        # The two regions sent exact opposites: the decoded mean is exactly zero; 532 + 4 bytes each.
        assert out["e3m0"] == (0.0, 536)
        assert out["tail"] == [1.0, -1.0, 0.5, pytest.approx(1 / 3, abs=1e-7), 150.0]
        done_at_once, modelled, second_ready, no_earlier, blocked_adds_up = out["link"]
        # 25,000 values and 2 weights: 2 ring steps of 0.15 s + 50,004 bytes at 1 MB/s. The second
        # all-reduce's first step waits for the first's second step to leave the link (0.250008 s).
        assert not done_at_once and modelled == pytest.approx(2 * (0.15 + 0.050004))
        assert second_ready == pytest.approx(2 * (0.15 + 0.050004))
        assert no_earlier == [(True, True), (True, True)] and blocked_adds_up
        assert out["future"] == ([0.5] * 4, True, True)


def _p2p_worker(rank: int, store: str, results) -> None:
    with gloo_group(rank, store):
        engine = CommEngine(dist.group.WORLD)
        peer, out = 1 - rank, {}
        # Both send each other 32 MB at once and only then receive: both complete.
        sent = engine.send(torch.full((8 * 2**20,), float(rank)), peer)
        received = engine.recv(peer).wait(timeout=60)
        sent.wait(timeout=60)
        out["both ways"] = received.numel(), bool((received == peer).all()), sent.bytes_sent
        fp8 = torch.tensor([[1.0, -0.5], [448.0, 2.0**-6]])
        if rank == 0:
            handles = [
                engine.send(torch.arange(6, dtype=torch.int32).view(2, 3), 1, tag=1),
                engine.send(torch.tensor([7.0]), 1, tag=2),
                engine.send(fp8.to(torch.float8_e4m3fn), 1, tag=3),
                engine.send(fp8.to(torch.float8_e5m2), 1, tag=3),
                engine.send(_values(1000), 1, tag=4, codec="e3m0"),
                engine.send(torch.empty(0, 3), 1, tag=5),
            ]
            out["sent"] = [h.wait(timeout=30) is None and h.bytes_sent for h in handles]
        else:
            # Posted in another order than sent; one tag carries two messages, matched in order.
            late, early, *same_tag = (engine.recv(0, tag=t) for t in (2, 1, 3, 3))
            coded, empty = engine.recv(0, tag=4), engine.recv(0, tag=5)
            values = [h.wait(timeout=30) for h in (early, late, *same_tag, coded, empty)]
            out["received"] = [(v.dtype, v.shape, v.float().tolist() if v.numel() < 10 else None) for v in values]
            out["coded"] = torch.equal(
                values[4], get_codec("e3m0").decode(get_codec("e3m0").encode(_values(1000)), 1000)
            )
            out["bytes"] = [h.bytes_received for h in (early, late, *same_tag, coded, empty)]
        # Over the link model (150 ms, 1 MB/s) both ends model the same transfer from its send on.
        slow = CommEngine(dist.group.WORLD, LinkModel.build(2, 150, 8))
        handle = slow.send(torch.zeros(25_000), 1) if rank == 0 else slow.recv(0)
        handle.wait(timeout=30)
        out["link"] = handle.modelled_s, handle.finished_at >= handle.ready_at
        results[rank] = out


def test_point_to_point_over_two_real_processes(tmp_path):
    results = _spawn(_p2p_worker, tmp_path)
    for rank in (0, 1):
        assert results[rank]["both ways"] == (8 * 2**20, True, 96 + 32 * 2**20)
        # A 96-byte header and 100,000 bytes: 0.15 s + 0.100096 s.
        assert results[rank]["link"] == (pytest.approx(0.250096), True)
    fp8 = [[1.0, -0.5], [448.0, 2.0**-6]]
    assert results[1]["received"] == [
        (torch.int32, (2, 3), [[0, 1, 2], [3, 4, 5]]),
        (torch.float32, (1,), [7.0]),
        (torch.float8_e4m3fn, (2, 2), fp8),
        (torch.float8_e5m2, (2, 2), fp8),
        (torch.float32, (1000,), None),
        (torch.float32, (0, 3), []),
    ]
    assert results[1]["coded"]
    # Header + body; the e3m0 body is its encoded size.
    assert results[0]["sent"] == results[1]["bytes"] == [96 + 24, 96 + 4, 96 + 4, 96 + 4, 96 + 532, 96]


def _slow_link_worker(rank: int, store: str, results) -> None:
    # The link is configured at 1 MB/s, so 2 MiB are expected to take 2.1 s: the deadline is
    # 0.5 s + twice that. A peer whose bytes arrive 1.5 s late looks to this rank's backend as a slow
    # link does (the bytes come late); a peer that never sends is silent.
    with gloo_group(rank, store, together=False):
        members = ["region 0", "region 1"]
        engine = CommEngine(
            dist.group.WORLD, name="inter-region", members=members, timeout_s=0.5, expected_link=(0.0, 1e6)
        )
        payload = torch.ones(2**19)
        if rank == 1:
            time.sleep(1.5)
            engine.all_reduce_mean(payload).wait(timeout=30)
            engine.recv(0, tag=9).wait(timeout=60)  # silent until region 0 lets it go
            os._exit(0)
        began = time.perf_counter()
        slow = engine.all_reduce_mean(payload)
        slow.wait()
        out = {"slow": (slow.bytes_sent, time.perf_counter() - began)}
        began = time.perf_counter()
        try:
            engine.all_reduce_mean(payload).wait()
            out["silent"] = ("no error", 0.0)
        except CommError as err:
            out["silent"] = (str(err), time.perf_counter() - began)
        engine.send(torch.ones(1), 1, tag=9).wait(timeout=30)
        results[rank] = out


def test_a_deadline_allows_for_the_transfer_and_still_catches_a_silent_peer(tmp_path):
    out = _spawn(_slow_link_worker, tmp_path)[0]
    sent, seconds = out["slow"]
    assert sent == 4 * (2**19 + 2) and seconds > 1.4  # past the 0.5 s timeout, and not failed
    message, seconds = out["silent"]
    allowance = 2 * sent / 1e6
    assert message == (
        f"all-reduce on the inter-region group (region 0, region 1) did not complete within {0.5 + allowance:.3g} s "
        f"(the timeout and {allowance:.3g} s for its bytes on the link)"
    )
    assert 0.5 + allowance <= seconds < 30


def test_without_a_configured_link_the_deadline_follows_the_measured_rate():
    engine = CommEngine(None, timeout_s=1.0)
    assert engine.allowance_s(10**9) == 0.0  # nothing known yet: the timeout alone
    engine._observe_rate(2**20, 0.5)  # 2 MiB/s
    engine._observe_rate(2**20, 1.0)  # 1 MiB/s: a running mean of the two
    assert engine.allowance_s(3 * 2**19) == 2 * 1.0
    engine._observe_rate(1000, 10.0)  # too small to say anything of the rate
    assert engine.allowance_s(3 * 2**19) == 2 * 1.0
    with_link = CommEngine(None, timeout_s=1.0, expected_link=(0.1, 1e6))
    assert with_link.allowance_s(10**6) == pytest.approx(2 * (0.1 + 1.0))


def _failing_worker(rank: int, store: str, results) -> None:
    def error(wait: Callable[[], object]) -> tuple[str, float]:
        began = time.perf_counter()
        try:
            wait()
        except CommError as err:
            return str(err), time.perf_counter() - began
        return "no error", 0.0

    with gloo_group(rank, store, together=False):
        members = ["region 0", "region 1"]
        engine = CommEngine(dist.group.WORLD, name="inter-region", members=members, timeout_s=0.5)
        if rank == 1:
            engine.recv(0, tag=9).wait(timeout=60)  # region 1 is silent until region 0 lets it go
            os._exit(0)  # and then dies without leaving the group
        out = {
            "silent": error(engine.recv(1).wait),
            "collective": error(engine.all_reduce_mean(torch.ones(3)).wait),
            "barrier": error(engine.barrier),
        }
        engine.send(torch.ones(1), 1, tag=9).wait(timeout=30)
        out["dead"] = error(lambda: engine.recv(1, tag=3).wait(timeout=30))
        out["dead collective"] = error(lambda: engine.all_reduce_mean(torch.ones(3)).wait(timeout=30))
        results[rank] = out


def test_a_silent_or_dead_peer_raises_comm_error_naming_it(tmp_path):
    out = _spawn(_failing_worker, tmp_path)[0]
    group = "the inter-region group (region 0, region 1)"
    assert out["silent"][0] == f"receive from region 1 on {group} (tag 0) did not complete within 0.5 s"
    assert out["collective"][0] == f"all-reduce on {group} did not complete within 0.5 s"
    assert out["barrier"][0] == f"barrier on {group} did not complete within 0.5 s"
    assert out["dead"][0].startswith(f"receive from region 1 on {group} (tag 3) failed: ")
    assert out["dead collective"][0].startswith(f"all-reduce on {group} failed: ")
    for message, seconds in out.values():
        assert "\n" not in message and seconds < 30
