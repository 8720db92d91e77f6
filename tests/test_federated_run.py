"""The federated mode end to end under torchrun: a server and two executors on gloo, the real
`cocodc train` command, failing clients, a deadline, resume and LoRA."""

import json
from pathlib import Path

import pytest
import torch

from cocodc.checkpoint import load_rank, read_region
from cocodc.config import load_config
from cocodc.data import ByteTokenizer, load_client_data
from cocodc.devices import DeviceProfiles
from cocodc.federated.clients import round_arrivals, sample_clients
from cocodc.federated.lora import add_lora
from cocodc.metrics import read_records
from cocodc.model import Transformer, lm_loss

from conftest import FAST, REPO, cocodc, one_line_error, overrides
from wandb_log import summarize

pytestmark = pytest.mark.slow  # every test here launches a federated run

CONFIG = str(REPO / "configs" / "federated.yaml")
BASE = [
    *FAST,
    "federated.clients=6",
    "federated.clients_per_round=4",
    "federated.rounds=4",
    "federated.local_steps=3",
    "federated.executors=2",
    "eval.every=2",
    "checkpoint.every=2",
    "train.log_every=1",
]
# Links without bandwidth or latency: a client's update arrives local_steps x step_s / speed after
# the round starts, so the test can tell which clients a deadline drops.
TIMED_BY_SPEED = [
    "devices.bandwidth_mbps=0",
    "devices.latency_ms=0",
    "devices.server_bandwidth_mbps=0",
    "devices.step_s=1.0",
    "devices.speed_spread=16",
]


def train(root: Path, name: str, *settings: str, flags: tuple[str, ...] = (), env: dict | None = None):
    args = overrides(*BASE, f"run.dir={root}", f"run.name={name}", *settings)
    return cocodc("train", "-c", CONFIG, *flags, *args, cwd=root, env=env)


