"""The split-learning mode end to end under torchrun (gloo on CPU): exactness against ordinary
training, labels that stay home in the u shape, failing workers, batch regulation, resume."""

import json
import math
from pathlib import Path

import pytest
import torch

from cocodc.checkpoint import read_region
from cocodc.config import load_config
from cocodc.data import ByteTokenizer, ShardLoader, load_client_data
from cocodc.metrics import read_records
from cocodc.model import Transformer, lm_loss
from cocodc.split.plan import on_worker, serving_order

from conftest import FAST, REPO, cocodc, one_line_error, overrides

pytestmark = pytest.mark.slow  # every test here launches a split-learning run

CONFIG = str(REPO / "configs" / "split.yaml")
BASE = [*FAST, "train.steps=4", "eval.every=2", "checkpoint.every=2", "train.log_every=1", "split.cut=1"]
EXACT = ["train.grad_clip=0", "split.batch_regulation=false", "data.split=iid"]  # clipping is per part


def train(root: Path, name: str, *settings: str, flags: tuple[str, ...] = (), env: dict | None = None):
    args = overrides(*BASE, f"run.dir={root}", f"run.name={name}", *settings)
    return cocodc("train", "-c", CONFIG, *flags, *args, cwd=root, env=env)


def split_parameters(run: Path, step: int, config) -> dict[str, torch.Tensor]:
    """The model as trained: worker 0's part (from its executor's checkpoint) and the server's."""
    server = read_region(run / "checkpoints", step, 0)["model"]
    worker = read_region(run / "checkpoints", step, 1)["split"]["workers"]["0"]["model"]
    return {n: (worker[n] if on_worker(n, config.split.cut, config.split.shape) else server[n]) for n in server}


def ordinary_training(config, batches_per_step) -> dict[str, torch.Tensor]:
    """The whole model trained in this process on the given batches by plain torch: one AdamW with
    weight decay on the matrices only, and the schedule (linear warm-up, then cosine down to
    lr x min_lr_ratio) written out here, so that a bug the mode shares with the trainer's own
    optimizer or schedule cannot pass."""
    t = config.train
    model = Transformer(config.model, 256, t.seq_len, seed=config.seed)  # as the trainer builds it
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": t.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))
    for step, batch in enumerate(batches_per_step, start=1):
        if step <= t.warmup_steps:
            lr = t.lr * step / t.warmup_steps
        else:
            progress = (step - t.warmup_steps) / (t.steps - t.warmup_steps)
            lr = t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2)
        for group in optimizer.param_groups:
            group["lr"] = lr
        lm_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {n: p.detach() for n, p in model.state_dict().items()}


def worker_batches(config, workers: int) -> list[torch.Tensor]:
    """Every step's batches of the workers, concatenated in worker order, as the mode draws them."""
    shards, _ = load_client_data(
        config.data,
        ByteTokenizer(),
        clients=workers,
        seed=config.seed,
        batch_size=config.train.batch_size,
        seq_len=config.train.seq_len,
        eval_batch_count=1,
    )
    loaders = [
        ShardLoader(shards.sequences, shards.shards[w], config.train.batch_size, [config.seed, 0x5B, w])
        for w in range(workers)
    ]
    return [torch.cat([loader.next_batch() for loader in loaders]) for _ in range(config.train.steps)]


def test_one_worker_is_ordinary_training_step_for_step(tmp_path):
    settings = [*EXACT, "split.workers=1", "split.executors=1"]
    config = load_config(CONFIG, [*BASE, *settings])
    for step in (2, 4):
        result = train(tmp_path, f"one-{step}", *settings, f"train.steps={step}")
        assert result.returncode == 0, result.stderr[-4000:]
        trained = split_parameters(tmp_path / f"one-{step}", step, config)
        config.train.steps = step
        expected = ordinary_training(config, worker_batches(config, 1))
        for name, value in expected.items():
            assert torch.equal(trained[name], value), (step, name, (trained[name] - value).abs().max())


def test_merged_features_equal_training_on_the_concatenated_batch(tmp_path):
    settings = [*EXACT, "split.workers=2", "split.executors=2"]
    config = load_config(CONFIG, [*BASE, *settings])
    result = train(tmp_path, "merged", *settings)
    assert result.returncode == 0, result.stderr[-4000:]
    trained = split_parameters(tmp_path / "merged", 4, config)
    other = read_region(tmp_path / "merged" / "checkpoints", 4, 2)["split"]["workers"]["1"]["model"]
    expected = ordinary_training(config, worker_batches(config, 2))
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6)
        if on_worker(name, 1, "two"):
            assert torch.equal(other[name], trained[name])  # aggregate_every 1: the bottoms stay one


def test_the_u_shape_keeps_the_labels_on_the_workers_and_every_byte_is_counted(tmp_path):
    config = load_config(CONFIG, BASE)
    b, t, d = config.train.batch_size, config.train.seq_len, config.model.d_model
    header = 96
    sent, received, part = {}, {}, {}
    for shape in ("two", "u"):
        result = train(tmp_path, shape, f"split.shape={shape}", "split.batch_regulation=false")
        assert result.returncode == 0, result.stderr[-4000:]
        records = [r for r in read_records(tmp_path / shape / "metrics.jsonl") if r["kind"] == "split"]
        sent[shape] = {w for r in records for w in r["bytes_up"]}
        received[shape] = {w for r in records for w in r["bytes_down"]}
        model = Transformer(config.model, 256, t)
        part[shape] = 4 * sum(p.numel() for n, p in model.named_parameters() if on_worker(n, config.split.cut, shape))
        summary = json.loads((tmp_path / shape / "summary.json").read_text())
        assert summary["bytes_up"] == sum(sum(r["bytes_up"]) for r in records)
    activations = header + 4 * b * t * d
    # two-part: activations and int64 labels; u: activations, the gradient of the server's output
    # and the loss (one float64), and no labels. With aggregate_every 1 every worker's part's
    # gradient goes up and their mean comes back at every step, fp32.
    assert sent["two"] == {activations + header + 8 * b * t + part["two"]}
    assert sent["u"] == {2 * activations + header + 8 + part["u"]}
    # Down: the gradient of the activations (u: and the server's output), and the part's mean.
    assert received["two"] == {activations + part["two"]}
    assert received["u"] == {2 * activations + part["u"]}


