"""The federated mode's pure parts: client sampling, dealing, modelled links, client data, config."""

from collections import Counter

import numpy as np
import pytest

from cocodc.comm.wan import AccessLinks
from cocodc.config import ConfigError, DevicesConfig, load_config
from cocodc.data import ClientShards, ShardLoader
from cocodc.devices import DeviceProfiles
from cocodc.federated.clients import Arrival, executor_of, round_arrivals, sample_clients, server_wait_s


@pytest.mark.parametrize(("clients", "per_round"), [(20, 5), (7, 3), (10, 10), (5, 4), (100, 7)])
def test_sampling_is_fair_over_rounds_and_never_repeats_a_client_in_a_round(clients, per_round):
    counts = Counter()
    for server_round in range(1, 80):
        sampled = sample_clients(clients, per_round, seed=3, server_round=server_round)
        assert len(set(sampled)) == per_round
        assert all(0 <= c < clients for c in sampled)
        counts.update(sampled)
        per_client = [counts[c] for c in range(clients)]
        assert max(per_client) - min(per_client) <= 1, (server_round, per_client)


def test_sampling_is_deterministic_for_a_seed():
    rounds = range(1, 30)
    assert [sample_clients(20, 5, 0, r) for r in rounds] == [sample_clients(20, 5, 0, r) for r in rounds]
    assert [sample_clients(20, 5, 0, r) for r in rounds] != [sample_clients(20, 5, 1, r) for r in rounds]


def test_executors_are_dealt_the_round_in_turn():
    assert [executor_of(p, 3) for p in range(7)] == [1, 2, 3, 1, 2, 3, 1]


def test_uploads_queue_fifo_at_the_servers_link():
    # Server (node 0) at 8 Mbit/s = 1 MB/s, clients unlimited, 10 ms each way per node.
    links = AccessLinks.build([10.0, 10.0, 10.0], [8.0, 0.0, 0.0])
    assert links.transfer(1, 0, 1e6, 0.0) == pytest.approx(1.0 + 0.02)
    assert links.transfer(2, 0, 1e6, 0.0) == pytest.approx(2.0 + 0.02)  # waited for the first
    assert links.transfer(2, 0, 1e6, 5.0) == pytest.approx(6.0 + 0.02)  # the link was idle by then
    # The slower end sets the rate: a 1 MB/s client to an unlimited node.
    assert AccessLinks.build([0.0, 0.0], [0.0, 8.0]).transfer(1, 0, 2e6, 0.0) == pytest.approx(2.0)


def test_round_arrivals_by_hand():
    # Two clients: speeds 1 and 2, 8 and 16 Mbit/s links, no latency; server unlimited.
    profiles = DeviceProfiles(speed=[1.0, 2.0], bandwidth_mbps=[8.0, 16.0], latency_ms=[0.0, 0.0])
    arrivals = round_arrivals(
        profiles,
        [1, 0],
        download_bytes=1_000_000,
        upload_bytes=[500_000, 1_000_000],
        local_steps=4,
        step_s=0.5,
        server_bandwidth_mbps=0.0,
    )
    # client 1: download 1 MB at 2 MB/s = 0.5 s, 4 x 0.5 s / 2 = 1 s of steps, upload 0.5 MB = 0.25 s
    # client 0: download 1 s, 2 s of steps, upload 1 MB at 1 MB/s = 1 s
    assert [(a.client, a.trained_at, a.arrived_at) for a in arrivals] == [(1, 1.5, 1.75), (0, 3.0, 4.0)]


def test_the_server_waits_for_every_update_to_the_deadline_and_for_a_failed_client_to_it():
    arrivals = [Arrival(0, 0.5, 1.0), Arrival(1, 2.0, 3.0), Arrival(2, 4.0, 5.0)]
    # Without a deadline the server waits for every update, a failed client's until it was due (the
    # caller times it as if sent): nothing tells the server of a failure before then.
    assert server_wait_s(arrivals, failed=[], deadline_s=0.0) == 5.0
    assert server_wait_s(arrivals[:2], failed=[1], deadline_s=0.0) == 3.0
    assert server_wait_s(arrivals, failed=[], deadline_s=4.0) == 4.0  # client 2 is late
    assert server_wait_s(arrivals, failed=[], deadline_s=6.0) == 5.0
    # A failed client costs the whole deadline, though every other update is in at 3 s.
    assert server_wait_s(arrivals[:2], failed=[0], deadline_s=4.0) == 4.0
    assert server_wait_s(arrivals, failed=[0, 1, 2], deadline_s=4.0) == 4.0  # a round of failures is not free


