"""The `cocodc` command.

`cocodc train -c X.yaml [--set k=v ...]` checks the config and the run directory, then starts
torchrun with one process per rank on this host (or runs in place when already under torchrun).
With `wan.emulation: netem` it brings up an emulated WAN, runs one torchrun node per region in
the region's network namespace, and takes the network down afterwards, or on SIGTERM or SIGINT.
Nothing it starts outlives it, even when it is killed: the kernel sends its nodes, their workers
and the network's server SIGTERM (a parent-death signal). For several hosts, run torchrun
yourself: `torchrun --nnodes ... -m cocodc.train -c X.yaml`.

With `ft.enabled`, it starts torchft's lighthouse (unless `ft.lighthouse` names one) and one
torchrun job per region, each restarted up to `ft.max_restarts` times; the run ends when every job
has, and survives the regions lost for good as long as `ft.min_regions` finish.

`cocodc netem up|down|status` manages an emulated WAN by hand; `cocodc report RUN...` plots runs;
`cocodc export RUN --hf OUT` writes a run's model for transformers; `cocodc generate` continues a prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from torch.distributed import TCPStore

from cocodc import __version__, netem, run_dir
from cocodc.config import Config, ConfigError, load_config
from cocodc.topology import REGION_ENV, REPORTED_EXIT

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

RENDEZVOUS_PORT = 29400
# The pid of the `cocodc train` that started the workers: they end when it ends, even by SIGKILL.
LAUNCHER_PID = "COCODC_LAUNCHER_PID"
# The module torchrun runs: this command, which ties each worker to the launcher before training.
WORKER = ["-m", "cocodc.cli", "train"]
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # a scheduler's preemption, a Ctrl-C
FAILED_NODE_GRACE_S = 5.0  # for a node still running after a failure and the timeout that followed it


class LauncherInterrupted(Exception):
    """The launcher got SIGTERM or SIGINT; its nodes have stopped and its network is down."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def train_command(args: list[str]) -> int:
    if _under_torchrun():  # a worker
        from cocodc import train

        if LAUNCHER_PID in os.environ:  # torchrun's workers outlive it when it is killed
            netem.end_with(int(os.environ[LAUNCHER_PID]))
        train.exit_now(train.main(args))
    options = run_dir.build_parser().parse_args(args)
    try:
        config = load_config(options.config, options.overrides)
        run_dir.check_run_dir(config, options.resume, options.overwrite)
        if config.model.init_from:
            from cocodc.model_io import ModelIOError, check_init_from

            try:
                check_init_from(config)
            except ModelIOError as err:
                raise ConfigError(f"model.init_from {config.model.init_from}: {err}") from None
        world_size = config.world_size
        if options.resume:  # with ft, every region resumes its own
            from cocodc import checkpoint

            for region in range(config.topology.regions if config.ft.enabled else 1):
                root = run_dir.checkpoint_root(config, region)
                regions = run_dir.checkpoint_regions(config, region)
                checkpoint.check_compatible(root, checkpoint.latest_step(root), config, regions)
        over_netem = config.wan.enabled and config.wan.emulation == "netem"
        if over_netem:
            netem.check_host()
    except (ConfigError, run_dir.CheckpointError, netem.NetemError) as err:
        print(f"cocodc: error: {err}", file=sys.stderr)
        return 2
    if config.ft.enabled:
        os.environ[LAUNCHER_PID] = str(os.getpid())
        try:
            return train_regions(config, args, options.overwrite)
        except netem.NetemError as err:
            print(f"cocodc: error: {err}", file=sys.stderr)
            return 2
        except LauncherInterrupted as err:
            print(f"cocodc: error: interrupted by {err}; the regions' jobs are stopped", file=sys.stderr)
            return 128 + err.signum
    if world_size == 1:
        from cocodc import train

        train.exit_now(train.main(args))
    # torchrun would set one thread per process and warn; share the cores out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    os.environ[LAUNCHER_PID] = str(os.getpid())
    if over_netem:
        try:
            return train_over_netem(config, args)
        except netem.NetemError as err:
            print(f"cocodc: error: {err}", file=sys.stderr)
            return 2
        except LauncherInterrupted as err:
            print(
                f"cocodc: error: interrupted by {err}; the nodes are stopped and the emulated WAN is down",
                file=sys.stderr,
            )
            return 128 + err.signum
    # This process runs torchrun in place (torch is imported already: a fresh one would take seconds
    # more); its agent stops the workers on SIGTERM and SIGINT.
    torchrun(["--standalone", f"--nproc-per-node={world_size}", *WORKER, *args])
    return 0


def _torchrun() -> list[str]:
    return [sys.executable, "-c", "from cocodc.cli import torchrun; torchrun()"]