def test_failing_and_nan_workers_are_left_out_and_batches_are_regulated(tmp_path):
    result = train(
        tmp_path,
        "faults",
        "split.merge=false",
        "split.aggregate_every=2",
        "devices.speed_spread=8",
        env={"COCODC_FAULTS": "raise:1,nan:2"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "step 1: worker 1 failed: injected by COCODC_FAULTS" in result.stderr
    assert "worker(s) 1, 2 failed or sent non-finite values: left out" in result.stderr
    records = read_records(tmp_path / "faults" / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "split"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(r["excluded"] == [1, 2] for r in steps)
    (regulation,) = [r for r in records if r["kind"] == "batch_sizes"]
    config = load_config(CONFIG, [*BASE, "devices.speed_spread=8"])
    sizes, times = regulation["sizes"], regulation["per_sequence_s"]
    assert sum(sizes) == 4 * config.train.batch_size
    fastest, slowest = times.index(min(times)), times.index(max(times))
    assert sizes[fastest] > sizes[slowest]
    summary = json.loads((tmp_path / "faults" / "summary.json").read_text())
    assert summary["worker_steps_left_out"] == 8 and summary["batch_sizes"] == sizes
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]


def test_a_u_shaped_worker_whose_head_fails_is_left_out_and_splitfed_serves_in_arrival_order(tmp_path):
    # Its loss is NaN: it sends no gradient, the server gives its rows none and replies with nothing.
    settings = ("split.shape=u", "split.merge=false", "split.batch_regulation=false")
    result = train(tmp_path, "head", *settings, env={"COCODC_FAULTS": "head_nan:3"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "step 1: worker 3's head failed: its loss or gradient is not finite" in result.stderr
    records = [r for r in read_records(tmp_path / "head" / "metrics.jsonl") if r["kind"] == "split"]
    assert all(r["excluded"] == [3] for r in records)
    # SplitFed v2 takes the workers as their activations arrive on the modelled links, which this
    # seed's devices put out of index order.
    assert all(r["served"] == serving_order(r["arrived_s"]) for r in records)
    assert all(r["served"] != [0, 1, 2, 3] for r in records)
    summary = json.loads((tmp_path / "head" / "summary.json").read_text())
    assert math.isfinite(summary["final_eval_loss"]) and summary["final_eval_loss"] < summary["initial_eval_loss"]


def test_a_failed_head_leaves_the_others_training_as_if_alone(tmp_path):
    # Worker 1's head fails at every step: the server's middle learns from worker 0's mean loss
    # alone, so worker 0's model is ordinary training on its own batches.
    settings = [*EXACT, "split.workers=2", "split.shape=u"]
    config = load_config(CONFIG, [*BASE, *settings])
    result = train(tmp_path, "alone", *settings, env={"COCODC_FAULTS": "head_nan:1"})
    assert result.returncode == 0, result.stderr[-4000:]
    trained = split_parameters(tmp_path / "alone", 4, config)
    rows = config.train.batch_size
    expected = ordinary_training(config, [batch[:rows] for batch in worker_batches(config, 2)])
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6)


def test_resume_is_bit_identical(tmp_path):
    settings = ("split.aggregate_every=2", "split.shape=u", "split.quantize=int8")
    assert train(tmp_path, "straight", *settings).returncode == 0
    assert train(tmp_path, "resumed", *settings, flags=("--stop-at", "2")).returncode == 0
    resumed = train(tmp_path, "resumed", *settings, flags=("--resume",))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for rank in range(3):
        a = read_region(tmp_path / "straight" / "checkpoints", 4, rank)
        b = read_region(tmp_path / "resumed" / "checkpoints", 4, rank)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        for w, state in a["split"]["workers"].items():
            other = b["split"]["workers"][w]
            assert all(torch.equal(state["model"][k], other["model"][k]) for k in state["model"])
            assert state["data"] == other["data"]

    def records(name: str, kind: str) -> list[dict]:
        return [r for r in read_records(tmp_path / name / "metrics.jsonl") if r["kind"] == kind]

    evals = [[(r["step"], r["loss"]) for r in records(name, "eval")] for name in ("straight", "resumed")]
    assert evals[0] == evals[1] and len(evals[0]) == 3
    # The regulation was logged by the run that wrote the checkpoint, not again by the resumed one.
    assert records("straight", "batch_sizes") == records("resumed", "batch_sizes")
    assert len(records("resumed", "batch_sizes")) == 1


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("split.workers=0", "config key 'split.workers' must be at least 1; got 0"),
        (
            "split.cut=2",
            "config key 'split.cut' must cut the model between two blocks, 1 .. 1 (model.n_layers is 2); got 2",
        ),
    ],
)
def test_bad_split_values_exit_2_with_one_line(tmp_path, setting, message):
    assert one_line_error(train(tmp_path, "bad", setting)) == f"cocodc: error: {message}"
