"""The emulated WAN: real network namespaces, a real TUN forwarder (or the kernel's netem), real
packets. Skipped without root or /dev/net/tun; every test removes what it created, pass or fail."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import pytest

from cocodc import netem
from cocodc.metrics import read_records

from conftest import FAST, TINY, cocodc, one_line_error, overrides

pytestmark = pytest.mark.slow  # every test here brings up an emulated WAN

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/dev/net/tun").exists(), reason="needs root and /dev/net/tun"
)


def namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def until(condition: Callable[[], object], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def pids_matching(pattern: str) -> set[int]:
    listing = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return {int(pid) for pid in listing.split()}


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
    # The forwarder outlives the command that started it: the network is up until `netem down`.
    assert netem.read_state(net_name)["owner"] is None
    for src, dst in [(0, 1), (0, 2), (1, 2)]:
        expected = latency[src][dst] + latency[dst][src]
        # The forwarder never delivers early (its schedule is tested exactly in test_forwarder.py);
        # late by its loop and the probes' threads: a few ms here, bounded at the delay again.
        assert 0.95 * expected <= netem.measure_rtt(net_name, src, dst) * 1e3 < 2 * expected
    again = cocodc("netem", "up", "--name", net_name, "--regions", "2", cwd=tmp_path, timeout=60)
    assert "exists" in one_line_error(again)
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
    records = read_records(tmp_path / "runs" / "tiny" / "metrics.jsonl")
    syncs = [r for r in records if r["kind"] == "sync"]
    assert sorted((r["region"], r["apply_step"]) for r in syncs) == [(0, 4), (0, 8), (1, 4), (1, 8)]
    assert all(r["comm_s"] >= 0.08 and r["modelled_s"] == 0.0 for r in syncs)


@needs_root
def test_a_region_killed_across_the_emulated_wan_heals_over_it(tmp_path):
    # ft over netem: each region's job in its namespace, the lighthouse in region 0's; region 1 is
    # killed by SIGKILL after a send, restarted, and heals from region 0 over the 100 ms link.
    pytest.importorskip("torchft")
    before = namespaces()
    args = overrides(
        *FAST, "train.steps=120", "eval.every=0", "checkpoint.every=0", "sync.method=streaming",
        "sync.fragments=2", "sync.sync_every=8", "sync.delay=2", "ft.enabled=true",
        "wan.emulation=netem", "wan.latency_ms=100", "run.dir=runs",
    )  # fmt: skip
    result = cocodc("train", "-c", TINY, *args, cwd=tmp_path, timeout=300, env={"COCODC_FAULTS": "sigkill:1@14"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert namespaces() == before
    records = read_records(tmp_path / "runs" / "tiny" / "metrics.jsonl")
    healed = [r for r in records if r["kind"] == "membership" and r["healed"]]
    assert [(r["region"], r["regions"]) for r in healed] == [(1, [0, 1])]
    summaries = [
        json.loads((tmp_path / "runs" / "tiny" / name).read_text()) for name in ("summary.json", "summary-region1.json")
    ]
    assert summaries[0]["final_eval_loss"] == summaries[1]["final_eval_loss"]


@needs_root
def test_a_network_up_for_a_run_goes_down_when_its_process_is_killed():
    # The process that brought the network up dies by SIGKILL, leaving a process of its own in
    # region 1. The kernel tells the forwarder, which keeps the network up while that process
    # lives (a run's nodes stop over it), then removes the namespaces and the state file.
    name = f"o{os.getpid() % 100000}"
    script = textwrap.dedent(f"""
        import subprocess
        from cocodc import netem
        netem.up(netem.NetemSpec({name!r}, 2, latency_ms=1), ends_with_caller=True)
        print(subprocess.Popen(["ip", "netns", "exec", "{name}-r1", "sleep", "60"]).pid, flush=True)
        input()
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    forwarder = f'"name": "{name}"'  # in its arguments
    left = int(owner.stdout.readline() or 0)
    try:
        assert left and netem.read_state(name)["owner"] == owner.pid and pids_matching(forwarder)
        owner.kill()
        owner.wait()
        assert netem.measure_rtt(name, 0, 1) > 0.0015
        os.kill(left, signal.SIGKILL)
        assert until(lambda: not pids_matching(forwarder), 10)
        assert not netem.state_path(name).exists()
        assert not {ns for ns in namespaces() if ns.startswith(f"{name}-")}
    finally:
        owner.kill()
        owner.wait()
        if left:
            with suppress(ProcessLookupError):
                os.kill(left, signal.SIGKILL)
        netem.down(name)


