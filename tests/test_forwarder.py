"""The emulated WAN's user-space forwarder, knob by knob: when it schedules each packet it routes
(pacing at the link's rate, the delay, the jitter, the loss, the buffer's tail drop), computed on
packets handed to it in process. No namespace and no clock: `route(src, packet, now)` is given
the time, and what it decides is in its queue."""

import os
import statistics

import pytest

from cocodc import netem


def packet(dst: int, size: int = 1500) -> bytes:
    """An IPv4 packet to region `dst` (10.77.0.<100 + dst>), `size` bytes long."""
    header = bytes([0x45]) + bytes(15) + bytes([10, 77, 0, 100 + dst])
    return header + bytes(size - len(header))


def forwarder(**link: float) -> netem.Forwarder:
    return netem.Forwarder(netem.NetemSpec("f", 2, **link), fds=[-1, -1], seed=0)


def arrivals(fwd: netem.Forwarder) -> list[float]:
    return sorted(arrival for arrival, *_ in fwd.queue)


def test_back_to_back_packets_leave_at_the_links_rate_and_arrive_a_delay_later():
    # 8 Mbit/s = 1 MB/s: a 1500-byte packet takes 1.5 ms to send; the delay is 20 ms.
    fwd = forwarder(latency_ms=20, bandwidth_mbps=8)
    for _ in range(10):
        fwd.route(0, packet(1), now=1.0)
    assert arrivals(fwd) == pytest.approx([1.0 + 0.0015 * k + 0.020 for k in range(1, 11)], abs=1e-12)
    # Once the link has drained, a packet leaves as it comes.
    fwd.route(0, packet(1), now=2.0)
    assert max(arrivals(fwd)) == pytest.approx(2.0 + 0.0015 + 0.020, abs=1e-12)


def test_a_full_buffer_drops_the_tail():
    # The buffer holds 50 ms of sending (twice a 5 ms delay is less): at 1.5 ms a packet, the 35th
    # packet routed at once would wait 51 ms to leave, and is dropped.
    fwd = forwarder(latency_ms=5, bandwidth_mbps=8)
    for _ in range(40):
        fwd.route(0, packet(1), now=0.0)
    assert len(fwd.queue) == 34


def test_jitter_draws_each_delay_within_its_bound_and_never_reorders():
    # Packets 50 ms apart, more than the jitter's whole range: each delay is its own draw.
    fwd = forwarder(latency_ms=30, jitter_ms=10)
    times = [0.05 * k for k in range(2000)]
    for now in times:
        fwd.route(0, packet(1, size=100), now=now)
    delays = [arrival - now for (arrival, *_), now in zip(sorted(fwd.queue, key=lambda q: q[1]), times, strict=True)]
    assert all(0.020 - 1e-12 <= d <= 0.040 + 1e-12 for d in delays)
    # Uniform over 30 +- 10 ms: mean 30 ms (its standard error 0.13 ms), spread 20 / sqrt(12) = 5.8 ms.
    assert statistics.mean(delays) == pytest.approx(0.030, abs=0.0007)
    assert statistics.pstdev(delays) == pytest.approx(0.020 / 12**0.5, rel=0.1)
    # Packets 1 ms apart: a late draw holds the ones behind it, as a FIFO link does.
    dense = forwarder(latency_ms=30, jitter_ms=10)
    for k in range(500):
        dense.route(0, packet(1, size=100), now=0.001 * k)
    in_order = [arrival for arrival, *_ in sorted(dense.queue, key=lambda q: q[1])]
    assert in_order == sorted(in_order) and len(set(in_order)) < len(in_order)


def test_loss_drops_its_share_of_packets():
    fwd = forwarder(latency_ms=1, loss_pct=20)
    for k in range(10_000):
        fwd.route(0, packet(1, size=60), now=k * 0.01)
    # Binomial(10000, 0.8): standard deviation 40; five of them either way.
    assert abs(len(fwd.queue) - 8000) <= 200


def test_only_ipv4_packets_between_regions_are_forwarded():
    fwd = forwarder(latency_ms=1)
    fwd.route(0, bytes([0x60]) + bytes(59), now=0.0)  # IPv6
    fwd.route(0, packet(0), now=0.0)  # to itself
    fwd.route(0, packet(5), now=0.0)  # no such region
    fwd.route(0, bytes([0x45]) + bytes(15) + bytes([10, 78, 0, 101]) + bytes(40), now=0.0)  # another subnet
    assert fwd.queue == []
    fwd.route(0, packet(1), now=0.0)
    assert [dst for _, _, dst, _ in fwd.queue] == [1]


@pytest.mark.skipif(
    os.geteuid() != 0 or not netem.kernel_has_netem(),
    reason="the kernel backend needs root and a kernel with the netem qdisc (this one has none)",
)
def test_the_kernel_backend_delays_round_trips_as_set():
    spec = netem.NetemSpec(f"k{os.getpid() % 100000}", 2, latency_ms=20)
    netem.up(spec, backend="kernel")
    try:
        assert 0.040 <= netem.measure_rtt(spec.name, 0, 1) < 0.400
    finally:
        netem.down(spec.name)
