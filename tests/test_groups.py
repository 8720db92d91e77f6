"""HierFedLoRA's plain parts, by hand: the partition, the divergence, the rule's depth and rounds,
which parameters a depth tunes, the cloud's per-parameter mean and the cloud tier's timing."""

import numpy as np
import pytest
import torch

from cocodc.devices import DeviceProfiles
from cocodc.federated.groups import (
    cloud_arrivals,
    edge_round_s,
    layerwise_mean,
    partition_clients,
    plan_groups,
    step_cost,
    total_variation,
    tuned_at_depth,
)


def test_total_variation_is_half_the_l1_distance_of_the_normalised_histograms():
    assert total_variation(np.array([1, 1]), np.array([3, 3])) == 0.0
    assert total_variation(np.array([4, 0]), np.array([1, 1])) == 0.5
    assert total_variation(np.array([0, 2]), np.array([5, 0])) == 1.0


def test_mix_groups_pool_to_the_global_mix_where_random_ones_do_not():
    # Clients of one book each, alternating: dealt round-robin, each group would hold one book. The
    # greedy (sizes tie: in index order) gives client 2 to the group it mixes, client 3 to the other.
    histograms = np.array([[4, 0], [0, 4], [4, 0], [0, 4]])
    groups = partition_clients(histograms, 2, "mix", seed=0)
    assert groups == [[0, 3], [1, 2]]
    assert all(total_variation(histograms[g].sum(axis=0), histograms.sum(axis=0)) == 0 for g in groups)
    # Sizes within one; every client in exactly one group.
    five = partition_clients(np.eye(5, dtype=int) + 1, 2, "mix", seed=0)
    assert sorted(len(g) for g in five) == [2, 3] and sorted(sum(five, [])) == list(range(5))
    random = partition_clients(histograms, 2, "random", seed=0)
    assert sorted(sum(random, [])) == [0, 1, 2, 3] and [len(g) for g in random] == [2, 2]
    assert random == partition_clients(histograms, 2, "random", seed=0)  # seeded
    assert any(partition_clients(histograms, 2, "random", seed=s) != random for s in range(1, 8))


def test_a_depth_costs_the_forward_and_its_share_of_the_backward():
    assert step_cost(4, 4) == 1.0
    assert step_cost(1, 4) == pytest.approx((1 + 0.5) / 3)
    assert step_cost(2, 4) == pytest.approx(2 / 3)


def test_an_edge_round_is_the_median_members_download_steps_and_upload():
    profiles = DeviceProfiles(speed=[1.0, 2.0, 0.5], bandwidth_mbps=[8.0, 8.0, 0.0], latency_ms=[10.0, 0.0, 0.0])
    # 1e6 bytes at 1 MB/s each way plus latency, and 10 steps of 0.1 s at the full cost over speed:
    # client 0: 2 x (1 + 0.01) + 1 = 3.02; client 1: 2 x 1 + 0.5 = 2.5; client 2: no link, 2 s of steps.
    common = {"layers": 2, "local_steps": 10, "step_s": 0.1, "update_bytes": 1e6}
    assert edge_round_s(profiles, [0, 1, 2], depth=2, **common) == pytest.approx(2.5)
    assert edge_round_s(profiles, [0], depth=1, **common) == pytest.approx(2.02 + (1 + 1) / 3)


def test_the_rule_gives_slow_groups_fewer_blocks_and_divergent_ones_fewer_edge_rounds():
    # Two groups of one client each, no links: group 0 runs at speed 1, group 1 at speed 1/2.
    profiles = DeviceProfiles(speed=[1.0, 0.5], bandwidth_mbps=[0.0, 0.0], latency_ms=[0.0, 0.0])
    plan = {
        "layers": 4,
        "bytes_at_depth": [0.0] * 5,
        "local_steps": 10,
        "step_s": 0.3,
        "rounds_max": 4,
    }
    groups = plan_groups([[0], [1]], [0.0, 0.25], profiles, **plan)
    # Group 0 at full depth: 3 s. Group 1's step at depth d costs (1 + d/2) / 3 of 6 s: depth 1
    # takes 3 s, depth 2 takes 4: depth 1 keeps pace.
    assert [g.depth for g in groups] == [4, 1]
    assert [g.edge_round_s for g in groups] == pytest.approx([3.0, 3.0])
    # Rounds: 4 for the fastest, times 3 / 3 and 1 - 0.25 for the divergent one.
    assert [g.rounds for g in groups] == [4, 3]
    fixed = plan_groups([[0], [1]], [0.0, 0.25], profiles, **plan, fixed_rounds=2, fixed_depth=3)
    assert [(g.depth, g.rounds) for g in fixed] == [(3, 2), (3, 2)]
    # A group five times slower at depth 1 (15 s) than the fastest at full depth still tunes one
    # block, and gets 4 x 3 / 15 rounds: 1 (at least 1).
    slow = DeviceProfiles(speed=[1.0, 0.1], bandwidth_mbps=[0.0, 0.0], latency_ms=[0.0, 0.0])
    groups = plan_groups([[0], [1]], [0.0, 0.0], slow, **plan)
    assert [g.depth for g in groups] == [4, 1] and [g.rounds for g in groups] == [4, 1]


