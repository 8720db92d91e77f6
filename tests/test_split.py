"""The split-learning mode's plain parts: parameter ownership, batch regulation, arrivals, config."""

import numpy as np
import pytest

from cocodc.comm.wan import AccessLinks
from cocodc.config import ConfigError, load_config
from cocodc.data import ShardLoader
from cocodc.devices import DeviceProfiles
from cocodc.model import Transformer
from cocodc.split.plan import (
    activation_arrivals,
    gradients_back,
    on_worker,
    part_sync,
    per_sequence_s,
    regulate_batches,
    serving_order,
)

from conftest import REPO

CONFIG = str(REPO / "configs" / "split.yaml")


def test_the_cut_gives_workers_the_embedding_and_the_first_blocks():
    config = load_config(CONFIG, ["model.n_layers=3", "split.cut=2"])
    names = [name for name, _ in Transformer(config.model, 256, 16).named_parameters()]
    two = {
        n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
        for n in names
        if on_worker(n, 2, "two")
    }
    assert two == {"embed", "blocks.0", "blocks.1"}
    u = {n for n in names if on_worker(n, 2, "u")} - {n for n in names if on_worker(n, 2, "two")}
    assert u == {"norm.weight", "head.weight"}


def test_batch_regulation_gives_faster_workers_more_and_keeps_the_merged_size():
    roomy = [100] * 4
    assert regulate_batches(32, [1.0, 1.0, 1.0, 1.0], roomy) == [8, 8, 8, 8]
    # rates 1, 1/2, 1/4, 1/4 share the 28 sequences beyond one each: 14, 7, 3.5, 3.5; the one left
    # goes to the largest remainder, the lower index first.
    assert regulate_batches(32, [1.0, 2.0, 4.0, 4.0], roomy) == [15, 8, 5, 4]
    assert regulate_batches(4, [1.0, 100.0, 100.0, 100.0], roomy) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="cannot give 3 workers a sequence each"):
        regulate_batches(2, [1.0, 1.0, 1.0], roomy)


def test_batch_regulation_asks_no_worker_for_more_than_its_shard_holds():
    # The fastest would take 15 of 32, but holds 10: the 22 left are shared by the others' rates
    # (1/2, 1/4, 1/4 of the 19 beyond one each: 9.5, 4.75, 4.75; the two left to the remainders 0.75).
    assert regulate_batches(32, [1.0, 2.0, 4.0, 4.0], [10, 100, 100, 100]) == [10, 10, 6, 6]
    # Capped in turn: the second then holds 9, and the last two share the 13 left.
    assert regulate_batches(32, [1.0, 2.0, 4.0, 4.0], [10, 9, 100, 100]) == [10, 9, 7, 6]
    assert regulate_batches(6, [1.0, 1.0], [3, 3]) == [3, 3]
    with pytest.raises(ValueError, match="a merged batch of 7 sequences is more than the workers' shards hold"):
        regulate_batches(7, [1.0, 1.0], [3, 3])


def test_a_loader_refuses_a_batch_larger_than_its_shard():
    loader = ShardLoader(np.zeros((5, 4), dtype=np.int32), np.arange(5), 2, [0], owner="split worker 3")
    assert loader.next_batch(5).shape == (5, 4)
    with pytest.raises(ValueError, match="split worker 3: a batch of 6 sequences asked of a shard of 5"):
        loader.next_batch(6)


def test_per_sequence_time_is_compute_plus_link():
    profiles = DeviceProfiles(speed=[1.0, 2.0], bandwidth_mbps=[8.0, 0.0], latency_ms=[5.0, 5.0])
    # 0.8 s per 8 sequences at speed 1: 0.1 s each, plus 1e5 bytes at 1 MB/s; speed 2, no link limit.
    assert per_sequence_s(profiles, 8, 0.8, 1e5) == pytest.approx([0.2, 0.05])


