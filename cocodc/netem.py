"""An emulated WAN on one host: one network namespace per region, joined by links with one-way
delay, jitter, loss and rate per pair of regions.

Region m lives in namespace `<name>-r<m>` with interface `wan0` at 10.77.0.<100+m> (three digits,
so that addresses sort as regions do: torchrun's c10d rendezvous ranks nodes by address). Two
backends:
- `kernel` (where the kernel has the netem qdisc): veth pairs into a bridge namespace; each
  region's egress gets one htb class per destination (the rate) with a netem leaf (delay, jitter,
  loss; its packet limit above the bandwidth-delay product).
- `tun` (no netem, as on hosts whose kernel lacks it): a TUN device per region and a user-space
  forwarder process (`serve`) that paces every packet at the link's rate, holds it for the
  link's delay (jitter drawn uniformly from [-jitter, +jitter], order kept), drops it with the
  loss probability and writes it into the destination region.
The state of a running network is kept in /run/cocodc-netem/<name>.json. A network brought up for
one run (`up(..., ends_with_caller=True)`) has a server process under either backend, which the
kernel tells when the run's process ends, even by SIGKILL, and which then takes the network down.
"""

from __future__ import annotations

import ctypes
import heapq
import json
import math
import os
import random
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from cocodc.comm.wan import LinkModel

STATE_DIR = Path("/run/cocodc-netem")
MTU = 9000
INTERFACE = "wan0"
# How long a run's processes get to stop when told to, before they are killed: a torchrun agent
# gives its workers 30 s.
STOP_GRACE_S = 40.0


class NetemError(RuntimeError):
    """The emulated network cannot be set up or found; the message is shown to the user as is."""


@dataclass
class NetemSpec:
    name: str
    regions: int
    latency_ms: float | list[list[float]] = 0.0
    bandwidth_mbps: float | list[list[float]] = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,9}", self.name):
            raise NetemError(f"network name {self.name!r} must be 1-10 lowercase letters or digits, starting a letter")
        if not 2 <= self.regions <= 100:
            raise NetemError(f"an emulated WAN needs 2 to 100 regions; got {self.regions}")
        if not 0 <= self.loss_pct < 100:
            raise NetemError(f"loss must lie in [0, 100) percent; got {self.loss_pct}")
        try:
            self.links()
        except ValueError as err:
            raise NetemError(str(err)) from None

    def links(self) -> LinkModel:
        return LinkModel.build(self.regions, self.latency_ms, self.bandwidth_mbps, self.jitter_ms)


def address(region: int) -> str:
    return f"10.77.0.{100 + region}"


def namespace(name: str, region: int) -> str:
    return f"{name}-r{region}"