def torchrun(argv: list[str] | None = None) -> None:
    """torchrun with `argv` (else this process's arguments), without its tracebacks: stopped by
    SIGTERM or SIGINT it exits 128 + the signal; when a worker fails it names the first failure in
    one line and exits 1 (each worker has said what it lost in its own `cocodc: error:` line)."""
    import logging

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    launcher = int(os.environ.get(LAUNCHER_PID, 0))
    if launcher and launcher != os.getpid():  # a node that `cocodc train` started (not itself)
        netem.end_with(launcher)
    # The agent logs every worker it stops and every failure as it happens: the summary line says it.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        main(argv)
    except SignalException as err:
        sys.exit(128 + err.sigval)
    except ChildFailedError as err:
        rank, failure = first_cause(err.failures)
        how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited {failure.exitcode}"
        region = os.environ.get(REGION_ENV)  # ft: this is one region's job
        stopped = f"region {region}'s job stopped" if region is not None else "the run stopped"
        print(f"cocodc: error: rank {rank} {how} first; {stopped}", file=sys.stderr)
        sys.exit(1)


def first_cause(failures: dict[int, ProcessFailure]) -> tuple[int, ProcessFailure]:
    """The failure that set the others off: the earliest of those that did not say what went wrong
    themselves (those lost a peer to it). torchrun's own pick is the earliest to the second, ties to
    the lowest rank: a survivor that reported within the second of the kill would be named."""
    unreported = {rank: f for rank, f in failures.items() if f.exitcode != REPORTED_EXIT} or failures
    return min(unreported.items(), key=lambda item: (item[1].timestamp, item[0]))


def train_over_netem(config: Config, args: list[str]) -> int:
    """One torchrun node per region, each inside its namespace of a fresh emulated WAN. On SIGTERM
    or SIGINT it stops the nodes, takes the network down and raises LauncherInterrupted; should this
    process be killed outright, the nodes and the network's server get SIGTERM from the kernel."""
    received: list[int] = []  # recorded, then acted on: a handler that raised could cut the cleanup short
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda number, _frame: received.append(number))
    regions, w = config.topology.regions, config.wan
    spec = netem.NetemSpec(f"c{os.getpid()}", regions, w.latency_ms, w.bandwidth_mbps, w.jitter_ms, w.loss_pct)
    state = netem.up(spec, ends_with_caller=True)
    print(f"cocodc: emulated WAN {spec.name} up ({state['backend']}): {regions} regions", flush=True)
    nodes: list[subprocess.Popen] = []
    codes: list[int] | None = None
    store = None  # kept until the nodes have stopped: their agents use it to the end
    try:
        # The rendezvous store lives here, in region 0's namespace, rather than in one of the
        # torchrun agents: an agent hosting it exits first and leaves the others' shutdown hanging.
        with netem.inside(netem.namespace(spec.name, 0)):
            store = TCPStore(netem.address(0), RENDEZVOUS_PORT, is_master=True, wait_for_workers=False)
        # c10d warns on every connection that the namespace cannot resolve its peer's hostname.
        env = {"TORCH_CPP_LOG_LEVEL": "ERROR", **os.environ, "GLOO_SOCKET_IFNAME": netem.INTERFACE}
        if not config.train.threads:  # every region on this host: share its cores out
            threads = max(1, (os.cpu_count() or 1) // (regions * config.topology.ranks_per_region))
            args = [*args, "--set", f"train.threads={threads}"]
        started = time.time()
        for region in range(regions):
            nodes.append(_start_node(config, spec.name, region, args, env))
        # Once one rank has reported a lost peer (its rescue written, or its node failed), the others
        # notice within the timeout and say so; an agent whose region lost its link cannot reach the
        # rendezvous to finish, so what still runs after that is stopped.
        rescues = config.run_dir / "checkpoints" / "rescue"
        codes = _wait(
            nodes, received, grace_s=config.topology.timeout_s, reported=lambda: _rescued_since(rescues, started)
        )
    finally:
        # Stopped by a signal, the workers get the time to save; after a failure they have had it.
        _stop(nodes, netem.STOP_GRACE_S if codes is None else FAILED_NODE_GRACE_S)
        del store
        netem.down(spec.name)
    if codes is None:
        raise LauncherInterrupted(received[0])
    return max(codes, key=abs)


def train_regions(config: Config, args: list[str], overwrite: bool) -> int:
    """`ft`: the lighthouse here and one torchrun job per region (with `wan.emulation: netem`, each in
    its region's namespace of a fresh emulated WAN, the lighthouse in region 0's). A job that fails
    is restarted by its torchrun; one that fails for good leaves the others to finish without it."""
    import shutil

    from cocodc.ft import ADDRESS_ENV, LIGHTHOUSE_ENV

    received: list[int] = []
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda number, _frame: received.append(number))
    if overwrite:  # once, here: the regions' jobs share the directory and may restart
        shutil.rmtree(config.run_dir, ignore_errors=True)
    args = [arg for arg in args if arg != "--overwrite"]
    f, w, regions, per_region = config.ft, config.wan, config.topology.regions, config.topology.ranks_per_region
    if not config.train.threads:  # every region on this host: share its cores out
        args = [*args, "--set", f"train.threads={max(1, (os.cpu_count() or 1) // (regions * per_region))}"]
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's lighthouse and managers log every quorum at info
    env = {**os.environ}
    spec = None
    if w.enabled and w.emulation == "netem":
        spec = netem.NetemSpec(f"c{os.getpid()}", regions, w.latency_ms, w.bandwidth_mbps, w.jitter_ms, w.loss_pct)
        state = netem.up(spec, ends_with_caller=True)
        print(f"cocodc: emulated WAN {spec.name} up ({state['backend']}): {regions} regions", flush=True)
        env = {"TORCH_CPP_LOG_LEVEL": "ERROR", **env, "GLOO_SOCKET_IFNAME": netem.INTERFACE}
    lighthouse, nodes, codes = None, [], None
    try:
        if not f.lighthouse:
            try:
                lighthouse, address = _start_lighthouse(config, spec)
            except RuntimeError as err:
                print(f"cocodc: error: torchft's lighthouse did not start: {err}", file=sys.stderr)
                return 2
            env[LIGHTHOUSE_ENV] = address
            print(f"cocodc: torchft lighthouse at {address}: {regions} regions", flush=True)
        for region in range(regions):
            job = [*_torchrun(), f"--nproc-per-node={per_region}", f"--max-restarts={f.max_restarts}"]
            own = {REGION_ENV: str(region)}
            if spec is None:
                job.append("--standalone")
            else:  # reached at its own address: the others use its store when it leads a quorum
                here = netem.address(region)
                job = ["ip", "netns", "exec", netem.namespace(spec.name, region), *job, "--nnodes=1"]
                job += ["--rdzv-backend=c10d", f"--rdzv-endpoint={here}:{RENDEZVOUS_PORT}", "--rdzv-conf=is_host=true"]
                job += [f"--rdzv-id={spec.name}-{region}", f"--local-addr={here}"]
                own[ADDRESS_ENV] = here
            nodes.append(subprocess.Popen([*job, *WORKER, *args], env={**env, **own}))
        codes = _wait(nodes, received, grace_s=math.inf)
    finally:
        _stop(nodes, netem.STOP_GRACE_S if codes is None else FAILED_NODE_GRACE_S)
        if lighthouse is not None:
            lighthouse.shutdown()
        if spec is not None:
            netem.down(spec.name)
    if codes is None:
        raise LauncherInterrupted(received[0])
    lost = [region for region, code in enumerate(codes) if code]
    if len(lost) > regions - f.min_regions:
        print(f"cocodc: error: regions {lost} failed for good; fewer than ft.min_regions finished", file=sys.stderr)
        return 1
    if lost:
        print(f"cocodc: regions {lost} failed for good; the others finished the run without them", flush=True)
    return 0