def test_activations_queue_at_the_servers_link():
    profiles = DeviceProfiles(speed=[1.0, 1.0], bandwidth_mbps=[0.0, 0.0], latency_ms=[0.0, 10.0])
    arrivals, _ = activation_arrivals(
        profiles, [4, 8], batch_size=8, step_s=1.0, sent_bytes=[1e6, 1e6], server_bandwidth_mbps=8.0
    )
    # worker 0: 0.5 s of compute, 1 s at the server's 1 MB/s; worker 1: 1 s of compute, then waits
    # for the server's link until 1.5 s, 1 s more, and its 10 ms of latency.
    assert arrivals == pytest.approx([1.5, 2.51])


def test_splitfed_serves_each_worker_as_it_arrives_and_merging_waits_for_all():
    arrivals = [3.0, 1.0]  # worker 1 is in first
    assert serving_order(arrivals) == [1, 0]
    assert serving_order([2.0, 1.0, 2.0]) == [1, 0, 2]  # ties to the lower index
    legs = {"gradient": [0, 0], "hidden": [0, 0], "reply": [0, 0]}
    instant = AccessLinks.build([0.0, 10.0, 0.0], [0.0, 0.0, 0.0])  # worker 0 is 10 ms away
    # SplitFed v2: worker 1 at 1 s (+0.5 s forward, +0.25 s rest), then worker 0 from 3 s.
    timeline = [([w], 0.5, 0.25) for w in serving_order(arrivals)]
    assert gradients_back(arrivals, instant, timeline, legs, u_shape=False) == pytest.approx([3.76, 1.75])
    # merged: one group from 3 s, a longer compute.
    assert gradients_back(arrivals, instant, [([0, 1], 0.75, 0.5)], legs, u_shape=False) == pytest.approx([4.26, 4.25])
    # u shape: the output goes to the members and back between the forward and the rest.
    u = gradients_back(
        arrivals, AccessLinks.build([0.0, 10.0, 0.0], [0.0, 0.0, 0.0]), [([0, 1], 0.75, 0.5)], legs, u_shape=True
    )
    assert u == pytest.approx([3.75 + 0.02 + 0.5 + 0.01, 3.75 + 0.02 + 0.5])
    # a worker left out (in no group) is done when its activations are in
    assert gradients_back(arrivals, instant, [([0], 0.5, 0.0)], legs, u_shape=False)[1] == 1.0


def test_the_workers_parts_sync_through_the_server_once_the_last_is_in():
    def links() -> AccessLinks:  # the server and worker 0 at 1 MB/s, worker 1 at 0.5; idle
        return AccessLinks.build([0.0, 0.0, 0.0], [8.0, 8.0, 4.0])

    # 1 MB a part, each queued at its sender's uplink and the server's downlink. Worker 1 (done at
    # 0.5 s) sends in 2 s at its 0.5 MB/s: in at 2.5 s (the server's downlink done at 1.5); worker
    # 0 (done at 1 s) waits for that downlink until 1.5: in at 2.5 s too. The mean goes back through
    # the server's uplink in turn: worker 0 at 3.5 s, worker 1 at 4.5 s (its own downlink: 2.5 + 2).
    assert part_sync([1.0, 0.5], links(), [0, 1], 1_000_000) == pytest.approx([3.5, 4.5])
    # A worker left out sends nothing but gets the mean.
    assert part_sync([1.0, 0.5], links(), [0], 1_000_000) == pytest.approx([3.0, 4.0])
    assert part_sync([1.0, 0.5], links(), [], 1_000_000) == [1.0, 0.5]  # no sync this step


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("split.workers=0", "config key 'split.workers' must be at least 1; got 0"),
        (
            "split.cut=4",
            "config key 'split.cut' must cut the model between two blocks, 1 .. 3 (model.n_layers is 4); got 4",
        ),
        ("split.cut=0", "'split.cut' must cut the model between two blocks"),
        ("split.executors=5", "split.executors (5) cannot exceed split.workers (4)"),
        ("split.aggregate_every=0", "config key 'split.aggregate_every' must be at least 1"),
        ("split.shape=y", "config key 'split.shape' must be one of two, u"),
        ("split.server_lr=0", "config key 'split.server_lr' must be positive"),
    ],
)
def test_bad_split_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, [override])
    assert message in str(err.value)


def test_the_split_world_is_a_server_and_its_executors():
    config = load_config(CONFIG, ["split.executors=3"])
    assert config.shape == (4, 1) and config.world_size == 4 and config.steps == config.train.steps