def state_path(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def _log_path(name: str) -> Path:
    return STATE_DIR / f"{name}.log"


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise NetemError(f"`{' '.join(command)}` failed: {result.stderr.strip() or result.returncode}")


def check_host() -> None:
    if os.geteuid() != 0:
        raise NetemError("an emulated WAN needs root (network namespaces)")
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            raise NetemError(f"an emulated WAN needs the `{tool}` command (iproute2)")


def kernel_has_netem() -> bool:
    probe = f"cocodcprobe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode:
        return False
    try:
        subprocess.run(["ip", "-n", probe, "link", "set", "lo", "up"], capture_output=True)
        tc = ["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]
        return subprocess.run(tc, capture_output=True).returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def _namespace_commands(spec: NetemSpec, region: int) -> list[list[str]]:
    ns = namespace(spec.name, region)
    return [
        ["ip", "-n", ns, "addr", "add", f"{address(region)}/24", "dev", INTERFACE],
        ["ip", "-n", ns, "link", "set", INTERFACE, "mtu", str(MTU), "up"],
    ]


def kernel_commands(spec: NetemSpec) -> list[list[str]]:
    """The `ip` and `tc` commands of the kernel backend, after the region namespaces exist."""
    bridge_ns = f"{spec.name}-wan"
    links = spec.links()
    commands = [
        ["ip", "netns", "add", bridge_ns],
        ["ip", "-n", bridge_ns, "link", "add", "br0", "type", "bridge"],
        ["ip", "-n", bridge_ns, "link", "set", "br0", "up"],
    ]
    for i in range(spec.regions):
        ns, peer = namespace(spec.name, i), f"v{i}"
        qdisc = ["tc", "-n", ns, "qdisc", "add", "dev", INTERFACE]
        tc_class = ["tc", "-n", ns, "class", "add", "dev", INTERFACE]
        tc_filter = ["tc", "-n", ns, "filter", "add", "dev", INTERFACE, "parent", "1:", "protocol", "ip", "prio", "1"]
        commands += [
            ["ip", "-n", bridge_ns, "link", "add", peer, "type", "veth", "peer", "name", INTERFACE, "netns", ns],
            ["ip", "-n", bridge_ns, "link", "set", peer, "master", "br0", "mtu", str(MTU), "up"],
            *_namespace_commands(spec, i),
            [*qdisc, "root", "handle", "1:", "htb", "default", "1"],
            [*tc_class, "parent", "1:", "classid", "1:1", "htb", "rate", "100gbit"],
        ]
        for j in range(spec.regions):
            if j == i:
                continue
            latency_ms, rate_bps = links.latency_s[i][j] * 1e3, links.bandwidth_Bps[i][j] * 8
            rate = f"{rate_bps / 1e6:g}mbit" if rate_bps > 0 else "100gbit"
            # netem's queue must hold a bandwidth-delay product of packets, with room to spare.
            bdp_packets = rate_bps / 8 * 2 * (links.latency_s[i][j] + links.jitter_s) / MTU if rate_bps else 0
            limit = max(1000, math.ceil(4 * bdp_packets))
            netem = ["delay", f"{latency_ms:g}ms", f"{links.jitter_s * 1e3:g}ms", "loss", f"{spec.loss_pct:g}%"]
            classid = f"1:{10 + j:x}"
            commands += [
                [*tc_class, "parent", "1:", "classid", classid, "htb", "rate", rate],
                [*qdisc, "parent", classid, "netem", *netem, "limit", str(limit)],
                [*tc_filter, "u32", "match", "ip", "dst", f"{address(j)}/32", "flowid", classid],
            ]
    return commands


def _add_namespaces(spec: NetemSpec) -> None:
    for region in range(spec.regions):
        ns = namespace(spec.name, region)
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")


def _add_kernel_links(spec: NetemSpec) -> None:
    for command in kernel_commands(spec):
        _run(*command)


def _add_tun_links(spec: NetemSpec) -> list[int]:
    """One TUN device per region, moved into its namespace as wan0; returns their descriptors."""
    fds = []
    for region in range(spec.regions):
        ns, device = namespace(spec.name, region), f"{spec.name}t{region}"
        fds.append(_open_tun(device))
        _run("ip", "link", "set", device, "netns", ns)
        _run("ip", "-n", ns, "link", "set", device, "name", INTERFACE)
        for command in _namespace_commands(spec, region):
            _run(*command)
    return fds


def up(spec: NetemSpec, backend: str = "auto", timeout_s: float = 30.0, ends_with_caller: bool = False) -> dict:
    """Create the namespaces and links; returns the network's state (also written to its file).

    The network stays up until `down`, or with `ends_with_caller` until the calling process ends,
    however it ends: its server process is then told by the kernel and takes the network down."""
    check_host()
    if state_path(spec.name).exists() or spec.name in _namespaces_of(spec.name):
        raise NetemError(
            f"an emulated network named {spec.name!r} exists; `cocodc netem down --name {spec.name}` first"
        )
    if backend == "auto":
        backend = "kernel" if kernel_has_netem() else "tun"
    if backend == "tun" and not Path("/dev/net/tun").exists():
        raise NetemError("the kernel has no netem qdisc and /dev/net/tun is missing: no way to emulate a WAN here")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state = {"spec": asdict(spec), "backend": backend, "pid": None, "owner": os.getpid() if ends_with_caller else None}
    if backend == "kernel" and not ends_with_caller:  # the kernel keeps it: no process needed
        try:
            _add_namespaces(spec)
            _add_kernel_links(spec)
        except NetemError:
            _delete_namespaces(spec.name)
            raise
        _write_state(spec.name, state)
        return state
    return _start_server(state, timeout_s)


def _start_server(state: dict, timeout_s: float) -> dict:
    name = state["spec"]["name"]
    log = _log_path(name)
    with open(log, "w") as log_file:
        # Its own session: a Ctrl-C at the terminal must not take the network from under the nodes.
        server = subprocess.Popen(
            [sys.executable, "-m", "cocodc.netem", json.dumps(state)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not state_path(name).exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise NetemError(
                    f"the network server did not start: {log.read_text().strip().splitlines()[-1:] or 'timeout'}"
                )
            time.sleep(0.05)
    except BaseException:  # a signal too: nothing may be left behind
        server.kill()
        server.wait()
        _delete_namespaces(name)
        state_path(name).unlink(missing_ok=True)
        raise
    return read_state(name)


def _write_state(name: str, state: dict) -> None:
    tmp = state_path(name).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(state_path(name))


def read_state(name: str) -> dict:
    try:
        return json.loads(state_path(name).read_text())
    except FileNotFoundError:
        raise NetemError(f"no emulated network named {name!r} is up (`cocodc netem up` starts one)") from None


def _namespaces_of(name: str) -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in listing.splitlines() if line.strip()]
    return [ns for ns in names if re.fullmatch(rf"{re.escape(name)}-(r\d+|wan)", ns)]


def _delete_namespaces(name: str) -> None:
    for ns in _namespaces_of(name):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def down(name: str) -> bool:
    """Stop the forwarder and delete the namespaces; True if there was anything to remove."""
    found = state_path(name).exists() or bool(_namespaces_of(name))
    if state_path(name).exists():
        pid = json.loads(state_path(name).read_text()).get("pid")
        if pid and _alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        state_path(name).unlink(missing_ok=True)
    _delete_namespaces(name)
    _log_path(name).unlink(missing_ok=True)
    return found


# --- measuring a link from inside the namespaces ---

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block with this thread in network namespace `ns` (sockets keep their namespace)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET):
            raise NetemError(f"cannot enter namespace {ns}: {os.strerror(ctypes.get_errno())}")
        yield
    finally:
        _libc.setns(own, _CLONE_NEWNET)
        os.close(own)
        os.close(target)


def measure_rtt(name: str, src: int, dst: int, probes: int = 10) -> float:
    """Median round trip, in seconds, of small UDP probes from region `src` to `dst` and back."""
    with inside(namespace(name, src)):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with inside(namespace(name, dst)):
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with client, server:
        server.bind((address(dst), 0))
        client.settimeout(5.0)
        server.settimeout(5.0)

        def echo() -> None:
            with suppress(OSError):
                for _ in range(probes + 1):
                    data, peer = server.recvfrom(64)
                    server.sendto(data, peer)

        thread = threading.Thread(target=echo, daemon=True)
        thread.start()
        rtts = []
        for probe in range(probes + 1):  # the first probe also resolves neighbours: not counted
            began = time.perf_counter()
            client.sendto(probe.to_bytes(4, "big"), server.getsockname())
            try:
                client.recvfrom(64)
            except TimeoutError:
                raise NetemError(f"no reply from region {dst} to region {src} within 5 s") from None
            if probe:
                rtts.append(time.perf_counter() - began)
        thread.join()
    return statistics.median(rtts)


def status(name: str) -> str:
    state = read_state(name)
    spec = NetemSpec(**state["spec"])
    alive = state["pid"] is None or _alive(state["pid"])
    lines = [
        f"network {name}: {spec.regions} regions, backend {state['backend']}"
        + (f", server pid {state['pid']}" if state["pid"] else "")
        + (f", ends with pid {state['owner']}" if state.get("owner") else "")
        + ("" if alive else " (NOT RUNNING)"),
        f"links: latency {spec.latency_ms} ms one-way, jitter {spec.jitter_ms} ms, "
        f"bandwidth {spec.bandwidth_mbps or 'unlimited'} Mbit/s, loss {spec.loss_pct}%",
    ]
    for region in range(spec.regions):
        lines.append(f"  region {region}: namespace {namespace(name, region)}, {INTERFACE} {address(region)}")
    if alive:
        for src in range(spec.regions):
            for dst in range(src + 1, spec.regions):
                rtt = measure_rtt(name, src, dst)
                lines.append(f"  measured round trip {src} <-> {dst}: {rtt * 1e3:.1f} ms")
    return "\n".join(lines)


def _stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name; empty if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return []


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, is not)."""
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def _lineage(pid: int) -> Iterator[int]:
    """`pid`, its parent, and so on up to the first process."""
    while pid > 0:
        yield pid
        fields = _stat(pid)
        pid = int(fields[1]) if fields else 0


_PR_SET_PDEATHSIG = 1


def end_with(launcher: int) -> None:
    """Have the kernel send this process SIGTERM when its parent ends (the setting survives exec).

    `launcher` is the parent, or an ancestor of it that started it: when it is no longer in this
    process's lineage, the parent ended before the setting was made, and SIGTERM comes at once.
    The signal follows the parent's thread that forked this process (callers fork from their main
    thread), and may come more than once: the children of a dying parent pass through each of its
    threads still alive, and get the signal at each move."""
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0):
        raise NetemError(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if launcher not in _lineage(os.getppid()):
        os.kill(os.getpid(), signal.SIGTERM)


# --- the user-space forwarder (tun backend) ---

_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000


def _open_tun(device: str) -> int:
    import fcntl
    import struct

    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", device.encode(), _IFF_TUN | _IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


class Forwarder:
    """Moves IPv4 packets between the regions' TUN devices as the links say."""

    def __init__(self, spec: NetemSpec, fds: Sequence[int], seed: int = 0):
        self.links, self.fds = spec.links(), list(fds)
        self.loss = spec.loss_pct / 100
        self.rng = random.Random(seed)
        n = spec.regions
        self.free_at = [[0.0] * n for _ in range(n)]  # when each link has sent what it holds
        self.last_arrival = [[0.0] * n for _ in range(n)]
        self.queue: list[tuple[float, int, int, bytes]] = []  # (arrival, seq, dst, packet)
        self.seq = 0
        # A link holds at most this much unsent data (in seconds of sending) before it drops, like
        # a router's buffer: twice the delay, at least 50 ms.
        self.buffer_s = [[max(0.05, 2 * self.links.latency_s[i][j]) for j in range(n)] for i in range(n)]

    def route(self, src: int, packet: bytes, now: float) -> None:
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return  # IPv4 only
        dst = packet[19] - 100
        if packet[16:19] != bytes([10, 77, 0]) or not 0 <= dst < len(self.fds) or dst == src:
            return
        if self.loss and self.rng.random() < self.loss:
            return
        bandwidth = self.links.bandwidth_Bps[src][dst]
        start = max(now, self.free_at[src][dst])
        if start - now > self.buffer_s[src][dst]:
            return  # the link's buffer is full: tail drop
        sent = start + (len(packet) / bandwidth if bandwidth > 0 else 0.0)
        self.free_at[src][dst] = sent
        latency = self.links.latency_s[src][dst]
        if self.links.jitter_s:
            latency = max(0.0, latency + self.rng.uniform(-self.links.jitter_s, self.links.jitter_s))
        arrival = max(sent + latency, self.last_arrival[src][dst])
        self.last_arrival[src][dst] = arrival
        heapq.heappush(self.queue, (arrival, self.seq, dst, packet))
        self.seq += 1

    def deliver(self, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            _, _, dst, packet = heapq.heappop(self.queue)
            with suppress(BlockingIOError, OSError):
                os.write(self.fds[dst], packet)

    def run(self, stop: threading.Event) -> None:
        selector = selectors.DefaultSelector()
        for region, fd in enumerate(self.fds):
            selector.register(fd, selectors.EVENT_READ, region)
        while not stop.is_set():
            now = time.perf_counter()
            self.deliver(now)
            timeout = min(0.2, max(0.0, self.queue[0][0] - now)) if self.queue else 0.2
            for key, _ in selector.select(timeout):
                while True:
                    try:
                        packet = os.read(key.fd, 65536)
                    except BlockingIOError:
                        break
                    self.route(key.data, packet, time.perf_counter())


def _pids_in(name: str) -> set[int]:
    """The processes in the network's namespaces."""
    pids = set()
    for ns in _namespaces_of(name):
        listing = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        pids |= {int(pid) for pid in listing.split()}
    return pids


def _emptied(name: str) -> threading.Event:
    """Set once the network's namespaces hold no process; those left after the grace are killed."""
    emptied = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + STOP_GRACE_S
        while (pids := _pids_in(name)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        emptied.set()

    threading.Thread(target=watch, daemon=True).start()
    return emptied


def serve(state: dict) -> None:
    """The network's process: build it, publish the state, forward packets (tun backend) until
    SIGTERM, then take the network down. A network with an owner is kept while processes are in
    its namespaces (when the owner died, the kernel told its processes too, and they are stopping)."""
    spec = NetemSpec(**state["spec"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    owner = state["owner"]
    if owner:
        end_with(owner)
    try:
        _add_namespaces(spec)
        if state["backend"] == "kernel":
            _add_kernel_links(spec)
            carry = threading.Event.wait  # the kernel carries the packets
        else:
            carry = Forwarder(spec, _add_tun_links(spec)).run
        _write_state(spec.name, {**state, "pid": os.getpid()})
        carry(stop)
        if owner:
            # Whether the owner asked (its processes here have stopped: no wait) or died (they are
            # stopping): getppid() cannot tell, as the death signal comes when the owner's first
            # thread ends, and its other threads, still ending, keep its pid.
            carry(_emptied(spec.name))
    finally:
        _delete_namespaces(spec.name)
        state_path(spec.name).unlink(missing_ok=True)
    _log_path(spec.name).unlink(missing_ok=True)  # stopped as asked: nothing in it to keep


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
