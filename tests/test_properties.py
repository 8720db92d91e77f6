"""Laws that hold for every input, checked on many drawn by Hypothesis: the codecs' round trip,
the streaming schedule's cadence, the outer step against torch's own Nesterov SGD, and a config's
round trip through YAML and `--set`."""

import pytest
import torch
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from cocodc.checkpoint import flatten
from cocodc.comm import CommEngine
from cocodc.comm.codec import CODECS, get_codec
from cocodc.config import ConfigError, SyncConfig, load_config
from cocodc.sync import OuterSync
from cocodc.sync.schedule import RoundRobinSchedule

from conftest import TINY
from test_comm import block_bound

# Values as pseudo-gradients are: signed, over several decades, with exact zeros among them.
magnitudes = st.floats(min_value=2.0**-20, max_value=1024.0, allow_nan=False, allow_infinity=False, width=32)
values = st.lists(st.one_of(magnitudes, magnitudes.map(lambda v: -v), st.just(0.0)), min_size=1, max_size=600)


@pytest.mark.parametrize("name", list(CODECS))
@settings(max_examples=60, deadline=None)
@given(drawn=values)
def test_a_codec_round_trip_keeps_the_size_and_the_format_bound(name, drawn):
    codec, x = get_codec(name), torch.tensor(drawn, dtype=torch.float32)
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.numel() == codec.encoded_bytes(x.numel())
    decoded = codec.decode(payload, x.numel())
    assert decoded.shape == x.shape and ((decoded - x).abs() <= block_bound(name, x)).all()
    assert (decoded[x == 0] == 0).all()  # a zero stays a zero: no bias where nothing moved
    # What a codec decodes, it encodes again without loss: a relay does not degrade a payload.
    assert torch.equal(codec.decode(codec.encode(decoded), x.numel()), decoded)


@settings(max_examples=200, deadline=None)
@given(
    fragments=st.integers(1, 6), slot_len=st.integers(1, 6), periods=st.integers(2, 5), data=st.data()
)  # fmt: skip
def test_the_streaming_schedule_sends_each_fragment_once_a_period_in_turn(fragments, slot_len, periods, data):
    sync_every = fragments * slot_len
    delay = data.draw(st.integers(0, sync_every - 1))
    schedule = RoundRobinSchedule(sync_every, fragments, delay)
    steps = periods * sync_every
    sends = [slot for step in range(1, steps + 1) for slot in schedule.sends_at(step)]
    applies = [slot for step in range(1, steps + 1) for slot in schedule.applies_at(step)]
    # In turn, one a slot: fragment p's sends are one period apart, none starved, none twice.
    assert [s.fragment for s in sends] == [(sends[0].fragment + i) % fragments for i in range(len(sends))]
    for p in range(fragments):
        mine = [s.send_step for s in sends if s.fragment == p]
        assert all(b - a == sync_every for a, b in zip(mine, mine[1:], strict=False)) and mine
    # Each applied tau steps after its send, at its slot's end; every send made by the last slot's
    # end is applied, and nothing is applied that was not sent.
    assert all(s.apply_step - s.send_step == delay and s.apply_step % slot_len == 0 for s in sends)
    assert applies == [s for s in sends if s.apply_step <= steps]


@settings(max_examples=50, deadline=None)
@given(
    start=st.lists(st.floats(-2.0, 2.0, width=32), min_size=3, max_size=3),
    moves=st.lists(st.lists(st.floats(-1.0, 1.0, width=32), min_size=3, max_size=3), min_size=1, max_size=4),
    lr=st.floats(0.1, 1.0),
    momentum=st.floats(0.0, 0.95),
)
def test_the_outer_step_of_one_region_is_torchs_nesterov_sgd(start, moves, lr, momentum):
    # DiLoCo with H = 1: each step's move is the pseudo-gradient global - live; the outer
    # optimizer is Nesterov SGD on it, as torch computes it on a copy of the global parameters.
    live = nn.Linear(3, 1, bias=False)
    reference = nn.Parameter(torch.tensor([start]))
    with torch.no_grad():
        live.weight.copy_(reference)
    config = SyncConfig(
        method="diloco", sync_every=1, outer_lr=lr, outer_momentum=momentum, outer_nesterov=momentum > 0
    )
    outer = OuterSync(live, config, CommEngine(None))
    sgd = torch.optim.SGD([reference], lr=lr, momentum=momentum, nesterov=momentum > 0)
    for move in moves:
        with torch.no_grad():
            live.weight.add_(torch.tensor([move]))
            reference.grad = -torch.tensor([move])  # global - live
        outer.step()
        sgd.step()
        torch.testing.assert_close(live.weight.detach(), reference.detach(), rtol=1e-5, atol=1e-6)


# Keys a user sets, each with the values that keep the rest of the demo's config valid.
SETTABLE = {
    "seed": st.integers(0, 2**31),
    "train.steps": st.integers(1, 10_000),
    "train.lr": st.floats(1e-5, 1.0),
    "train.warmup_steps": st.integers(0, 100),
    "train.grad_clip": st.floats(0, 10),
    "train.precision": st.sampled_from(["auto", "fp32", "bf16"]),
    "model.n_kv_heads": st.sampled_from([0, 1, 2, 4]),
    "model.tie_embeddings": st.booleans(),
    "model.rope_theta": st.floats(100, 1e6),
    "sync.outer_lr": st.floats(0.01, 2.0),
    "sync.outer_momentum": st.floats(0.0, 0.99),
    "sync.quantize": st.sampled_from(["fp32", "bf16", "fp8", "int8", "e3m0"]),
    "data.split": st.sampled_from(["iid", "non_iid"]),
    "run.name": st.text("abcxyz_-0123456789", min_size=1, max_size=12),
    "wan.latency_ms": st.one_of(st.floats(0, 500), st.just([[0.0, 5.0], [7.5, 0.0]])),
}


@settings(max_examples=60, deadline=None)
@given(chosen=st.dictionaries(st.sampled_from(sorted(SETTABLE)), st.none()).flatmap(
    lambda keys: st.fixed_dictionaries({key: SETTABLE[key] for key in keys})))  # fmt: skip
def test_a_config_round_trips_through_yaml_and_set(tmp_path_factory, chosen):
    text = {key: yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            for key, value in chosen.items()}  # fmt: skip
    try:
        config = load_config(TINY, [f"{key}={value}" for key, value in text.items()])
    except ConfigError:
        assume(False)  # a combination the checks refuse (they have their own tests)
    flat = flatten(config.to_dict())
    for key, value in chosen.items():  # every value set is the value held
        assert flat[key] == pytest.approx(value) if isinstance(value, float) else flat[key] == value
    saved = tmp_path_factory.mktemp("config") / "saved.yaml"
    saved.write_text(yaml.safe_dump(config.to_dict()))
    assert load_config(saved).to_dict() == config.to_dict()
    # And every key of it, set by hand over the defaults, gives it back.
    again = load_config(None, [f"{key}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                               for key, v in flat.items()])  # fmt: skip
    assert again.to_dict() == config.to_dict()