def test_failing_nan_and_late_clients_are_left_out_and_the_rounds_go_on(tmp_path):
    config = load_config(CONFIG, [*BASE, *TIMED_BY_SPEED])
    f = config.federated
    raises, sends_nan, *timed = sample_clients(f.clients, f.clients_per_round, config.seed, 1)
    profiles = DeviceProfiles.draw(f.clients, config.seed, config.devices)
    arrival = {
        a.client: a.arrived_at
        for a in round_arrivals(
            profiles, timed, download_bytes=0, upload_bytes=[0, 0], local_steps=3, step_s=1.0, server_bandwidth_mbps=0
        )
    }
    fast, slow = sorted(timed, key=arrival.get)
    deadline = (arrival[fast] + arrival[slow]) / 2

    result = train(
        tmp_path,
        "faults",
        *TIMED_BY_SPEED,
        f"federated.deadline_s={deadline}",
        "federated.quantize=int8",  # a NaN must survive the codec to be caught
        "wandb.mode=offline",
        env={"COCODC_FAULTS": f"raise:{raises},nan:{sends_nan}"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"round 1: client {raises} failed: injected by COCODC_FAULTS" in result.stderr
    assert f"client(s) {sends_nan} sent a non-finite update: left out of the aggregate" in result.stderr
    assert f"client(s) {slow} arrived after the deadline: left out of the aggregate" in result.stderr

    run = tmp_path / "faults"
    records = read_records(run / "metrics.jsonl")
    rounds = [r for r in records if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    first = rounds[0]
    assert first["failed"] == [raises] and first["not_finite"] == [sends_nan]
    assert first["late"] == [slow] and first["accepted"] == [fast]
    assert first["modelled_s"] == deadline  # the server waited to the deadline for the late one
    # Each client that trained evaluated the global model (round 1: the initial one) on its first
    # batch before training: recomputed here in plain torch.
    shards, _ = load_client_data(
        config.data,
        ByteTokenizer(),
        clients=f.clients,
        seed=config.seed,
        batch_size=config.train.batch_size,
        seq_len=config.train.seq_len,
        eval_batch_count=1,
    )
    initial = Transformer(config.model, 256, config.train.seq_len, seed=config.seed)
    with torch.no_grad():
        expected = {str(c): lm_loss(initial, shards.loader(c).next_batch()).item() for c in (sends_nan, fast, slow)}
    assert first["client_eval_loss"].keys() == expected.keys()
    for client, value in expected.items():
        assert first["client_eval_loss"][client] == pytest.approx(value, abs=1e-5)
    assert first["client_train_loss"].keys() == expected.keys()
    summary = json.loads((run / "summary.json").read_text())
    rounds = [r for r in records if r["kind"] == "round"]
    assert summary["method"] == "fedavg" and summary["rounds"] == len(rounds) == 4
    assert summary["updates_accepted"] == sum(len(r["accepted"]) for r in rounds)
    assert summary["updates_left_out"] == sum(len(r["failed"] + r["not_finite"] + r["late"]) for r in rounds)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    evals = [r["step"] for r in records if r["kind"] == "eval"]
    assert evals == [0, 2, 4]

    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    server = next(s for s in map(summarize, files) if s["run"].display_name == "faults-server")
    assert server["metrics"]["round/*"] == "round" and server["metrics"]["eval/*"] == "round"
    logged = [h for h in server["history"] if "round/accepted" in h]
    assert [(h["round"], h["round/accepted"], h["round/late"]) for h in logged][0] == (1, 1, 1)
    # The per-client losses: a histogram per round (wandb stores its parts as nested keys).
    assert logged[0]["round/client_eval_loss/_type"] == "histogram"
    assert sum(logged[0]["round/client_eval_loss/values"]) == 3


def test_resume_mid_run_is_bit_identical(tmp_path):
    adam = ("federated.strategy=fedadam", "federated.server_lr=0.001", "federated.quantize=int8")
    straight = train(tmp_path, "straight", *adam)
    assert straight.returncode == 0, straight.stderr[-4000:]
    stopped = train(tmp_path, "resumed", *adam, flags=("--stop-at", "2"))
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    resumed = train(tmp_path, "resumed", *adam, flags=("--resume",))
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    def evals(name: str) -> list[tuple[int, float]]:
        records = read_records(tmp_path / name / "metrics.jsonl")
        return [(r["step"], r["loss"]) for r in records if r["kind"] == "eval"]

    assert evals("straight") == evals("resumed") and len(evals("straight")) == 3
    for rank in range(3):
        a = read_region(tmp_path / "straight" / "checkpoints", 4, rank)
        b = read_region(tmp_path / "resumed" / "checkpoints", 4, rank)
        assert torch.equal(a["federated"]["vector"], b["federated"]["vector"])
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        own = [load_rank(tmp_path / run / "checkpoints", 4, rank) for run in ("straight", "resumed")]
        assert own[0]["data"] == own[1]["data"]
    # Each client's batches continue across rounds: 3 local steps for every round it was sampled in.
    config = load_config(CONFIG, BASE)
    sampled = [sample_clients(6, config.federated.clients_per_round, config.seed, r) for r in range(1, 5)]
    assert own[0]["data"]["batches_done"] == [3 * sum(c in s for s in sampled) for c in range(6)]
    server = read_region(tmp_path / "straight" / "checkpoints", 4, 0)["federated"]["strategy"]
    assert server["m"] is not None  # the server optimizer's state is part of what resumed


def test_lora_fine_tuning_sends_only_the_adapters(tmp_path):
    config = load_config(CONFIG, BASE)
    torch.manual_seed(5)
    base = Transformer(config.model, 256, config.train.seq_len)
    torch.save({"model": base.state_dict()}, tmp_path / "pretrained.pt")
    adapters = sum(p.numel() for p in add_lora(Transformer(config.model, 256, 64), 2).parameters() if p.requires_grad)

    result = train(tmp_path, "lora", "federated.lora_rank=2", f"model.init_from={tmp_path / 'pretrained.pt'}")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "lora" / "summary.json").read_text())
    assert summary["trained_parameters"] == adapters
    # Per client: the info message (a 96-byte header, 4 float64) and the fp32 update (header, body).
    per_client = 96 + 4 * 8 + 96 + 4 * adapters
    rounds = [r for r in read_records(tmp_path / "lora" / "metrics.jsonl") if r["kind"] == "round"]
    assert [r["bytes_up"] for r in rounds] == [4 * per_client] * 4
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    final = read_region(tmp_path / "lora" / "checkpoints", 4, 0)["model"]
    for name, value in base.state_dict().items():
        wrapped = name.replace(".weight", ".base_layer.weight")
        assert torch.equal(final[wrapped] if wrapped in final else final[name], value), name
    # Exported, the adapters are merged into the weights: transformers gives the adapted model's logits.
    from transformers import AutoModelForCausalLM

    result = cocodc("export", str(tmp_path / "lora"), "--hf", str(tmp_path / "merged"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    adapted = add_lora(Transformer(config.model, 256, config.train.seq_len), 2)
    adapted.load_state_dict(final)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(tokens).logits
        assert (merged - adapted(tokens)).abs().max() < 1e-5
    # Or the base and the adapters apart, as peft loads them.
    from peft import PeftModel

    result = cocodc("export", str(tmp_path / "lora"), "--hf", str(tmp_path / "apart"), "--adapter", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    exported_base = AutoModelForCausalLM.from_pretrained(tmp_path / "apart")
    with torch.no_grad():
        apart = PeftModel.from_pretrained(exported_base, tmp_path / "apart" / "adapter")(tokens).logits
        assert (apart - adapted(tokens)).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("federated.clients=0", "config key 'federated.clients' must be at least 1; got 0"),
        (
            "federated.clients_per_round=9",
            "config key 'federated.clients_per_round' (9) cannot exceed federated.clients (6)",
        ),
    ],
)
def test_bad_federated_values_exit_2_with_one_line(tmp_path, setting, message):
    assert one_line_error(train(tmp_path, "bad", setting)) == f"cocodc: error: {message}"
