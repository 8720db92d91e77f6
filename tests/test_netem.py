"""The emulated WAN: real network namespaces, a real TUN forwarder (or the kernel's netem), real
packets. Skipped without root or /dev/net/tun; every test removes what it created, pass or fail."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from cocodc import netem

from conftest import FAST, TINY, cocodc, overrides

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/dev/net/tun").exists(), reason="needs root and /dev/net/tun"
)


def namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


@pytest.fixture
def net_name():
    name = f"t{os.getpid() % 100000}"
    yield name
    netem.down(name)
    assert not {ns for ns in namespaces() if ns.startswith(f"{name}-")}


def test_kernel_backend_commands_shape_every_pair():
    # Region 0 -> 1: 100 ms (+-5) at 100 Mbit/s. netem's packet limit must hold the bandwidth-delay
    # product: 12.5 MB/s x 2 x 0.105 s / 9000 B = 291.7 packets, x4 headroom = 1167.
    spec = netem.NetemSpec("k", 2, latency_ms=100, bandwidth_mbps=100, jitter_ms=5, loss_pct=0.5)
    commands = [" ".join(c) for c in netem.kernel_commands(spec)]
    assert "tc -n k-r0 class add dev wan0 parent 1: classid 1:b htb rate 100mbit" in commands
    assert "tc -n k-r0 qdisc add dev wan0 parent 1:b netem delay 100ms 5ms loss 0.5% limit 1167" in commands
    assert any(c.startswith("tc -n k-r1 filter") and "match ip dst 10.77.0.100/32 flowid 1:a" in c for c in commands)
    assert sum("netem delay" in c for c in commands) == 2  # one per one-way link


def test_bad_network_specs_are_named():
    with pytest.raises(netem.NetemError, match="network name 'Bad!'"):
        netem.NetemSpec("Bad!", 2)
    with pytest.raises(netem.NetemError, match="2 to 100 regions"):
        netem.NetemSpec("ok", 1)
    with pytest.raises(netem.NetemError, match="3 x 3 matrix"):
        netem.NetemSpec("ok", 3, latency_ms=[[0, 1], [1, 0]])


@needs_root
def test_round_trips_match_the_set_delays(net_name, tmp_path):
    # Three regions with a different one-way delay on every pair, set up through the command line.
    latency = [[0, 10, 30], [10, 0, 20], [30, 20, 0]]
    up = cocodc(
        "netem", "up", "--name", net_name, "--regions", "3", "--latency-ms", json.dumps(latency),
        "--bandwidth-mbps", "100", cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    assert {f"{net_name}-r{m}" for m in range(3)} <= namespaces()
    assert "measured round trip 0 <-> 2" in up.stdout
    for src, dst in [(0, 1), (0, 2), (1, 2)]:
        expected = latency[src][dst] + latency[dst][src]
        assert netem.measure_rtt(net_name, src, dst) * 1e3 == pytest.approx(expected, rel=0.1)
    again = cocodc("netem", "up", "--name", net_name, "--regions", "2", cwd=tmp_path, timeout=60)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "exists" in again.stderr
    down = cocodc("netem", "down", "--name", net_name, cwd=tmp_path, timeout=60)
    assert down.returncode == 0 and f"removed {net_name}" in down.stdout
    assert not {ns for ns in namespaces() if ns.startswith(f"{net_name}-")}


@needs_root
def test_training_across_emulated_regions(tmp_path):
    # `cocodc train` brings the network up, runs one torchrun node per namespace over gloo, and
    # takes the network down. Every sync is an all-reduce across the 40 ms link: at least a round trip.
    before = namespaces()
    args = overrides(
        *FAST, "train.steps=8", "sync.sync_every=4", "eval.every=0", "checkpoint.every=0",
        "wan.emulation=netem", "wan.latency_ms=40", "wan.bandwidth_mbps=50", "run.dir=runs",
    )  # fmt: skip
    result = cocodc("train", "-c", TINY, *args, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "emulated WAN" in result.stdout
    assert namespaces() == before
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["regions"] == 2 and summary["steps"] == 8
    records = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    syncs = [r for r in records if r["kind"] == "sync"]
    assert sorted((r["region"], r["apply_step"]) for r in syncs) == [(0, 4), (0, 8), (1, 4), (1, 8)]
    assert all(r["comm_s"] >= 0.08 and r["modelled_s"] == 0.0 for r in syncs)