def test_round_arrivals_queue_at_a_slow_server():
    profiles = DeviceProfiles(speed=[1.0, 1.0], bandwidth_mbps=[0.0, 0.0], latency_ms=[0.0, 0.0])
    arrivals = round_arrivals(
        profiles,
        [0, 1],
        download_bytes=1e6,
        upload_bytes=[1e6, 1e6],
        local_steps=1,
        step_s=1.0,
        server_bandwidth_mbps=8.0,
    )
    # Downloads leave the server one after the other (1 s each); uploads queue behind each other.
    assert [(a.trained_at, a.arrived_at) for a in arrivals] == [(2.0, 3.0), (3.0, 4.0)]


def test_client_profiles_are_seeded_and_spread_as_configured():
    devices = DevicesConfig(speed_spread=4.0, bandwidth_mbps=20.0, bandwidth_spread=4.0, latency_ms=40.0)
    profiles = DeviceProfiles.draw(200, 0, devices)
    assert profiles == DeviceProfiles.draw(200, 0, devices)
    assert min(profiles.speed) >= 0.5 and max(profiles.speed) <= 2.0
    assert max(profiles.speed) / min(profiles.speed) > 3.0
    assert min(profiles.bandwidth_mbps) >= 10.0 and max(profiles.bandwidth_mbps) <= 40.0
    assert profiles.latency_ms == [40.0] * 200


def test_a_clients_batches_continue_across_rounds():
    sequences = np.arange(40 * 3).reshape(40, 3)
    shards = ClientShards(sequences, [np.arange(0, 40, 2), np.arange(1, 40, 2)], batch_size=3, seed=7)
    continuous = shards.loader(1)
    expected = [continuous.next_batch() for _ in range(14)]  # past an epoch of 6 batches, twice
    drawn = []
    for _ in range(7):
        loader = shards.loader(1)
        drawn += [loader.next_batch(), loader.next_batch()]
        shards.batches_done[1] += 2
    assert all((a == b).all() for a, b in zip(drawn, expected, strict=True))
    assert shards.examples(0) == 20


def test_a_client_shard_smaller_than_a_batch_is_a_clear_error():
    with pytest.raises(ConfigError, match="federated client 1's data shard holds 2 sequences"):
        ClientShards(np.zeros((10, 3)), [np.arange(8), np.arange(8, 10)], batch_size=4, seed=0)
    with pytest.raises(ConfigError, match="a rank's data shard holds 3 sequences, fewer than a step's batch of 4"):
        ShardLoader(np.zeros((10, 3)), np.arange(3), 4, [0])
    exactly_one_batch = ClientShards(np.zeros((10, 3)), [np.arange(4)], batch_size=4, seed=0)
    assert exactly_one_batch.loader(0).next_batch().shape == (4, 3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("federated.clients=0", "'federated.clients' must be at least 1"),
        ("federated.clients_per_round=30", "'federated.clients_per_round' (30) cannot exceed federated.clients (20)"),
        ("federated.executors=0", "'federated.executors' must be at least 1"),
        ("federated.strategy=fedsgd", "'federated.strategy' must be one of"),
        ("federated.strategy=fedprox", "fedprox needs a positive federated.proximal_mu"),
        ("federated.server_lr=0.1", "federated.server_lr sets a server optimizer; federated.strategy fedavg has none"),
        ("federated.deadline_s=-1", "'federated.deadline_s' must not be negative"),
        ("devices.speed_spread=0.5", "'devices.speed_spread' is a ratio"),
        ("federated.lora_rank=4", "set model.init_from to it"),
        ("model.init_from=/no/such/ckpt.pt", "model.init_from: no such run directory, model directory or file: /no/"),
        ("federated.init_from=/a/run", "config key 'federated.init_from' is now 'model.init_from'"),
        ("federated.quantize=int4", "'federated.quantize' must be one of"),
    ],
)
def test_bad_federated_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config("configs/federated.yaml", [override])
    assert message in str(err.value)


def test_federated_world_is_a_server_and_its_executors():
    config = load_config("configs/federated.yaml", ["federated.executors=3"])
    assert config.shape == (4, 1) and config.world_size == 4 and config.steps == config.federated.rounds