def _start_lighthouse(config: Config, spec: netem.NetemSpec | None) -> tuple[object, str]:
    """torchft's lighthouse and its address; with an emulated WAN, inside region 0's namespace."""
    from torchft.coordination import LighthouseServer

    f = config.ft
    host = netem.address(0) if spec is not None else socket.gethostname()
    inside = netem.inside(netem.namespace(spec.name, 0)) if spec is not None else contextlib.nullcontext()
    with inside:
        lighthouse = LighthouseServer(
            bind=f"{host}:0" if spec is not None else "[::]:0",
            min_replicas=f.min_regions,
            heartbeat_timeout_ms=round(f.heartbeat_timeout_s * 1000),
            join_timeout_ms=round(f.join_timeout_s * 1000),
        )
    port = lighthouse.address().rsplit(":", 1)[1]
    return lighthouse, f"http://{host}:{port}"


def _start_node(config: Config, name: str, region: int, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    node = [
        f"--nnodes={config.topology.regions}",
        f"--nproc-per-node={config.topology.ranks_per_region}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={netem.address(0)}:{RENDEZVOUS_PORT}",
        f"--rdzv-id={name}",
        "--rdzv-conf=is_host=false",
        f"--local-addr={netem.address(region)}",
    ]
    command = ["ip", "netns", "exec", netem.namespace(name, region), *_torchrun(), *node, *WORKER, *args]
    return subprocess.Popen(command, env=env)  # the node ties itself to this process (`torchrun`)


def _wait(
    nodes: list[subprocess.Popen],
    received: list[int],
    grace_s: float,
    reported: Callable[[], bool] = lambda: False,
) -> list[int] | None:
    """The nodes' exit codes once all have exited, or None as soon as a stop signal is received
    (polled: a recorded signal does not end a blocking wait). Once a node has failed, or a rank
    has `reported` a failure, the others get `grace_s` to end on their own; those still running
    then count as failed (code 1) and `_stop` ends them."""
    failed_at = None
    while not received:
        codes = [node.poll() for node in nodes]
        if None not in codes:
            return codes
        if failed_at is None and (any(codes) or reported()):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            return [code if code is not None else 1 for code in codes]
        time.sleep(0.2)
    return None


def _rescued_since(rescues: Path, started: float) -> bool:
    """Whether a rank has written its rescue (a lost peer ended its run) since `started`."""
    try:
        return any(path.stat().st_mtime >= started for path in rescues.iterdir())
    except OSError:  # no rescue yet
        return False


def _stop(nodes: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM the nodes still running and wait for them; SIGKILL those that outlast the grace."""
    for node in nodes:
        if node.poll() is None:
            node.terminate()
    deadline = time.monotonic() + grace_s
    for node in nodes:
        try:
            node.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()


def netem_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cocodc netem", description="An emulated WAN between regions on this host.")
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--name", default="cocodc", help="network name (namespaces <name>-r<m>)")
    parser.add_argument("-c", "--config", help="take regions and the wan section from this config")
    parser.add_argument("--regions", type=int, default=2)
    parser.add_argument("--latency-ms", default="0", help="one-way; a number or a JSON matrix [[...], ...]")
    parser.add_argument("--bandwidth-mbps", default="0", help="0: unlimited; a number or a JSON matrix")
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss-pct", type=float, default=0.0)
    parser.add_argument("--backend", choices=["auto", "kernel", "tun"], default="auto")
    return parser


def netem_command(args: list[str]) -> int:
    options = netem_parser().parse_args(args)
    try:
        if options.action == "down":
            print(f"removed {options.name}" if netem.down(options.name) else f"no network named {options.name}")
        elif options.action == "status":
            print(netem.status(options.name))
        else:
            if options.config:
                config = load_config(options.config)
                w, regions = config.wan, config.topology.regions
                spec = netem.NetemSpec(options.name, regions, w.latency_ms, w.bandwidth_mbps, w.jitter_ms, w.loss_pct)
            else:
                latency, bandwidth = (yaml.safe_load(v) for v in (options.latency_ms, options.bandwidth_mbps))
                spec = netem.NetemSpec(
                    options.name, options.regions, latency, bandwidth, options.jitter_ms, options.loss_pct
                )
            netem.up(spec, options.backend)
            print(netem.status(options.name))
            print(f"run a command in region m: ip netns exec {options.name}-r<m> <command>")
    except (netem.NetemError, ConfigError, yaml.YAMLError) as err:
        print(f"cocodc: error: {err}", file=sys.stderr)
        return 2
    return 0


def report_command(args: list[str]) -> int:
    from cocodc import report

    try:
        return report.main(args)
    except report.ReportError as err:
        print(f"cocodc: error: {err}", file=sys.stderr)
        return 2


def export_command(args: list[str]) -> int:
    from cocodc import model_io

    options = model_io.export_parser().parse_args(args)
    try:
        step = model_io.export_run(options.run, options.hf, options.step, options.adapter)
    except (model_io.ModelIOError, run_dir.CheckpointError, ConfigError) as err:
        print(f"cocodc: error: {err}", file=sys.stderr)
        return 2
    print(f"exported step {step} of {options.run} to {options.hf} (transformers: AutoModelForCausalLM.from_pretrained)")
    return 0


def generate_command(args: list[str]) -> int:
    from cocodc import model_io

    options = model_io.generate_parser().parse_args(args)
    try:
        text = model_io.generate(
            options.source, options.prompt, options.max_new_tokens, options.temperature, options.seed
        )
    except (model_io.ModelIOError, run_dir.CheckpointError, ConfigError) as err:
        print(f"cocodc: error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cocodc", description="Train language models across regions.")
    parser.add_argument("--version", action="version", version=f"cocodc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("train", help="train a model (see `cocodc train --help`)", add_help=False)
    commands.add_parser("netem", help="an emulated WAN on this host (see `cocodc netem --help`)", add_help=False)
    commands.add_parser("report", help="plot eval loss of runs against steps and wall-clock", add_help=False)
    commands.add_parser(
        "export", help="write a run's model for transformers (see `cocodc export --help`)", add_help=False
    )
    commands.add_parser("generate", help="continue a prompt with a run's model", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    parser.parse_args(argv[:1])  # --help, --version, or a known command; argparse exits on anything else
    run_command = {
        "train": train_command,
        "netem": netem_command,
        "report": report_command,
        "export": export_command,
        "generate": generate_command,
    }
    return run_command[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
