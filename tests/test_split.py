"""The split-learning mode's plain parts: parameter ownership, batch regulation, arrivals, config."""

import pytest

from cocodc.comm.wan import AccessLinks
from cocodc.config import ConfigError, load_config
from cocodc.devices import DeviceProfiles
from cocodc.model import Transformer
from cocodc.split.plan import activation_arrivals, gradients_back, on_worker, per_sequence_s, regulate_batches

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
    assert regulate_batches(32, [1.0, 1.0, 1.0, 1.0]) == [8, 8, 8, 8]
    # rates 1, 1/2, 1/4, 1/4 share the 28 sequences beyond one each: 14, 7, 3.5, 3.5; the one left
    # goes to the largest remainder, the lower index first.
    assert regulate_batches(32, [1.0, 2.0, 4.0, 4.0]) == [15, 8, 5, 4]
    assert regulate_batches(4, [1.0, 100.0, 100.0, 100.0]) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="cannot give 3 workers a sequence each"):
        regulate_batches(2, [1.0, 1.0, 1.0])


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
    arrivals = [1.0, 3.0]
    legs = {"gradient": [0, 0], "hidden": [0, 0], "reply": [0, 0]}
    instant = AccessLinks.build([0.0, 0.0, 10.0], [0.0, 0.0, 0.0])  # worker 1 is 10 ms away
    # SplitFed v2: worker 0 at 1 s (+0.5 s forward, +0.25 s rest), worker 1 from 3 s.
    assert gradients_back(arrivals, instant, [([0], 0.5, 0.25), ([1], 0.5, 0.25)], legs, u_shape=False) == (
        pytest.approx([1.75, 3.76])
    )
    # merged: one group from 3 s, a longer compute.
    assert gradients_back(arrivals, instant, [([0, 1], 0.75, 0.5)], legs, u_shape=False) == pytest.approx([4.25, 4.26])
    # u shape: the output goes to the members and back between the forward and the rest.
    u = gradients_back(
        arrivals, AccessLinks.build([0.0, 0.0, 10.0], [0.0, 0.0, 0.0]), [([0, 1], 0.75, 0.5)], legs, u_shape=True
    )
    assert u == pytest.approx([3.75 + 0.02 + 0.5, 3.75 + 0.02 + 0.5 + 0.01])
    # a worker left out (in no group) is done when its activations are in
    assert gradients_back(arrivals, instant, [([1], 0.5, 0.0)], legs, u_shape=False)[0] == 1.0


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
