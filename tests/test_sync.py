"""The outer-sync math on tiny tensors, with hand-computed values."""

import random
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cocodc.comm import CommEngine
from cocodc.config import ModelConfig, SyncConfig
from cocodc.kernels.reference import merge_alpha, merge_compensated, update_normalisers
from cocodc.model import Transformer
from cocodc.sync import OuterSync
from cocodc.sync.fragments import block_groups, split_model
from cocodc.sync.schedule import AdaptiveSchedule, RoundRobinSchedule, Slot

from conftest import gloo_group


def timeline(schedule: RoundRobinSchedule, steps: int) -> list[tuple[int, str, int]]:
    events = []
    for step in range(1, steps + 1):
        events += [(step, "send", slot.fragment) for slot in schedule.sends_at(step)]
        events += [(step, "apply", slot.fragment) for slot in schedule.applies_at(step)]
    return events


def test_schedule_diloco_sends_and_applies_every_h():
    assert timeline(RoundRobinSchedule(4, 1, 0), 9) == [
        (4, "send", 0),
        (4, "apply", 0),
        (8, "send", 0),
        (8, "apply", 0),
    ]


def test_schedule_streaming_round_robin_with_overlap():
    # H=8, P=2: slots of K=4 steps; tau=2 sends two steps before each slot ends.
    assert timeline(RoundRobinSchedule(8, 2, 2), 12) == [
        (2, "send", 0),
        (4, "apply", 0),
        (6, "send", 1),
        (8, "apply", 1),
        (10, "send", 0),
        (12, "apply", 0),
    ]


def test_schedule_several_in_flight_and_skipped_first_slot():
    # H=8, P=4, K=2, tau=3 >= K: slot 1 would send at step -1 and is skipped; two fragments overlap.
    events = timeline(RoundRobinSchedule(8, 4, 3), 10)
    assert events == [
        (1, "send", 1),
        (3, "send", 2),
        (4, "apply", 1),
        (5, "send", 3),
        (6, "apply", 2),
        (7, "send", 0),
        (8, "apply", 3),
        (9, "send", 1),
        (10, "apply", 0),
    ]


def test_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="multiple"):
        RoundRobinSchedule(10, 3, 0)
    with pytest.raises(ValueError, match="delay"):
        RoundRobinSchedule(8, 2, 8)


def test_fragments_strided_and_sequential():
    assert block_groups(4, 2, "strided") == [[0, 2], [1, 3]]
    assert block_groups(5, 2, "sequential") == [[0, 1], [2, 3, 4]]
    model = Transformer(ModelConfig(n_layers=4, d_model=16, n_heads=2), vocab_size=32, max_seq_len=8)
    strided = split_model(model, 2, "strided")
    assert strided[0].names[0] == "embed.weight" and strided[1].names[-1] == "head.weight"
    assert {n.split(".")[1] for n in strided[0].names if n.startswith("blocks")} == {"0", "2"}
    sequential = split_model(model, 2, "sequential")
    assert {n.split(".")[1] for n in sequential[1].names if n.startswith("blocks")} == {"2", "3"}
    assert "norm.weight" in sequential[1].names
    for fragments in (strided, sequential, split_model(model, 1)):
        ids = [id(p) for f in fragments for p in f.params]
        assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once


def test_merge_ends():
    live, new = torch.tensor([0.1, 0.7]), torch.tensor([0.3, 0.2])
    assert (live + (new - live) != new).any()  # a naive mix would not be exact at alpha = 0
    replaced = [live.clone()]
    merge_alpha(replaced, [new], 0.0)
    assert torch.equal(replaced[0], new)
    kept = [live.clone()]
    merge_alpha(kept, [new], 1.0)
    assert torch.equal(kept[0], live)
    half = [torch.tensor([1.0, 2.0])]
    merge_alpha(half, [torch.tensor([3.0, 0.0])], 0.5)
    assert torch.equal(half[0], torch.tensor([2.0, 1.0]))


def scalar_module(value: float) -> nn.Module:
    module = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(value)
    return module


def test_nesterov_outer_steps_by_hand():
    # One region: the mean pseudo-gradient is the region's own. lr 0.7, momentum 0.9, Nesterov:
    # step 1: g=0.4, buf=0.4, update=g+0.9*buf=0.76, theta=1-0.7*0.76=0.468
    # step 2: g=0.2, buf=0.9*0.4+0.2=0.56, update=0.2+0.9*0.56=0.704, theta=0.468-0.7*0.704=-0.0248
    module = scalar_module(1.0)
    outer = OuterSync(module, SyncConfig(method="diloco", sync_every=2), CommEngine(None))
    weight = module.weight
    outer.step()
    with torch.no_grad():
        weight.fill_(0.6)
    outer.step()
    assert weight.item() == pytest.approx(0.468, abs=1e-6)  # replaced by the new global value
    assert outer.global_params[0][0].item() == pytest.approx(0.468, abs=1e-6)
    with torch.no_grad():
        weight.fill_(0.268)
    outer.step()
    outer.step()
    assert weight.item() == pytest.approx(-0.0248, abs=1e-6)
    assert outer.outer_steps == 2


def _two_region_worker(rank: int, store: str, results) -> None:
    with gloo_group(rank, store):
        module = scalar_module(1.0)
        outer = OuterSync(module, SyncConfig(method="diloco", sync_every=1), group=dist.group.WORLD)
        with torch.no_grad():
            module.weight.fill_([0.5, 0.7][rank])
        outer.step()
        record = outer.pop_records()[0]
        results[rank] = (module.weight.item(), record["bytes_sent"])