class Run:
    """`cocodc train` over a 2-region emulated WAN, in the background, with more steps than any
    test waits for; its stderr goes to a file (a pipe nobody reads would fill and stall it)."""

    def __init__(self, tmp_path: Path):
        self.root = tmp_path / "runs"
        args = overrides(
            *FAST, "train.steps=100000", "eval.every=0", "checkpoint.every=0", "wan.emulation=netem",
            "wan.latency_ms=5", f"run.dir={self.root}",
        )  # fmt: skip
        self.err = tmp_path / "stderr"
        env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
        with open(self.err, "w") as err:
            self.launcher = subprocess.Popen(
                [sys.executable, "-m", "cocodc.cli", "train", "-c", TINY, *args],
                cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        self.name = f"c{self.launcher.pid}"

    def wait_until_training(self) -> None:
        def started() -> bool:
            return any(path.stat().st_size for path in self.root.glob("*/metrics.jsonl"))

        assert until(lambda: started() or self.launcher.poll() is not None, 180), "no training within 180 s"
        assert self.launcher.poll() is None, self.err.read_text()[-3000:]
        assert {netem.namespace(self.name, m) for m in range(2)} <= namespaces()

    def processes(self) -> set[int]:
        """The nodes and their workers (their arguments name the run directory) and the forwarder."""
        return pids_matching(str(self.root)) | pids_matching(f'"name": "{self.name}"')

    def gone(self) -> bool:
        left = {ns for ns in namespaces() if ns.startswith(f"{self.name}-")}
        return not left and not self.processes() and not netem.state_path(self.name).exists()

    def leftovers(self) -> str:
        pids = ",".join(map(str, self.processes())) or "0"
        ps = subprocess.run(["ps", "-o", "pid,ppid,stat,args", "-p", pids], capture_output=True, text=True).stdout
        return f"{ps}namespaces: {namespaces()}\n{self.err.read_text()[-3000:]}"

    def remove(self) -> None:
        self.launcher.kill()
        self.launcher.wait()
        for pid in self.processes():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        netem.down(self.name)


@pytest.fixture
def run(tmp_path):
    run = Run(tmp_path)
    yield run
    run.remove()


@needs_root
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_launcher_stops_the_run_and_takes_the_network_down(run, signum):
    # A scheduler's preemption (SIGTERM) or a Ctrl-C (SIGINT) to the launcher alone: it stops the
    # nodes, takes the network down and says so in one line.
    run.wait_until_training()
    run.launcher.send_signal(signum)
    assert run.launcher.wait(timeout=90) == 128 + signum
    stderr = run.err.read_text()
    assert stderr.rstrip().splitlines()[-1].startswith(f"cocodc: error: interrupted by {signum.name}; "), stderr[-3000:]
    assert stderr.count("interrupted by") == 1 and "Traceback" not in stderr
    assert until(run.gone, 10)


@needs_root
def test_killing_the_launcher_leaves_nothing_running(run):
    # SIGKILL: the launcher cannot clean up. The kernel's death signal tells the nodes, which stop
    # their workers, and the forwarder, which keeps the network until they have, then removes it.
    run.wait_until_training()
    run.launcher.kill()
    run.launcher.wait()
    assert until(run.gone, 90), run.leftovers()
