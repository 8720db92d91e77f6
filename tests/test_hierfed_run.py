"""The hierarchical federated mode (HierFedLoRA) end to end under torchrun: a cloud and two edges
on gloo, the real `cocodc train` command; what each group tunes, the records, resume."""

import json
from pathlib import Path

import pytest
import torch

from cocodc.checkpoint import read_region
from cocodc.config import load_config
from cocodc.metrics import read_records
from cocodc.model import Transformer

from conftest import FAST, REPO, cocodc, overrides

pytestmark = pytest.mark.slow  # every test here launches a federated run

CONFIG = str(REPO / "configs" / "federated.yaml")
BASE = [
    *FAST,
    "federated.clients=8",
    "federated.clients_per_round=4",
    "federated.rounds=4",
    "federated.local_steps=2",
    "federated.executors=2",
    "federated.deadline_s=0",
    "federated.groups=2",
    "eval.every=2",
    "checkpoint.every=2",
    "train.log_every=1",
]


def train(root: Path, name: str, *settings: str, flags: tuple[str, ...] = ()):
    return cocodc("train", "-c", CONFIG, *flags, *overrides(*BASE, f"run.dir={root}", f"run.name={name}", *settings),
                  cwd=root)  # fmt: skip


def test_groups_tune_their_top_blocks_aggregate_at_their_edges_and_resume_bit_identically(tmp_path):
    settings = ("federated.group_depth=1", "federated.group_rounds=2")
    straight = train(tmp_path, "straight", *settings)
    assert straight.returncode == 0, straight.stderr[-4000:]
    run = tmp_path / "straight"
    records = read_records(run / "metrics.jsonl")

    (plan,) = [r for r in records if r["kind"] == "groups"]
    members = [g["members"] for g in plan["groups"]]
    assert sorted(sum(members, [])) == list(range(8)) and [len(m) for m in members] == [4, 4]
    assert [(g["depth"], g["edge_rounds"]) for g in plan["groups"]] == [(1, 2), (1, 2)] and not plan["rule"]
    assert "tunes the top 1 blocks, 2 edge rounds a round (as set)" in straight.stderr

    groups = [r for r in records if r["kind"] == "group"]
    rounds = [r for r in records if r["kind"] == "round"]
    assert [(r["round"], r["group"]) for r in groups] == [(n, g) for n in range(1, 5) for g in (0, 1)]
    config = load_config(CONFIG, [*BASE, *settings])
    model = Transformer(config.model, 256, config.train.seq_len, seed=config.seed)
    whole = sum(p.numel() for p in model.parameters())
    tuned = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("blocks.1.", "norm.", "head.")))
    for record in groups:
        # 2 edge rounds of the group's share of 4 clients a round (2 of 8, by its size), its own members.
        assert len(record["clients"]) == 4 and set(record["clients"]) <= set(members[record["group"]])
        assert record["accepted"] == record["clients"] and record["depth"] == 1
        assert record["modelled_s"] > record["edge_s"] > 0
        # Down: the whole model to a client new to the round, the tuned part to one drawn again;
        # up: each client's info (4 float64) and its update's tuned part, fp32, with their headers.
        drawn = record["clients"]
        new = [c not in drawn[:i] for i, c in enumerate(drawn)]
        assert record["edge_bytes_down"] == sum(96 + 4 * (whole if first else tuned) for first in new)
        assert record["edge_bytes_up"] == 4 * (96 + 32 + 96 + 4 * tuned)
    for record in rounds:
        mine = [g for g in groups if g["round"] == record["round"]]
        assert record["modelled_s"] == max(g["modelled_s"] for g in mine)  # the cloud waits for every group
        assert record["bytes_up"] == sum(g["bytes_up"] for g in mine)
        assert record["edge_bytes_up"] == sum(g["edge_bytes_up"] for g in mine)
        assert sorted(record["sampled"]) == sorted(sum((g["clients"] for g in mine), []))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["edge_bytes_up"] == sum(r["edge_bytes_up"] for r in rounds)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]

    # Depth 1 of 2 blocks: the embedding and block 0 are the initial model's, bit for bit; block 1
    # and the head moved.
    initial = model.state_dict()
    final = read_region(run / "checkpoints", 4, 0)["model"]
    for name, value in initial.items():
        frozen = name.startswith(("embed.", "blocks.0.")) or "rope" in name
        assert torch.equal(final[name], value) == frozen, name

    stopped = train(tmp_path, "resumed", *settings, flags=("--stop-at", "2"))
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    resumed = train(tmp_path, "resumed", *settings, flags=("--resume",))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    again = read_region(tmp_path / "resumed" / "checkpoints", 4, 0)
    assert torch.equal(again["federated"]["vector"], read_region(run / "checkpoints", 4, 0)["federated"]["vector"])
    assert [r for r in read_records(tmp_path / "resumed" / "metrics.jsonl") if r["kind"] == "groups"] == [plan]


def test_groups_fine_tune_lora_adapters_of_their_top_blocks_only(tmp_path):
    config = load_config(CONFIG, BASE)
    torch.manual_seed(5)
    base = Transformer(config.model, 256, config.train.seq_len)
    torch.save({"model": base.state_dict()}, tmp_path / "pretrained.pt")
    lora = ("federated.lora_rank=2", f"model.init_from={tmp_path / 'pretrained.pt'}", "federated.group_depth=1")
    result = train(tmp_path, "lora", *lora, "federated.rounds=2", "checkpoint.every=2")
    assert result.returncode == 0, result.stderr[-4000:]
    final = read_region(tmp_path / "lora" / "checkpoints", 2, 0)["model"]
    adapters = {name: value for name, value in final.items() if "lora_" in name}
    assert adapters and all(name.startswith("blocks.") for name in adapters)
    # The base stays the pretrained model; of the adapters, block 1's (the top) trained, block 0's
    # are as peft made them (B zero: the adapter adds nothing).
    for name, value in base.state_dict().items():  # peft names a wrapped weight base_layer.weight
        wrapped = name.replace(".weight", ".base_layer.weight")
        assert torch.equal(final[wrapped if wrapped in final else name], value), name
    moved = {name.split(".")[1] for name, value in adapters.items() if "lora_B" in name and value.abs().sum() > 0}
    assert moved == {"1"}