def test_a_depth_tunes_the_top_blocks_the_layers_above_them_and_the_embedding_only_at_full_depth():
    # embed, block 0, block 1, block 2, norm, head
    block_of = [None, 0, 1, 2, None, None]
    embedding = [True, False, False, False, False, False]
    assert tuned_at_depth(block_of, embedding, 1, 3) == [False, False, False, True, True, True]
    assert tuned_at_depth(block_of, embedding, 2, 3) == [False, False, True, True, True, True]
    assert tuned_at_depth(block_of, embedding, 3, 3) == [True] * 6


def test_the_cloud_averages_each_parameter_over_the_groups_that_tuned_it():
    deltas = [torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 0.0, 0.0])]
    masks = [torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0])]
    # Element 0: (1 x 1 + 3 x 3) / 4; element 1 only group 0's; element 2 no group's.
    assert torch.equal(layerwise_mean(deltas, masks, [1.0, 3.0]), torch.tensor([2.5, 2.0, 0.0]))
    # A group without examples (every client failed) counts nowhere.
    assert torch.equal(layerwise_mean(deltas, masks, [1.0, 0.0]), torch.tensor([1.0, 2.0, 0.0]))


def test_the_edges_uploads_queue_at_the_clouds_link():
    # The cloud's link 1 MB/s, each edge's unlimited with 10 ms one way. The global model (1 MB)
    # goes to edge 0 by 1.01 s and edge 1 by 2.01 s; edge 0's group takes 3 s (ready at 4.01),
    # edge 1's 0.5 s (ready at 2.51, in first): 2.51 + 1 + 0.01 = 3.52; then edge 0 from 4.01.
    arrived = cloud_arrivals(
        [3.0, 0.5],
        download_bytes=[1_000_000, 1_000_000],
        upload_bytes=[1_000_000, 1_000_000],
        edge_link_mbps=0.0,
        edge_latency_ms=10.0,
        cloud_link_mbps=8.0,
    )
    assert arrived == pytest.approx([5.02, 3.52])


def test_a_client_of_a_shallow_group_computes_no_gradient_below_its_blocks():
    from cocodc.config import load_config
    from cocodc.model import Transformer, lm_loss
    from cocodc.modes.federated import _frozen_except

    from conftest import REPO

    config = load_config(REPO / "configs" / "tiny.yaml", ["model.n_layers=3", "model.d_model=32", "model.n_heads=2"])
    model = Transformer(config.model, 64, 16, seed=0)
    params = list(model.parameters())
    block_of = {id(p): i for i, block in enumerate(model.blocks) for p in block.parameters()}
    embedding = {id(p) for p in model.embed.parameters()}
    tuned = tuned_at_depth([block_of.get(id(p)) for p in params], [id(p) in embedding for p in params], 1, 3)
    batch = torch.randint(0, 64, (2, 17))
    with _frozen_except(params, tuned):
        lm_loss(model, batch).backward()
    names = [name for name, _ in model.named_parameters()]
    with_grad = {name for name, p in zip(names, params, strict=True) if p.grad is not None}
    assert with_grad == {name for name, trains in zip(names, tuned, strict=True) if trains}
    assert with_grad and all(n.startswith(("blocks.2.", "norm.", "head.")) for n in with_grad)
    assert all(p.requires_grad for p in params)  # every parameter trains again after the client
