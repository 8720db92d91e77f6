"""The link model by hand: ring, broadcast and all-to-all times, and FIFO queueing on shared links."""

import pytest

from cocodc.comm.wan import LinkModel


def test_ring_and_broadcast_times_by_hand():
    # 2 regions, 100 ms one-way, 100 Mbit/s = 12.5 MB/s. A ring all-reduce of 1.25 MB: 2 steps of
    # (0.1 s + 0.625 MB / 12.5 MB/s) = 0.3 s; an all-gather of 1.25 MB: 1 step of 0.2 s.
    assert LinkModel.build(2, 100, 100).all_reduce(1_250_000, now=0.0) == pytest.approx(0.3)
    assert LinkModel.build(2, 100, 100).all_gather(1_250_000, now=0.0) == pytest.approx(0.2)
    assert LinkModel.build(2, 100, 100).transfer(0, 1, 125_000, now=5.0) == pytest.approx(5.11)
    assert LinkModel.build(2, 100, 100).broadcast(1_250_000, src=1, now=0.0) == pytest.approx(0.2)
    assert LinkModel.build(2, 0, 0).all_reduce(10**9, now=1.0) == 1.0


def test_ring_is_held_back_by_its_slowest_link():
    # Three regions; the ring 0->1->2->0 is held back by its slowest link, 2->0 (300 ms, 10 Mbit/s).
    latency = [[0, 10, 50], [10, 0, 20], [300, 20, 0]]
    bandwidth = [[0, 100, 100], [100, 0, 100], [10, 100, 0]]
    step = 0.3 + 125_000 / 1.25e6
    assert LinkModel.build(3, latency, bandwidth).all_gather(125_000, now=0.0) == pytest.approx(2 * step)
    assert LinkModel.build(3, latency, bandwidth).transfer(0, 2, 0, now=0.0) == pytest.approx(0.05)
    # An all-to-all sends over every link at once; the slowest is 2 -> 0 again.
    assert LinkModel.build(3, latency, bandwidth).all_to_all(125_000, now=0.0) == pytest.approx(step)
    with pytest.raises(ValueError, match="3 x 3 matrix"):
        LinkModel.build(3, [[0, 1], [1, 0]], 100)


def test_jitter_stays_within_bounds():
    link = LinkModel.build(2, 100, 0, jitter_ms=20, seed=3)
    draws = [link.transfer(0, 1, 0, now=0.0) for _ in range(200)]
    assert min(draws) >= 0.08 and max(draws) <= 0.12 and len(set(draws)) > 100


def test_transfers_sharing_a_link_queue_fifo():
    # 10 ms, 8 Mbit/s = 1 MB/s: 100 kB take 0.1 s on the wire. Started at 0, 0.05 and 0.3 s:
    # the first leaves at 0.1 and arrives at 0.11; the second waits for the link until 0.1,
    # leaves at 0.2 and arrives at 0.21 (0.16 after its start); by 0.3 the link is free again.
    link = LinkModel.build(2, 10, 8)
    arrivals = [link.transfer(0, 1, 100_000, now=t) for t in (0.0, 0.05, 0.3)]
    assert arrivals == [pytest.approx(0.11), pytest.approx(0.21), pytest.approx(0.41)]
    # The other direction is a link of its own.
    assert link.transfer(1, 0, 100_000, now=0.05) == pytest.approx(0.16)


def test_collectives_reserve_the_ring_links():
    # 100 ms, 12.5 MB/s. An all-reduce of 1.25 MB at 0: step 1 serialises 0-0.05, arrives 0.15;
    # step 2 serialises 0.15-0.2, arrives 0.3. A 125 kB message at 0.16 waits for the link until
    # 0.2, serialises until 0.21 and arrives at 0.31, 0.05 s later than on an idle link.
    link = LinkModel.build(2, 100, 100)
    assert link.all_reduce(1_250_000, now=0.0) == pytest.approx(0.3)
    assert link.transfer(0, 1, 125_000, now=0.16) == pytest.approx(0.31)
    # A broadcast starts when every hop is free (0.21 on 0 -> 1), then takes 0.1 + 0.1 s.
    assert link.broadcast(1_250_000, src=0, now=0.2) == pytest.approx(0.41)


def test_ranks_of_one_region_share_its_link():
    # Ranks 0, 1 in region 0 and 2, 3 in region 1: 0 -> 2 and 1 -> 3 queue on one link; the
    # local link 0 -> 1 is instant.
    link = LinkModel.build(2, 10, 8).for_ranks([0, 0, 1, 1])
    assert link.size == 4 and link.latency_s[0][1] == 0.0 and link.bandwidth_Bps[3][0] == pytest.approx(1e6)
    assert link.transfer(0, 2, 100_000, now=0.0) == pytest.approx(0.11)
    assert link.transfer(1, 3, 100_000, now=0.0) == pytest.approx(0.21)
    assert link.transfer(0, 1, 10**9, now=0.0) == 0.0
