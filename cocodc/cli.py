"""The `cocodc` command.

`cocodc train -c X.yaml [--set k=v ...]` checks the config and the run directory, then starts
torchrun with one process per rank on this host (or runs in place when already under torchrun).
With `wan.emulation: netem` it brings up an emulated WAN, runs one torchrun node per region in
the region's network namespace, and takes the network down afterwards. For several hosts, run
torchrun yourself: `torchrun --nnodes ... -m cocodc.train -c X.yaml`.

`cocodc netem up|down|status` manages an emulated WAN by hand; `cocodc report RUN...` plots runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import yaml
from torch.distributed import TCPStore

from cocodc import __version__, checkpoint, netem
from cocodc.config import Config, ConfigError, load_config

RENDEZVOUS_PORT = 29400


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def train_command(args: list[str]) -> int:
    from cocodc import train

    if _under_torchrun():
        return train.main(args)
    options = train.build_parser().parse_args(args)
    try:
        config = load_config(options.config, options.overrides)
        train.check_run_dir(config, options.resume, options.overwrite)
        world_size = config.topology.regions * config.topology.ranks_per_region
        if options.resume:
            root = config.run_dir / "checkpoints"
            checkpoint.check_compatible(root, checkpoint.latest_step(root), config, world_size)
        over_netem = config.wan.enabled and config.wan.emulation == "netem"
        if over_netem:
            netem.check_host()
    except (ConfigError, checkpoint.CheckpointError, netem.NetemError) as err:
        print(f"cocodc: error: {err}", file=sys.stderr)
        return 2
    if world_size == 1:
        return train.main(args)
    # torchrun would set one thread per process and warn; share the cores out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    if over_netem:
        try:
            return train_over_netem(config, args)
        except netem.NetemError as err:
            print(f"cocodc: error: {err}", file=sys.stderr)
            return 2
    command = [*_torchrun(), "--standalone", f"--nproc-per-node={world_size}", "-m", "cocodc.train", *args]
    sys.stdout.flush()
    os.execv(sys.executable, command)


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run"]


def train_over_netem(config: Config, args: list[str]) -> int:
    """One torchrun node per region, each inside its namespace of a fresh emulated WAN."""
    regions, w = config.topology.regions, config.wan
    spec = netem.NetemSpec(f"c{os.getpid()}", regions, w.latency_ms, w.bandwidth_mbps, w.jitter_ms, w.loss_pct)
    state = netem.up(spec)
    print(f"cocodc: emulated WAN {spec.name} up ({state['backend']}): {regions} regions", flush=True)
    nodes: list[subprocess.Popen] = []
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
        for region in range(regions):
            node = [
                f"--nnodes={regions}",
                f"--nproc-per-node={config.topology.ranks_per_region}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={netem.address(0)}:{RENDEZVOUS_PORT}",
                f"--rdzv-id={spec.name}",
                "--rdzv-conf=is_host=false",
                f"--local-addr={netem.address(region)}",
            ]
            command = ["ip", "netns", "exec", netem.namespace(spec.name, region), *_torchrun(), *node]
            nodes.append(subprocess.Popen([*command, "-m", "cocodc.train", *args], env=env))
        codes = [node.wait() for node in nodes]
        del store
    finally:
        for node in nodes:
            if node.poll() is None:
                node.terminate()
                node.wait()
        netem.down(spec.name)
    return max(codes, key=abs)


def netem_command(args: list[str]) -> int:
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
    options = parser.parse_args(args)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cocodc", description="Train language models across regions.")
    parser.add_argument("--version", action="version", version=f"cocodc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("train", help="train a model (see `cocodc train --help`)", add_help=False)
    commands.add_parser("netem", help="an emulated WAN on this host (see `cocodc netem --help`)", add_help=False)
    commands.add_parser("report", help="plot eval loss of runs against steps and wall-clock", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    parser.parse_args(argv[:1])  # --help, --version, or a known command; argparse exits on anything else
    return {"train": train_command, "netem": netem_command, "report": report_command}[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
