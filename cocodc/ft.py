"""Regions that fail and come back: torchft decides, at every fragment sync, which regions take part
(DESIGN section 10).

Each region is a torchft replica group (its ranks are the group's ranks) with one `Manager` per
rank. A lighthouse forms a quorum of the regions that ask for one; the sends of a fragment sync ask
(`start`), and when the quorum's members changed the inter-region group is rebuilt (torchft's gloo
group, reconfigured) and the comm engine is built anew over it: codecs, link model and byte counts
as on any other group. A region behind the others (restarted after a failure) is healed inside
`start`: torchft sends it a live peer's state over the quorum's group and hands it to `load`. The
apply of a fragment asks `commit`: whether every rank of this region saw its collective through.
A rank whose collective failed closes its side of the group (`close_group`), so that no live peer
waits out the timeout on it; the next quorum rebuilds the group.

A dead region is out of the next quorum once its heartbeat has been silent for
`ft.heartbeat_timeout_s` (the lighthouse's bound); a quorum waits at most `ft.quorum_timeout_s`
(long: a peer may be in a long outer step, or restarting).
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from cocodc.comm import CommEngine, CommError
from cocodc.comm.wan import LinkModel
from cocodc.config import Config, ConfigError
from cocodc.topology import RESTART_ENV, Topology

LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"  # torchft's own: the lighthouse's address
ADDRESS_ENV = "COCODC_ADDRESS"  # where the other regions reach this one, if not at the host's name


@dataclass
class Membership:
    """A quorum whose members changed: the regions in it (in group rank order), the life of each
    (how often torchrun had restarted its job: a region restarted before its old life was declared
    dead comes back as the same region), the rebuilt group and the link model over its members,
    whether this region was healed to join it, and how long the quorum took."""

    regions: list[int]
    lives: list[int]
    group: Any
    link: LinkModel | None
    healed: bool
    quorum_s: float


def torchft_call(what: str, call: Callable[[], Any]) -> Any:
    """`call()`, with torchft's failures (a lighthouse out of reach, a quorum or commit that timed
    out) as one-line CommErrors."""
    try:
        return call()
    except (RuntimeError, TimeoutError, OSError) as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        raise CommError(f"torchft: {what} failed: {lines[0][:200]}") from None


class RegionQuorum:
    """torchft's Manager for this rank of a region, with `save` / `load` as the state a healing
    peer takes from this region and this region takes from a peer. Its own state (the count of
    committed syncs, by which torchft tells who is behind) is saved with the region's checkpoint."""

    def __init__(
        self,
        config: Config,
        topology: Topology,
        save: Callable[[], dict[str, Any]],
        load: Callable[[dict[str, Any]], None],
    ):
        os.environ.setdefault("RUST_LOG", "warn")  # torchft's quorum and commit logs: a line per sync each
        from torchft import Manager  # imported only with ft: it starts threads and servers
        from torchft.checkpointing.pg_transport import PGTransport
        from torchft.process_group import ProcessGroupGloo

        logging.getLogger("torchft").setLevel(logging.ERROR)

        f, timeout = config.ft, timedelta(seconds=config.topology.timeout_s)
        lighthouse = f.lighthouse or os.environ.get(LIGHTHOUSE_ENV)
        if not lighthouse:
            raise ConfigError(
                f"ft.enabled: no lighthouse to ask: set ft.lighthouse (or {LIGHTHOUSE_ENV}) to its http://host:port "
                "(`cocodc train` on one host starts one itself)"
            )
        self.config, self.topology = config, topology
        self.group = ProcessGroupGloo(timeout=timeout)
        self._load = load
        self.healed = False
        host, port = self._own_store(topology)
        self.manager = torchft_call(
            "starting the manager",
            lambda: Manager(
                pg=self.group,
                load_state_dict=self._heal,
                state_dict=save,
                min_replica_size=f.min_regions,
                use_async_quorum=False,  # a healing region takes the state before the sync's sends
                timeout=timeout,
                quorum_timeout=timedelta(seconds=f.quorum_timeout_s),
                rank=topology.local_index,
                world_size=topology.ranks_per_region,
                replica_id=f"region{topology.region}",
                lighthouse_addr=lighthouse,
                init_sync=False,  # every region starts from the same seeded model
                store_addr=host,
                store_port=port,
                # The heal travels over the quorum's own group (the WAN), and the peer's send
                # returns once the healing region has it all. torchft's default, HTTP, advertises
                # the host's name, which another host (or a namespace) may not resolve.
                checkpoint_transport=PGTransport(self.group, timeout=timeout, device=torch.device("cpu")),
                hostname=os.environ.get(ADDRESS_ENV, socket.gethostname()),
            ),
        )
        self._parent: Any = None
        self.last_s = 0.0  # how long the last quorum took

    def _own_store(self, topology: Topology) -> tuple[str, int]:
        """A store of this life of the region's job, for torchft's Manager (its ranks find their
        rank 0's server there) and for the groups of the quorums this region leads. torchrun's own
        store outlives a restart, and what a dead life left in it would answer the new one."""
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = [0]
        if topology.local_index == 0:
            self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
            port = [self._store.port]
        if topology.ranks_per_region > 1:
            dist.broadcast_object_list(port, src=0, group=topology.setup_group)
        return host, port[0]

    def _heal(self, state: dict[str, Any]) -> None:
        self.healed = True
        self._load(state)

    def start(self, step: Callable[[], int], at_least: int = 1, first: bool = False) -> Membership | None:
        """The quorum for the sync about to be sent at `step()` (asked after a heal may have moved
        it), asked again until it holds `at_least` regions; the change when its members changed.
        Only a region's `first` quorum may heal it: one healed later fell behind peers that went on
        with state it lacks, so it ends (and torchrun's restart rejoins it)."""
        began = time.perf_counter()
        self.healed = False
        while True:
            self._ask(at_least, began)
            self.last_s = time.perf_counter() - began
            if self.healed and not first:
                raise CommError(
                    f"region {self.topology.region} fell out of step with its peers (a sync they committed "
                    "failed here): restarting it to rejoin"
                )
            parent = self._rebuilt_group()
            if parent is self._parent:
                return None
            try:
                regions, lives, steps = self._members_of(parent, step())
                break
            except CommError as err:
                failure = str(err)  # the error holds the group: it must be gone before the group closes
            # A member died, or gave up, since the quorum formed: the next quorum is without it.
            del parent
            self.commit(failure)
            self.close_group()
        self._parent = parent
        if step() < max(steps):
            raise CommError(
                f"region {self.topology.region} is at step {step()} but a peer at {max(steps)} (regions "
                "resumed from different checkpoints?): restarting it to heal"
            )
        link = LinkModel.of_config(self.config.wan, self.topology.regions, seed=self.config.seed + self.topology.rank)
        link = link.for_ranks(regions) if link is not None else None
        return Membership(regions, lives, parent, link, self.healed, time.perf_counter() - began)

    def _ask(self, at_least: int, began: float) -> None:
        """Ask torchft's quorum until it holds `at_least` regions (it may heal this region)."""
        while True:
            torchft_call("the quorum", self.manager.start_quorum)
            if (failure := self.manager.errored()) is not None:
                raise CommError(
                    f"region {self.topology.region} could not join the quorum: {failure.original_exception}"
                )
            # Asked again at once: the lighthouse admits newcomers to a quorum only together with
            # every member of the last one, so the regions that are up must keep asking together.
            if self.manager.num_participants() >= at_least:
                return
            if time.perf_counter() - began > self.config.ft.quorum_timeout_s:
                raise CommError(
                    f"only {self.manager.num_participants()} of {at_least} regions joined within "
                    f"ft.quorum_timeout_s ({self.config.ft.quorum_timeout_s:g} s)"
                )

    def _rebuilt_group(self) -> Any:
        try:
            return self.group.parent
        except AssertionError:  # torchft's way of saying it has no group
            raise CommError("torchft did not rebuild the inter-region group after it was closed") from None

    def _members_of(self, parent: Any, step: int) -> list[list[int]]:
        """The members' regions, lives and steps, asked of the members (torchft's group knows only
        their order) over a plain engine: the exchange is not WAN traffic of the run's."""
        mine = torch.tensor([self.topology.region, int(os.environ.get(RESTART_ENV, 0)), step], dtype=torch.float64)
        asked = CommEngine(parent, name="inter-region", timeout_s=self.config.topology.timeout_s)
        return asked.all_gather(mine).wait().view(-1, 3).long().T.tolist()

    def commit(self, failure: str | None) -> bool:
        """Whether the fragment applies: its collective (`failure`: why it failed here, if it did)
        went through on every rank of this region, and the quorum had at least ft.min_regions
        regions. A failed commit makes the lighthouse form the next quorum anew."""
        if failure is not None:
            # Reported as a message: the error raised holds the failed work, and with it the group.
            self.manager.report_error(CommError(failure))
        return torchft_call("the commit", self.manager.should_commit)

    def close_group(self) -> None:
        """Close this rank's connections of the inter-region group, after a collective on it
        failed here. gloo notices a dead peer only on the connection it reads: a live peer waiting
        on this rank for that collective would wait out the timeout, and miss the next quorum
        (the lighthouse waits for it up to its join timeout). Closed, the peer's wait fails at once.
        The group closes when the last reference to it goes: the caller holds none (no engine
        bound to it, no work in flight on it); the next quorum rebuilds it."""
        self.group.abort(errored=False)
        self._parent = None
        gc.collect()  # a failed work's exception may sit in a reference cycle, and holds the connections

    def state_dict(self) -> dict[str, int]:
        return self.manager.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.manager.load_state_dict(state)

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)
