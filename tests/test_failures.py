"""A rank that dies or a region that falls silent: every other rank exits within the bound, with one
clear line each, a rescue of its state, and nothing left running. Real torchrun, real processes,
real network namespaces (the silent link; skipped without root and /dev/net/tun)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cocodc.metrics import read_records

from conftest import FAST, REPO, TINY, overrides

pytestmark = pytest.mark.slow  # every test here launches a run under torchrun

FEDERATED, SPLIT = str(REPO / "configs" / "federated.yaml"), str(REPO / "configs" / "split.yaml")

TIMEOUT_S = 8  # topology.timeout_s of these runs: the bound on noticing a silent peer


def start(root: Path, *settings: str, config: str = TINY) -> subprocess.Popen:
    args = overrides(*FAST, "train.steps=100000", "eval.every=0", "checkpoint.every=5", "sync.sync_every=4",
                     f"topology.timeout_s={TIMEOUT_S}", f"run.dir={root}", "run.name=lost", *settings)  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "cocodc.cli", "train", "-c", config, *args]
    return subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run: Path, step: int, launcher: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        metrics = run / "metrics.jsonl"
        if metrics.exists() and any(r["kind"] == "train" and r["step"] >= step for r in read_records(metrics)):
            return
        time.sleep(0.2)
    raise AssertionError(f"the run did not reach step {step}")


def processes_of(run: Path) -> dict[int, dict[str, str]]:
    """pid -> environment of every process whose command line names this run's directory."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if str(run.parent).encode() not in (entry / "cmdline").read_bytes():
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        found[int(entry.name)] = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
    return found


def finish(launcher: subprocess.Popen, run: Path, bound: float) -> str:
    began = time.monotonic()
    try:
        _, stderr = launcher.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        for pid in processes_of(run):
            os.kill(pid, signal.SIGKILL)
        launcher.kill()
        raise AssertionError(f"the run was still running {bound} s after the failure") from None
    assert launcher.returncode != 0
    assert time.monotonic() - began < bound
    assert "Traceback" not in stderr, stderr[-3000:]
    deadline = time.monotonic() + 10
    while processes_of(run) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_of(run), "processes were left behind"
    return stderr


# A survivor either finds its peer lost (and names the group, its members, what failed), hears it
# from the backend in a collective no engine ran (which names no group), or is stopped by torchrun
# first, which stops every worker once one has failed (during a checkpoint save, say).
RANK_LINE = re.compile(
    r"cocodc: error: (.+ on the [\w-]+ group \([^)]+\).*|a collective outside the comm engine failed: .*"
    r"Connection (closed|reset) by peer.*|stopped by SIGTERM) at step (?P<step>\d+); "
    r"this rank's state is in "
    r"(?P<rescue>\S+/rescue/rank(?P<rank>\d+)-step(?P=step)\.pt); the last complete checkpoint is step (?P<last>\d+) "
    r"\(--resume continues it\)"
)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("cocodc: error:")]


CASES = {  # name: (config, settings, what of the mode a rescue holds)
    "diloco": (TINY, ["topology.regions=3", "sync.method=diloco"], {"global_params"}),
    "ddp": (TINY, ["topology.regions=3", "sync.method=ddp"], set()),  # the all-reduce fails inside backward
    "federated": (FEDERATED, ["federated.rounds=100000", "federated.local_steps=2"], {"global_vector"}),
    "split": (SPLIT, ["split.cut=1"], set()),  # rank 1: an executor
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_killed_rank_ends_the_run_with_one_line_per_rank(tmp_path, case):
    config, settings, mode_state = CASES[case]
    launcher = start(tmp_path, *settings, config=config)
    run = tmp_path / "lost"
    wait_for_step(run, 6, launcher)
    victim = next(pid for pid, env in processes_of(run).items() if env.get("RANK") == "1")
    os.kill(victim, signal.SIGKILL)
    stderr = finish(launcher, run, bound=TIMEOUT_S + 60)
    lines = error_lines(stderr)
    # The launcher's line last, naming the rank killed (not a survivor that reported first); before it
    # one line from each surviving rank (never two run together): why it stopped, at which step, where
    # its state went, and what to resume from.
    assert lines[-1] == "cocodc: error: rank 1 was killed by SIGKILL first; the run stopped", stderr[-3000:]
    said = [RANK_LINE.fullmatch(line) for line in lines[:-1]]
    assert all(said) and sorted(int(m["rank"]) for m in said) == [0, 2], stderr[-3000:]
    for m in said:
        assert Path(m["rescue"]).is_file()
        assert int(m["last"]) % 5 == 0 and 5 <= int(m["last"]) <= int(m["step"])  # checkpoint.every=5
    rescued = sorted((run / "checkpoints" / "rescue").iterdir())
    assert {path.name.split("-")[0] for path in rescued} <= {"rank0", "rank2"} and rescued
    state = torch.load(rescued[0], weights_only=True)
    assert {"model", "optimizer", "data"} <= set(state) and set(state) & {
        "global_params",
        "global_vector",
    } == mode_state


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/dev/net/tun").exists(), reason="needs root and /dev/net/tun"
)


def namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


@needs_root
def test_a_silent_region_is_noticed_within_the_timeout(tmp_path):
    # Regions in namespaces; region 1's wan0 goes down mid-run. No process dies, no connection is
    # reset: only the timeout can tell, and it must, on both sides.
    before = namespaces()
    launcher = start(tmp_path, "wan.emulation=netem", "wan.latency_ms=5", "sync.method=streaming",
                     "sync.fragments=2", "sync.delay=1")  # fmt: skip
    run = tmp_path / "lost"
    try:
        wait_for_step(run, 10, launcher)
        subprocess.run(["ip", "-n", f"c{launcher.pid}-r1", "link", "set", "wan0", "down"], check=True)
        # The bound: every process of the job (the nodes, their workers, the network's server) gone
        # within timeout_s + 15 s of the first rank's report (its rescue). The agent of the silent
        # region cannot reach the rendezvous across its dead link: the launcher must end it.
        rescues = run / "checkpoints" / "rescue"
        deadline = time.monotonic() + 3 * TIMEOUT_S + 60
        while not (rescues.exists() and any(rescues.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.1)
        reported = time.monotonic()
        stderr = finish(launcher, run, bound=TIMEOUT_S + 15)
        gone_s = time.monotonic() - reported
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        subprocess.run([sys.executable, "-m", "cocodc.cli", "netem", "down", "--name", f"c{launcher.pid}"],
                       capture_output=True)  # fmt: skip
    lines = error_lines(stderr)
    # The engine's deadline says "did not complete within"; gloo's own timeout, should it come
    # first on a loaded machine, "Timed out": both name the group.
    assert lines and all(" group " in line for line in lines[:-1]), stderr[-3000:]
    assert any("did not complete within" in line or "Timed out" in line for line in lines), stderr[-3000:]
    assert namespaces() == before
    assert sorted(p.name.split("-")[0] for p in (run / "checkpoints" / "rescue").iterdir()) == ["rank0", "rank1"]
    assert gone_s < TIMEOUT_S + 15, gone_s
    print(f"every process gone {gone_s:.1f} s after the first report (timeout_s {TIMEOUT_S})")


def test_the_fault_drills_parse_one_grammar():
    from cocodc.config import ConfigError
    from cocodc.modes.faults import parse_faults

    assert parse_faults(" raise:3, nan:5 ", {"raise": False, "nan": False}) == {3: ("raise", None), 5: ("nan", None)}
    assert parse_faults("sigkill:1@66,sigkill:2@7", {"sigkill": True}) == {1: ("sigkill", 66), 2: ("sigkill", 7)}
    assert parse_faults("", {"sigkill": True}) == {}
    for text, kinds in [
        ("sigkill:1", {"sigkill": True}),  # a drill that kills names its step
        ("raise:3@5", {"raise": False}),  # one that strikes every time does not
        ("sigkill:1@x", {"sigkill": True}),
        ("raise:3", {"sigkill": True}),  # not a fault of this mode
    ]:
        with pytest.raises(ConfigError, match=rf"^COCODC_FAULTS: '{text}' is not "):
            parse_faults(text, kinds)