def test_pseudo_gradients_are_averaged_over_regions(tmp_path):
    # Real gloo group of two processes: deltas 0.5 and 0.3 average to 0.4, so both regions land on
    # 1 - 0.7 * 1.9 * 0.4 = 0.468. A ring all-reduce over 2 ranks moves the payload once each way:
    # one fp32 and the two regions' weights riding along, 12 bytes.
    results = mp.Manager().dict()
    mp.spawn(_two_region_worker, args=(str(tmp_path / "store"), results), nprocs=2)
    for rank in (0, 1):
        weight, sent = results[rank]
        assert weight == pytest.approx(0.468, abs=1e-6)
        assert sent == 12


def _streaming_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(n_layers=2, d_model=16, n_heads=2), vocab_size=16, max_seq_len=8)


def _drift(model: nn.Module, step: int) -> None:
    """A stand-in inner step: a deterministic change of every parameter."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.full_like(p, 0.01 * ((step + i) % 5 - 2)))


@pytest.mark.parametrize(
    "config",
    [
        SyncConfig(method="streaming", sync_every=4, fragments=2, delay=1, alpha=0.5),
        SyncConfig(method="cocodc", sync_every=4, fragments=2, delay=1, alpha=0.5, dc_normaliser="running"),
        SyncConfig(
            method="cocodc",
            sync_every=4,
            fragments=2,
            delay=1,
            schedule="adaptive",
            adaptive_delay=False,
            dc_normaliser="running",
        ),
    ],
    ids=["streaming", "cocodc", "cocodc-adaptive-schedule"],
)
def test_state_dict_continues_exactly_with_fragments_in_flight(config):
    reference = _streaming_model()
    outer = OuterSync(reference, config, CommEngine(None))
    for step in range(1, 13):
        _drift(reference, step)
        outer.step()
    outer.finish()

    first = _streaming_model()
    outer = OuterSync(first, config, CommEngine(None))
    for step in range(1, 6):  # step 5 sends fragment 0 (slot 3 ends at 6): it is in flight
        _drift(first, step)
        outer.step()
    state, weights = outer.state_dict(), {k: v.clone() for k, v in first.state_dict().items()}
    assert len(state["in_flight"]) == 1
    resumed = _streaming_model()
    resumed.load_state_dict(weights)
    outer = OuterSync(resumed, config, CommEngine(None))
    outer.load_state_dict(state)
    for step in range(6, 13):
        _drift(resumed, step)
        outer.step()
    outer.finish()
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_global_parameters_swap_restores_live():
    module = scalar_module(1.0)
    outer = OuterSync(module, SyncConfig(method="diloco", sync_every=10), CommEngine(None))
    with torch.no_grad():
        module.weight.fill_(0.25)
    with outer.global_parameters():
        assert module.weight.item() == 1.0
    assert module.weight.item() == 0.25


def _overlap_worker(rank: int, store: str, results) -> None:
    from cocodc.comm.wan import LinkModel

    with gloo_group(rank, store):
        for name, config in {
            "diloco": SyncConfig(method="diloco", sync_every=8),
            "streaming": SyncConfig(method="streaming", sync_every=8, fragments=2, delay=3),
        }.items():
            model = _streaming_model()
            # 50 ms one-way at 2 Mbit/s: 0.24 s for the whole model (8.8k fp32), 0.17 s a fragment.
            engine = CommEngine(dist.group.WORLD, LinkModel.build(2, 50, 2))
            outer = OuterSync(model, config, engine)
            for step in range(1, 17):
                time.sleep(0.1)  # the inner step; three of them hide a fragment's transfer
                _drift(model, step)
                outer.step()
            outer.finish()
            records = outer.pop_records()
            results[rank, name] = (
                [(r["fragment"], r["send_step"], r["apply_step"]) for r in records],
                sum(r["modelled_s"] for r in records),
                engine.blocked_s,
            )


def test_streaming_and_diloco_under_the_link_model(tmp_path):
    # Real gloo group and the link model; the inner step is a sleep. DiLoCo waits out every
    # transfer; Streaming DiLoCo sends each fragment 3 steps (0.3 s) before it needs it.
    results = mp.Manager().dict()
    mp.spawn(_overlap_worker, args=(str(tmp_path / "store"), results), nprocs=2)
    for rank in (0, 1):
        syncs, modelled, blocked = results[rank, "diloco"]
        assert syncs == [(0, 8, 8), (0, 16, 16)]
        assert 0.4 < modelled < 0.6 and blocked >= modelled - 0.01  # a handle never completes before the link
        syncs, modelled, blocked = results[rank, "streaming"]
        assert syncs == [(0, 1, 4), (1, 5, 8), (0, 9, 12), (1, 13, 16)]
        assert 0.55 < modelled < 0.8  # how much it hides is a timing: benchmarks/overlap.py measures it


def _lookahead_worker(rank: int, store: str, results) -> None:
    with gloo_group(rank, store):
        model = _streaming_model()  # 2 blocks: P = 2, K = 4, tau up to 7 (lookahead 1)
        config = SyncConfig(
            method="cocodc", sync_every=8, fragments=2, delay=6, schedule="adaptive", dc_normaliser="running"
        )
        outer = OuterSync(model, config, group=dist.group.WORLD)
        most_in_flight = 0
        for step in range(1, 41):
            time.sleep(0.002 * (1 + rank))  # the regions' own step times differ; the decisions must not
            with torch.no_grad():
                for i, p in enumerate(model.parameters()):
                    p.add_(torch.full_like(p, 0.01 * ((step * (rank + 1) + i) % 5 - 2)))
            outer.step()
            most_in_flight = max(most_in_flight, len(outer._in_flight))
        outer.finish()
        records = outer.pop_records()
        decisions = [(r["slot"], r["fragment"], r["send_step"], r["apply_step"], r["planned"]) for r in records
                     if r["kind"] == "decision"]  # fmt: skip
        results[rank] = (decisions, most_in_flight, [t.clone() for t in outer.global_params[0]])


def test_several_fragments_in_flight_decided_alike_on_every_rank(tmp_path):
    # Real gloo group of two regions with different drifts and step times; tau (6) above K (4)
    # puts two fragments in flight. Every rank plans the same slots from the numbers it holds.
    results = mp.Manager().dict()
    mp.spawn(_lookahead_worker, args=(str(tmp_path / "store"), results), nprocs=2)
    (decisions, in_flight, global_0), (other, _, other_global_0) = results[0], results[1]
    assert decisions == other and len(decisions) >= 10
    assert in_flight == 2
    assert any(planned for *_, planned in decisions)  # decided while another fragment was planned
    assert all(torch.equal(a, b) for a, b in zip(global_0, other_global_0, strict=True))


def test_compensated_merge_by_hand():
    # delta = live - sent = [0.5, 0]; global - sent = [0.25, -1].
    live, sent, new = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.0]), torch.tensor([0.75, 1.0])

    def merged(dc_lambda, alpha=0.0, normaliser=None):
        out = [live.clone()]
        merge_compensated(out, [new], [sent], dc_lambda, alpha, None if normaliser is None else [normaliser])
        return out[0].tolist()

    assert merged(0.0) == [1.25, 1.0]  # replay: global + delta
    assert merged(2.0) == [1.125, 1.0]  # w = 2 * 0.25 = 0.5: 0.75 + 0.5 - 0.5 * 0.25
    assert merged(2.0, alpha=0.5) == [1.0625, 1.5]  # halfway back to live
    assert merged(2.0, alpha=1.0) == [1.0, 2.0]  # the mix at its ends: all live
    assert merged(0.0, alpha=0.5) == [1.125, 1.5]  # halfway between the replay and live
    # Adaptive: w = clamp(lambda * delta^2 / v, 0, 1). v = 1: w = 0.5 * 0.25 = 0.125 -> 0.75 + 0.5 - 0.03125.
    assert merged(0.5, normaliser=torch.tensor([1.0, 1.0])) == [1.21875, 1.0]
    # v = delta^2 (the first update): w = lambda; lambda 4 clamps to w = 1, which keeps live exactly.
    assert merged(4.0, normaliser=torch.tensor([0.25, 0.0])) == [1.0, 1.0]


def test_adaptive_normaliser_running_mean():
    v = [torch.zeros(2)]
    update_normalisers(v, [torch.tensor([1.0, 3.0])], [torch.tensor([0.0, 1.0])], beta=0.0)
    assert v[0].tolist() == [1.0, 4.0]  # the first update takes delta^2 whole
    update_normalisers(v, [torch.tensor([3.0, 1.0])], [torch.tensor([0.0, 1.0])], beta=0.75)
    assert v[0].tolist() == [0.75 * 1.0 + 0.25 * 9.0, 0.75 * 4.0]


@pytest.mark.parametrize("method, expected", [("streaming", 0.468), ("cocodc", 0.368)])
def test_cocodc_in_a_user_loop(method, expected):
    # One region, H = 2, tau = 1: send after step 1 (weight 0.6, pseudo-gradient 0.4), apply after
    # step 2 (weight 0.5). Outer Nesterov step: 1 - 0.7 * 1.9 * 0.4 = 0.468. Streaming takes it;
    # cocodc with lambda 0 replays the -0.1 the region moved while the fragment was in flight.
    module = scalar_module(1.0)
    config = SyncConfig(method=method, sync_every=2, delay=1, alpha=0.0, dc_lambda=0.0, dc_adaptive=False)
    outer = OuterSync([module], config, CommEngine(None))
    for weight in (0.6, 0.5):
        with torch.no_grad():
            module.weight.fill_(weight)
        outer.step()
    assert module.weight.item() == pytest.approx(expected, abs=1e-6)
    assert outer.global_params[0][0].item() == pytest.approx(0.468, abs=1e-6)


def test_adaptive_schedule_picks_the_largest_current_drift_and_keeps_the_bound_at_the_apply():
    # H = 12, P = 3: slots of K = 4 steps; staleness bound 16 steps.
    schedule = AdaptiveSchedule(12, 3, delay=2, max_staleness=16)
    first = schedule.decide(1, [0, 0, 0])
    assert (first.reason, first.slots) == ("round-robin", (Slot(1, 0, 2, 4),))
    # Fragment 1 drifts most; tau covers 0.35 s of transfer at 0.1 s a step with a 1.25 margin: 5,
    # clamped to K - 1 = 3. Fragment 0's drift was measured at step 2, before its apply at 4: it counts 0.
    chosen = schedule.decide(2, [4, 0, 0], drift=[0.9, 0.7, 0.2], step_s=0.1, transfer_s=0.35, measured_at=2)
    assert (chosen.reason, chosen.slots) == ("drift", (Slot(2, 1, 5, 8),))
    # The numbers that rode along with fragment 1 were measured at its send (5): fragment 1, applied
    # at 8, is not picked again on them, though its old drift is the largest.
    again = schedule.decide(3, [4, 8, 0], drift=[0.1, 0.7, 0.2], step_s=0.1, transfer_s=0.1, measured_at=5)
    assert (again.reason, again.slots[0].fragment, again.slots[0].send_step) == ("drift", 2, 10)
    # Slot 5 applies at 20; waiting one more slot would leave fragment 1 unsynced from 4 to 24 > 16
    # steps: it goes now, whatever the drift says; of two such fragments the longer-waiting one.
    stale = schedule.decide(5, [16, 4, 12], drift=[0.9, 0.0, 0.9], measured_at=14)
    assert (stale.reason, stale.slots[0].fragment) == ("stale", 1)
    assert schedule.decide(6, [8, 4, 20], drift=[0.9, 0.9, 0.9], measured_at=18).slots[0].fragment == 1
    # Equal current drift: the fragment applied longest ago.
    assert schedule.decide(6, [20, 12, 16], drift=[0.5, 0.5, 0.5], measured_at=18).slots[0].fragment == 1
    with pytest.raises(ValueError, match=r"max_staleness \(8\) must be at least sync_every \(12\)"):
        AdaptiveSchedule(12, 3, delay=2, max_staleness=8)


@pytest.mark.parametrize("seed", range(20))
def test_adaptive_schedule_keeps_its_bound_and_never_repicks_on_old_numbers(seed):
    rng = random.Random(seed)
    fragments = rng.choice([2, 3, 4, 6])
    slot_len = rng.choice([2, 3, 5, 8])
    sync_every = fragments * slot_len
    bound = rng.randint(sync_every, 3 * sync_every)
    schedule = AdaptiveSchedule(sync_every, fragments, delay=1, max_staleness=bound)
    last_applied, drift, measured_at, previous = [0] * fragments, None, 0, None
    for index in range(1, 200):
        decision = schedule.decide(index, last_applied, drift, measured_at=measured_at)
        slot = decision.slots[0]
        if previous is not None and decision.reason == "drift":
            assert slot.fragment != previous.fragment  # its drift predates its apply
        # The telemetry that rides along is measured at this send, for every fragment.
        drift = [rng.expovariate(1.0) for _ in range(fragments)]
        measured_at = slot.send_step
        assert slot.apply_step - last_applied[slot.fragment] <= bound
        last_applied[slot.fragment] = slot.apply_step
        assert all(slot.apply_step - last <= bound for last in last_applied)
        previous = slot


def test_adaptive_schedule_timeline_and_bounds():
    schedule = AdaptiveSchedule(8, 2, delay=0)  # tau at least 1, at most K - 1 = 3
    slot = schedule.decide(1, [0, 0]).slots[0]
    assert (slot.send_step, slot.apply_step) == (3, 4)
    assert schedule.sends_at(3) == [slot] and schedule.applies_at(4) == [slot] and schedule.sends_at(4) == []
    assert schedule.decide(2, [4, 0], drift=[1.0, 0.0], step_s=1.0, transfer_s=100.0).slots[0].send_step == 5
    assert schedule.decide(3, [4, 8], drift=[1.0, 0.0], step_s=1.0, transfer_s=0.01).slots[0].send_step == 11
    assert set(schedule.planned) == {(3, 0)}  # slots 1 and 2 were applied (steps 4, 8) before slot 3 began
    with pytest.raises(ValueError, match="slots of 2\\+ steps"):
        AdaptiveSchedule(4, 4, delay=1)
    with pytest.raises(ValueError, match=r"delay \(8\) must lie in \[0, sync_every=8\)"):
        AdaptiveSchedule(8, 2, delay=8)


@pytest.mark.parametrize("seed", range(20))
def test_adaptive_schedule_with_several_fragments_in_flight(seed):
    # Slots decided `lookahead` slots ahead, as OuterSync calls it: at every slot start, from the
    # numbers of the last fragment applied by then; with `link_share`, several fragments a slot
    # where the transfers leave room. No fragment is ever in flight twice, the bound holds at every
    # apply, and no fragment is picked on numbers older than its last apply.
    rng = random.Random(seed)
    fragments = rng.choice([2, 3, 4, 6])
    slot_len = rng.choice([2, 3, 5])
    sync_every = fragments * slot_len
    delay = rng.randrange(0, sync_every)  # tau up to H - 1: lookahead 0 .. P - 1
    bound = rng.randint(sync_every, 3 * sync_every)
    link_share = rng.choice([0.0, 0.5, 1.0]) if delay >= slot_len else 1.0
    schedule = AdaptiveSchedule(sync_every, fragments, delay=delay, max_staleness=bound, link_share=link_share)
    assert schedule.lookahead == delay // slot_len
    slots: list = []
    for start in range(0, 150 * slot_len, slot_len):  # the step each slot begins after
        applied = [s for s in slots if s.apply_step <= start and s.send_step >= 1]
        last_applied = [max([s.apply_step for s in applied if s.fragment == p], default=0) for p in range(fragments)]
        latest = max(applied, key=lambda s: s.apply_step, default=None)
        drift = [rng.expovariate(1.0) for _ in range(fragments)] if latest is not None else None
        measured_at = latest.send_step if latest is not None else 0
        first = start // slot_len + 1
        for index in range(1 if start == 0 else first + schedule.lookahead, first + schedule.lookahead + 1):
            step_s, transfer_s = (0.1, rng.uniform(0.0, 0.1 * sync_every)) if drift is not None else (0.0, 0.0)
            pending = {s.fragment for s in slots if s.apply_step > start and s.send_step >= 1}
            decision = schedule.decide(index, last_applied, drift, step_s, transfer_s, measured_at)
            first_slot, *extra = decision.slots
            assert first_slot.send_step > start or first_slot.send_step < 1  # never sent before it was decided
            assert not {s.fragment for s in decision.slots} & pending
            current = {p: drift[p] if drift and last_applied[p] < measured_at else 0.0 for p in range(fragments)}
            if decision.reason == "drift":  # the largest current drift among the free fragments
                assert current[first_slot.fragment] == max(current[p] for p in range(fragments) if p not in pending)
            if extra:  # the link had room: more fragments that drifted since their numbers, tau covering all
                assert link_share > 0 and all(current[s.fragment] > 0 for s in extra)
                assert len(decision.slots) <= link_share * slot_len * step_s / transfer_s
                assert {(s.send_step, s.apply_step) for s in extra} == {(first_slot.send_step, first_slot.apply_step)}
            slots += decision.slots
    sent = [s for s in slots if s.send_step >= 1]
    most = max(sum(s.send_step <= t < s.apply_step for s in sent) for t in range(1, sent[-1].apply_step))
    assert most >= 2 or schedule.lookahead == 0 and not any(s.part for s in sent)
    for a in sent:  # no fragment in flight twice
        twice = [b for b in sent if b is not a and b.fragment == a.fragment]
        assert not any(b.send_step < a.apply_step and a.send_step < b.apply_step for b in twice)
    # The bound from each fragment's first apply on: before it, the start governs (no send
    # precedes step 1, so with tau near H the first applies come late, as round-robin's do).
    last = [0] * fragments
    for slot in sorted(sent, key=lambda s: s.apply_step):
        last[slot.fragment] = slot.apply_step
        assert all(slot.apply_step - t <= bound for t in last if t)


def test_link_share_sends_what_fits_and_keeps_streaming_cadence_on_a_slow_link():
    # H = 12, P = 3: slots of K = 4 steps of 0.1 s; half the link is 0.2 s a slot.
    schedule = AdaptiveSchedule(12, 3, delay=2, link_share=0.5)
    drift, applied = [0.9, 0.5, 0.2], [4, 8, 0]
    # 0.05 s a fragment: all three fit (4 would); they share the link, so tau covers 3 x 0.05 s x 1.25.
    fast = schedule.decide(3, applied, drift, step_s=0.1, transfer_s=0.05, measured_at=9)
    assert [(s.fragment, s.part, s.send_step, s.apply_step) for s in fast.slots] == [(0, 0, 10, 12), (1, 1, 10, 12),
                                                                                     (2, 2, 10, 12)]  # fmt: skip
    # 0.3 s a fragment: none fits beside the first; one a slot, Streaming DiLoCo's cadence.
    slow = schedule.decide(4, [12, 12, 12], drift, step_s=0.1, transfer_s=0.3, measured_at=13)
    assert len(slow.slots) == 1 and slow.slots[0].send_step == 13  # tau 1.25 x 3 = 4 steps, clamped to K - 1
    # A fragment that has not drifted since its numbers were measured does not ride along.
    fresh = schedule.decide(5, [12, 16, 12], drift, step_s=0.1, transfer_s=0.05, measured_at=14)
    assert [s.fragment for s in fresh.slots] == [0, 2]


def test_an_idle_link_carries_several_fragments_a_slot():
    # One region: a transfer within one process is seen done at the next step, so it measures
    # about a step, against slots of 4 steps: the link is mostly idle and the fragments that
    # drifted since the numbers were measured ride along; each is sent and applied exactly once.
    config = SyncConfig(
        method="cocodc",
        sync_every=16,
        fragments=4,
        delay=1,
        schedule="adaptive",
        link_share=1.0,
        dc_normaliser="running",
    )
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=4, d_model=16, n_heads=2), vocab_size=16, max_seq_len=8)
    outer = OuterSync(model, config, CommEngine(None))
    for step in range(1, 25):
        time.sleep(0.001)  # a measurable step time
        _drift(model, step)
        outer.step()
    records = outer.pop_records()
    decisions = [r for r in records if r["kind"] == "decision" and r["send_step"] >= 1]
    syncs = [(r["fragment"], r["send_step"], r["apply_step"]) for r in records if r["kind"] == "sync"]
    assert any(r["reason"] == "capacity" for r in decisions)
    assert sorted(syncs) == sorted((r["fragment"], r["send_step"], r["apply_step"]) for r in decisions)
    assert max(sum(r["apply_step"] == step for r in decisions) for step in range(1, 25)) >= 2


def test_a_run_continued_past_its_end_skips_what_finish_applied():
    # tau = 3 >= K = 2: at the end of 10 steps fragments are in flight; finish() applies them, the
    # final checkpoint holds that, and a run continued to 16 steps must not look for them again.
    config = SyncConfig(method="streaming", sync_every=4, fragments=2, delay=3)
    model = _streaming_model()
    outer = OuterSync(model, config, CommEngine(None))
    for step in range(1, 11):
        _drift(model, step)
        outer.step()
    assert outer._in_flight
    outer.finish()
    state = outer.state_dict()
    resumed = OuterSync(model, config, CommEngine(None))
    resumed.load_state_dict(state)
    for step in range(11, 17):
        _drift(model, step)
        resumed.step()
    applied = [(r["send_step"], r["apply_step"]) for r in resumed.pop_records()]
    assert applied == [(11, 14), (13, 16)]  # slot 6 (sent at 9, due at 12) was applied by finish()


def _nan_worker(rank: int, store: str, results) -> None:
    with gloo_group(rank, store, world_size=3):
        for codec in ("fp32", "e3m0"):
            module = scalar_module(1.0)
            config = SyncConfig(method="diloco", sync_every=1, quantize=codec)
            outer = OuterSync(module, config, group=dist.group.WORLD)
            with torch.no_grad():
                module.weight.fill_([0.5, float("nan"), 0.7][rank])
            outer.step()
            record = outer.pop_records()[0]
            results[rank, codec] = (module.weight.item(), outer.global_params[0][0].item(), record["excluded"])


def test_a_non_finite_pseudo_gradient_is_left_out_of_the_mean(tmp_path):
    # Three regions, region 1's update is NaN: the mean is over regions 0 and 2 (0.5 and 0.3, so
    # 0.4: 1 - 0.7 * 1.9 * 0.4 = 0.468; 0.5 and 0.25 are exact in 4 bits, 0.3 is not, so e3m0 gives
    # another finite value), every region holds the same finite global copy, and region 1 takes it.
    results = mp.Manager().dict()
    mp.spawn(_nan_worker, args=(str(tmp_path / "store"), results), nprocs=3)
    for codec in ("fp32", "e3m0"):
        finals = [results[rank, codec] for rank in range(3)]
        assert all(excluded == [1] for _, _, excluded in finals)
        globals_ = {g for _, g, _ in finals}
        assert len(globals_) == 1 and all(w == g for w, g, _ in finals)
        if codec == "fp32":
            assert finals[0][1] == pytest.approx(0.468, abs=1e-6)
        assert torch.isfinite(torch.tensor(finals[0][1]))


def _checkpoint_order_worker(rank: int, store: str, results) -> None:
    import os

    from cocodc.config import load_config
    from cocodc.modes.regions import RegionsMode
    from cocodc.topology import init_topology
    from cocodc.trainer import Totals, state_parts

    os.environ["WORLD_SIZE"] = "2"
    with gloo_group(rank, store):
        config = load_config(None, ["sync.method=streaming", "sync.sync_every=8", "sync.fragments=2",
                                    "sync.delay=3", "wan.latency_ms=300", "model.n_layers=2"])  # fmt: skip
        topology = init_topology(config)
        model = _streaming_model()
        mode = RegionsMode(config, topology, model, CommEngine(topology.intra_group))
        for step in range(1, 6):  # step 5 sends fragment 1 over a 300 ms link
            _drift(model, step)
            mode.after_step()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = nn.Linear(1, 1)  # any stateful part stands in for the data loader here
        parts = state_parts(model, optimizer, mode, loader, Totals())
        state = {name: part.state_dict() for name, part in parts.items()}
        results[rank] = (state["wan"]["blocked_s"], mode.wan.blocked_s, len(state["outer"]["in_flight"]))


def test_a_checkpoint_counts_the_wait_for_fragments_in_flight(tmp_path):
    # Saving the outer sync waits for the fragment in flight; the engine's counters are saved after
    # it, so the time blocked in that wait is in the checkpoint and survives a resume.
    results = mp.Manager().dict()
    mp.spawn(_checkpoint_order_worker, args=(str(tmp_path / "store"), results), nprocs=2)
    for rank in (0, 1):
        saved, final, in_flight = results[rank]
        assert in_flight == 1 and saved == final and saved > 0.25


def _cuda_steps(outer: OuterSync, model: nn.Module, steps: range) -> None:
    for step in steps:
        _drift(model, step)
        outer.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adaptive_cocodc_on_cuda_resumes_from_a_cpu_checkpoint():
    # The telemetry rides along with a payload on the device; a checkpoint is loaded onto the CPU
    # and what was in flight must return to the device for the merge.
    config = SyncConfig(
        method="cocodc", sync_every=4, fragments=2, delay=1, schedule="adaptive", dc_normaliser="running"
    )
    model = _streaming_model().cuda()
    outer = OuterSync(model, config, CommEngine(None))
    _cuda_steps(outer, model, range(1, 6))
    assert outer._in_flight
    state = torch.utils._pytree.tree_map(lambda x: x.cpu() if isinstance(x, torch.Tensor) else x, outer.state_dict())
    resumed = OuterSync(model, config, CommEngine(None))
    resumed.load_state_dict(state)
    _cuda_steps(resumed, model, range(6, 13))
    resumed.finish()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_attach_counts_the_optimizer_steps_that_update():
    # The hook rides on the torch optimizer: a wrapper holding it as `.optimizer` (accelerate's) is
    # seen through, and a step that GradScaler skips for inf gradients is not an inner step.
    module = scalar_module(1.0)
    outer = OuterSync(module, SyncConfig(method="diloco", sync_every=100), CommEngine(None))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    wrapper = type("Wrapped", (), {"optimizer": optimizer})()
    hook = outer.attach(wrapper)
    scaler = torch.amp.GradScaler("cpu")
    for value in (1.0, float("inf"), 2.0):
        optimizer.zero_grad()
        scaler.scale(module(torch.tensor([[value]])).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    assert outer.inner_step == 2
    hook.remove()
    optimizer.step()
    assert outer.inner_step == 2


def test_per_tensor_normaliser_by_hand():
    # delta = [1, 2], delta^2 = [1, 4], mean 2.5: w = 0.5 * [1, 4] / 2.5 = [0.2, 0.8];
    # theta = global + delta - w * (global - sent) = [2 + 1 - 0.4, 2 + 2 - 0.8].
    live = [torch.tensor([1.0, 3.0])]
    stats = merge_compensated(live, [torch.tensor([2.0, 2.0])], [torch.tensor([0.0, 1.0])], 0.5, per_tensor=True)
    assert torch.allclose(live[0], torch.tensor([2.6, 3.2])) and stats == pytest.approx((0.5, 0.0))
    # lambda 1: w = [0.4, 1.6], the second capped at 0.9.
    live = [torch.tensor([1.0, 3.0])]
    stats = merge_compensated(live, [torch.tensor([2.0, 2.0])], [torch.tensor([0.0, 1.0])], 1.0, per_tensor=True)
    assert torch.allclose(live[0], torch.tensor([2.2, 3.1])) and stats == pytest.approx((0.65, 0.5))


def test_per_tensor_normaliser_over_many_applies_stays_near_lambda_and_below_one():
    generator = torch.Generator().manual_seed(0)
    for apply in range(50):
        scale = 10.0 ** (apply % 7 - 3)  # the size of an apply's drift changes by 10^6 over the run
        sent = torch.randn(256, generator=generator)
        live = [sent + scale * torch.randn(256, generator=generator)]
        steady = [sent + scale * torch.sign(torch.randn(256, generator=generator))]  # every element moved alike
        global_ = [sent + torch.randn(256, generator=generator)]
        w_mean, capped = merge_compensated(live, global_, [sent], 0.5, per_tensor=True)
        assert 0.3 < w_mean <= 0.5 and capped < 0.3  # the cap only lowers the mean from lambda
        assert merge_compensated(steady, global_, [sent], 0.5, per_tensor=True) == pytest.approx((0.5, 0.0))


def test_adam_weight_by_hand():
    # w = min(lambda * c, 0.9) per element with c given: lambda 2, c = [0.125, 0.25, 1] -> w = [0.25, 0.5, 0.9].
    # delta = live - sent = [0.5, 0, 1]; global - sent = [-0.5, -1, 2]; theta = global + delta - w * (global - sent).
    live = [torch.tensor([1.0, 2.0, 3.0])]
    new, sent, curvature = (
        torch.tensor([0.0, 1.0, 4.0]),
        torch.tensor([0.5, 2.0, 2.0]),
        torch.tensor([0.125, 0.25, 1.0]),
    )
    stats = merge_compensated(live, [new], [sent], 2.0, curvature=[curvature])
    assert live[0].tolist() == [0.625, 1.5, torch.tensor(5.0 - 0.9 * 2.0).item()]
    assert stats == pytest.approx(((0.25 + 0.5 + 0.9) / 3, 1 / 3))
    live = [torch.tensor([1.0, 2.0, 3.0])]
    merge_compensated(live, [new], [sent], 0.0, curvature=[curvature])
    assert live[0].tolist() == [0.5, 1.0, 5.0]  # lambda 0: replay, whatever the curvature


def test_adam_weight_reads_the_inner_adamw():
    # One region, H = 4, tau = 2: sent after step 2, applied after step 4. At the apply, c = tau *
    # lr * sqrt(v_hat) per element from AdamW's state (bias-corrected after 4 steps), and the merge
    # (alpha 0) is global + delta - min(lambda c, 0.9) (global - sent).
    torch.manual_seed(0)
    module = nn.Linear(4, 3, bias=False)
    config = SyncConfig(method="cocodc", sync_every=4, delay=2, alpha=0.0, dc_lambda=2.0)
    assert config.dc_normaliser == "adam"
    outer = OuterSync(module, config, CommEngine(None))
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1, betas=(0.9, 0.95))
    seen = {}

    def before_the_sync(*_):  # registered first, so it runs before the sync's hook
        if outer.inner_step == 1:
            seen["sent"] = module.weight.detach().clone()
        if outer.inner_step == 3:
            state = optimizer.state[module.weight]
            v_hat = state["exp_avg_sq"] / (1 - 0.95 ** state["step"].item())
            seen.update(live=module.weight.detach().clone(), c=2 * 0.1 * v_hat.sqrt())

    optimizer.register_step_post_hook(before_the_sync)
    outer.attach(optimizer)
    for _ in range(4):
        optimizer.zero_grad()
        module(torch.randn(8, 4)).square().sum().backward()
        optimizer.step()
    (record,) = [r for r in outer.pop_records() if r["kind"] == "sync"]
    assert (record["send_step"], record["apply_step"]) == (2, 4)
    w = (2.0 * seen["c"]).clamp(max=0.9)
    global_, sent = outer.global_params[0][0], seen["sent"]
    expected = global_ + (seen["live"] - sent) - w * (global_ - sent)
    assert torch.allclose(module.weight.detach(), expected, atol=1e-6)
    assert record["w_mean"] == pytest.approx(w.mean().item(), rel=1e-5)
    assert 0 < record["w_mean"] < 0.9


def test_adam_weight_needs_the_inner_optimizer():
    module = scalar_module(1.0)
    outer = OuterSync([module], SyncConfig(method="cocodc", sync_every=2, delay=1), CommEngine(None))
    outer.step()
    with pytest.raises(RuntimeError, match=r"attach\(optimizer\)"):
        outer.step()


def test_compensation_lambda_defaults_by_rule():
    assert SyncConfig(method="cocodc").compensation_lambda == 750.0
    assert SyncConfig(method="cocodc", dc_normaliser="running").compensation_lambda == 0.5
    assert SyncConfig(method="cocodc", dc_adaptive=False).compensation_lambda == 0.5
    assert SyncConfig(method="cocodc", dc_lambda=0.0).compensation_lambda == 0.0


def test_outer_state_on_the_host_gives_the_same_numbers_and_leaves_the_device_none():
    # CoCoDC with the AdamW weight and the adaptive schedule, the state every sync keeps. On this
    # CPU-only machine "device" is the CPU too, so what can be seen here is the accounting and
    # the outer step's arithmetic unchanged; on CUDA the buffers are pinned host memory.
    def run(where: str) -> tuple[OuterSync, list[torch.Tensor]]:
        model = _streaming_model()
        config = SyncConfig(method="cocodc", sync_every=4, fragments=2, schedule="adaptive", outer_state=where)
        outer = OuterSync(model, config, CommEngine(None))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        outer.attach(optimizer)
        torch.manual_seed(1)
        for _ in range(12):
            optimizer.zero_grad()
            model(torch.randint(0, 16, (2, 8))).square().mean().backward()
            optimizer.step()
        outer.finish()
        return outer, [p.detach().clone() for p in model.parameters()]

    (device, device_live), (host, host_live) = run("device"), run("host")
    assert device.outer_steps == host.outer_steps > 2
    assert all(torch.equal(a, b) for a, b in zip(device_live, host_live, strict=True))
    for a, b in zip(device.flat, host.flat, strict=True):
        assert torch.equal(a.global_, b.global_) and torch.equal(a.momentum, b.momentum)
        assert b.home == torch.device("cpu")
    held = 4 * sum(f.with_tail.numel() + 2 * f.numel for f in device.flat)  # global + tail, momentum, theta_send
    assert device.state_bytes() == {"outer": held, "outer_host": 0}
    assert host.state_bytes() == {"outer": 0, "outer_host": held}


def test_fragments_live_in_flat_buffers():
    # The live parameters become views of one buffer per fragment (the Parameter objects stay), and
    # a model moved after OuterSync was built is caught rather than silently left out of the sync.
    model = _streaming_model()
    before = list(model.parameters())
    outer = OuterSync(model, SyncConfig(method="streaming", sync_every=4, fragments=2, delay=1), CommEngine(None))
    assert list(model.parameters()) == before
    for flat in outer.flat:
        start = flat.live.data_ptr()
        end = start + flat.live.element_size() * flat.numel
        assert all(start <= p.data_ptr() < end for p in flat.params)
        assert flat.global_.data_ptr() == flat.with_tail.data_ptr()
        assert torch.equal(flat.global_, flat.live)
    model.to(torch.float64)
    with pytest.raises(RuntimeError, match=r"fragment 0's parameters were re-allocated after OuterSync was built"):
        outer.step()
        outer.step()  # step 2 sends fragment 0


def test_outer_sync_over_fsdp_shards_and_refuses_orphaned_parameters(tmp_path):
    # A real FSDP2 model on a real (one-process) gloo group: the sync keeps its state for the local
    # shards without re-pointing them, and a model sharded after OuterSync was built is caught.
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    config = SyncConfig(method="streaming", sync_every=4, fragments=2, delay=1)
    with gloo_group(0, str(tmp_path / "store"), world_size=1):
        early = _streaming_model()
        orphaning = OuterSync(early, config, CommEngine(None))
        fully_shard(early, mesh=DeviceMesh.from_group(dist.group.WORLD, "cpu"))
        with pytest.raises(RuntimeError, match="parameters were replaced after OuterSync was built"):
            orphaning.step()  # step 1 sends fragment 0 (tau 1)

        model = _streaming_model()
        fully_shard(model, mesh=DeviceMesh.from_group(dist.group.WORLD, "cpu"))
        with pytest.raises(ValueError, match="pass intra="):
            OuterSync(model, config, CommEngine(None))
        outer = OuterSync(model, config, CommEngine(None), intra=CommEngine(dist.group.WORLD))
        flat = outer.flat[0]
        assert flat.sharded and flat.live is None and flat.numel == flat.full_numel
        shard = flat.shards[0]
        pointer = shard.data_ptr()
        values = flat.read_live()
        flat.write_live(values + 1)
        assert shard.data_ptr() == pointer  # FSDP's storage, written in place
        assert torch.equal(flat.read_live(), values + 1)
        numel = sum(f.numel for f in outer.flat)
        assert outer.state_bytes() == {"outer": 2 * 4 * numel, "outer_host": 0}  # global copy and momentum, fp32
        for _ in range(4):
            outer.step()
        assert outer.in_flight_peak == 4 * max(f.numel for f in outer.flat)  # one fragment's mean at a time
