"""End to end under torchrun (gloo on CPU): the real `cocodc train` command, real process groups."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from cocodc import checkpoint
from cocodc.config import ConfigError, load_config
from cocodc.metrics import read_records
from cocodc.model import Transformer
from cocodc.run_dir import check_run_dir

from conftest import FAST, TINY, cocodc, one_line_error, overrides
from wandb_log import summarize

pytestmark = pytest.mark.slow  # end-to-end runs under torchrun

BASE = [*FAST, "train.steps=24", "sync.sync_every=8", "eval.every=8", "checkpoint.every=8"]


def param_count(*extra: str) -> int:
    config = load_config(TINY, [*FAST, *extra])
    return sum(p.numel() for p in Transformer(config.model, 256, config.train.seq_len).parameters())


def train(root: Path, name: str, *settings: str, flags: tuple[str, ...] = ()) -> Path:
    result = cocodc(
        "train", "-c", TINY, *flags, *overrides(*BASE, f"run.dir={root}", f"run.name={name}", *settings), cwd=root
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return root / name


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    return train(root, "full", "wandb.mode=offline", "eval.per_region=true")


def test_diloco_two_regions_trains_and_reports(full_run):
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["method"] == "diloco" and summary["regions"] == 2 and summary["steps"] == 24
    assert summary["final_eval_ppl"] < summary["initial_eval_ppl"] / 2
    assert summary["tokens"] == 24 * 2 * 8 * 64
    assert 0 < summary["compute_fraction"] <= 1
    assert summary["tflops"] > 0 and summary["mfu"] is None and summary["peak_memory_bytes"] > 2**20  # CPU: no peak
    # The fp32 pseudo-gradient of the whole model and the 2 regions' weights; ring over 2 regions: 1x each way.
    payload = 4 * param_count() + 4 * 2
    assert summary["bytes_sent"] == summary["bytes_received"] == 3 * payload

    records = read_records(full_run / "metrics.jsonl")
    syncs = sorted(
        (r["region"], r["send_step"], r["apply_step"], r["fragment"]) for r in records if r["kind"] == "sync"
    )
    assert syncs == [(m, s, s, 0) for m in (0, 1) for s in (8, 16, 24)]
    assert all(r["bytes_sent"] == payload for r in records if r["kind"] == "sync")
    evals = [r for r in records if r["kind"] == "eval" and r["scope"] == "global"]
    assert [r["step"] for r in evals] == [0, 8, 16, 24]
    assert evals[-1]["loss"] < evals[0]["loss"]
    region_evals = {(r["region"], r["step"]) for r in records if r["kind"] == "eval" and r["scope"] == "region"}
    assert {(0, 8), (1, 8), (0, 24), (1, 24)} <= region_evals
    assert all(r["tflops"] > 0 and r["peak_memory_bytes"] > 0 for r in records if r["kind"] == "train")
    assert sorted({(r["region"], r["step"]) for r in records if r["kind"] == "train"}) == [
        (m, s) for m in (0, 1) for s in range(2, 25, 2)
    ]
    guide = (full_run / "README.txt").read_text()
    assert "metrics-region<m>.jsonl" in guide and "read_records" in guide  # says where region 1's records are
    saved = load_config(full_run / "config.yaml")
    assert saved.train.steps == 24 and saved.model.d_model == 64


def test_one_writer_per_metrics_file(full_run):
    # Region 0's leader writes metrics.jsonl (with the global evals), region 1's its own file: no
    # two hosts append to one file; read_records merges them.
    own = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    other = [json.loads(line) for line in (full_run / "metrics-region1.jsonl").read_text().splitlines()]
    assert {r.get("region", 0) for r in own} == {0} and {r["region"] for r in other} == {1}
    assert len(read_records(full_run / "metrics.jsonl")) == len(own) + len(other)


def test_wandb_offline_logs_one_run_per_region(full_run):
    files = sorted(full_run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2
    runs = sorted((summarize(f) for f in files), key=lambda r: r["run"].display_name)
    assert [r["run"].display_name for r in runs] == ["full-region0", "full-region1"]
    for region, run in enumerate(runs):
        assert run["run"].run_group == "full"
        config = {item.key: json.loads(item.value_json) for item in run["run"].config.update}
        assert config["train"]["steps"] == 24 and config["region"] == region
        assert run["metrics"]["train/*"] == "inner_step" and run["metrics"]["sync/*"] == "outer_step"
        syncs = [h for h in run["history"] if "sync/fragment" in h]
        assert [h["outer_step"] for h in syncs] == [1, 2, 3]
        assert [h["inner_step"] for h in run["history"] if "train/loss" in h] == list(range(2, 25, 2))
    global_evals = [h["inner_step"] for h in runs[0]["history"] if "eval/loss" in h]
    assert global_evals == [0, 8, 16, 24]
    # What wandb holds is what metrics.jsonl holds.
    records = read_records(full_run / "metrics.jsonl")
    for region, run in enumerate(runs):
        logged = {h["inner_step"]: h["train/loss"] for h in run["history"] if "train/loss" in h}
        written = {r["step"]: r["loss"] for r in records if r["kind"] == "train" and r["region"] == region}
        assert logged == written
    evals = {r["step"]: r["loss"] for r in records if r["kind"] == "eval" and r["scope"] == "global"}
    assert {h["inner_step"]: h["eval/loss"] for h in runs[0]["history"] if "eval/loss" in h} == evals
    assert not any("eval/loss" in h for h in runs[1]["history"])  # the global eval is logged once


def test_resume_is_bit_identical(full_run, tmp_path):
    offline = ("wandb.mode=offline",)
    stopped = cocodc(
        "train", "-c", TINY, "--stop-at", "12", *overrides(*BASE, f"run.dir={tmp_path}", "run.name=split", *offline),
        cwd=tmp_path,
    )  # fmt: skip
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    assert "stopped after step 12" in stopped.stderr
    latest = tmp_path / "split" / "checkpoints" / "LATEST"
    assert latest.read_text() == "12\n"
    assert not (tmp_path / "split" / "summary.json").exists()
    # As if the process died before the step-12 checkpoint was committed: the resume starts from
    # step 8 and must drop the records written after it before writing them again.
    latest.write_text("8\n")
    # Resumed without the prefetcher: the batches, and so every number, are the loader's own.
    resumed = train(tmp_path, "split", "data.prefetch=0", *offline, flags=("--resume",))
    # Each region's two lives log into one wandb run.
    lives = [summarize(f)["run"] for f in sorted(resumed.glob("wandb/offline-run-*/run-*.wandb"))]
    for region in (0, 1):
        mine = [life.run_id for life in lives if life.display_name == f"split-region{region}"]
        assert len(mine) == 2 and set(mine) == {(resumed / f"wandb-region{region}.id").read_text().strip()}

    for region in (0, 1):
        a = checkpoint.read_region(full_run / "checkpoints", 24, region)
        b = checkpoint.read_region(resumed / "checkpoints", 24, region)
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), key
        for key, value in a["outer"]["global_params"].items():
            assert torch.equal(value, b["outer"]["global_params"][key]), key
    full_summary = json.loads((full_run / "summary.json").read_text())
    split_summary = json.loads((resumed / "summary.json").read_text())
    assert split_summary["final_eval_loss"] == full_summary["final_eval_loss"]
    assert split_summary["initial_eval_loss"] == full_summary["initial_eval_loss"]
    assert split_summary["bytes_sent"] == full_summary["bytes_sent"]

    def losses(run: Path) -> list[tuple]:
        records = read_records(run / "metrics.jsonl")
        return sorted((r["region"], r["step"], r["loss"]) for r in records if r["kind"] == "train")

    assert losses(resumed) == losses(full_run)  # nothing duplicated by the restart, nothing lost


def test_bad_resumes_and_reused_run_dirs_are_refused(full_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(full_run, run, ignore=shutil.ignore_patterns("wandb"))

    def attempt(*args: str) -> str:
        result = cocodc(
            "train",
            "-c",
            TINY,
            *overrides(*BASE, f"run.dir={tmp_path}", "run.name=copy"),
            *args,
            cwd=tmp_path,
            timeout=120,
        )
        return one_line_error(result)

    assert "run directory" in attempt() and "exists; pass --resume" in attempt()
    assert "was written with model.d_model=64; the config says 32" in attempt("--resume", "--set", "model.d_model=32")
    latest = checkpoint.rank_file(run / "checkpoints", 24, 1)
    latest.write_bytes(latest.read_bytes()[:1000])
    assert f"checkpoint file {latest} is corrupt or unreadable" in attempt("--resume")
    latest.unlink()
    assert "lacks the files of ranks [1]" in attempt("--resume")
    metadata = checkpoint.region_dir(run / "checkpoints", 24, 1) / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:100])
    assert "region1 is corrupt or unreadable" in attempt("--resume")
    (run / "checkpoints" / "LATEST").write_text("garbage")
    assert "LATEST is corrupt" in attempt("--resume")


def test_report_plots_runs(full_run, tmp_path):
    result = cocodc("report", str(full_run), "-o", str(tmp_path / "report.png"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report.png").stat().st_size > 10_000
    final = json.loads((full_run / "summary.json").read_text())["final_eval_loss"]
    assert f"full  {final:>10.4f}      24" in result.stdout and "diloco" in result.stdout
    missing = cocodc("report", str(tmp_path / "nothing"), cwd=tmp_path)
    assert "is not a run directory" in one_line_error(missing)


def test_ddp_baseline_all_reduces_every_step(tmp_path):
    # Behind a 20 ms link model: every bucket's all-reduce completes no earlier than the link
    # allows, and that wait, inside DDP's backward, is time blocked, not compute.
    run = train(tmp_path, "ddp", "sync.method=ddp", "train.steps=6", "eval.every=0", "checkpoint.every=0",
                "wan.latency_ms=20")  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "ddp"
    assert summary["blocked_s"] > 0 and summary["compute_fraction"] < 1 - summary["blocked_s"] / summary["wall_s"] / 2
    # Every gradient, every step: the model fits DDP's first bucket (1 MB), so one all-reduce a
    # step, with the 2 ranks' weights riding along.
    assert summary["bytes_sent"] == 6 * (4 * param_count() + 4 * 2)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    assert not [r for r in read_records(run / "metrics.jsonl") if r["kind"] == "sync"]


def test_two_ranks_per_region(tmp_path):
    run = train(
        tmp_path,
        "wide",
        "topology.ranks_per_region=2",
        "train.steps=8",
        "sync.sync_every=4",
        "eval.every=0",
        "checkpoint.every=0",
    )
    regions = [checkpoint.read_region(run / "checkpoints", 8, region) for region in (0, 1)]
    # The last step is a sync, so every region holds the global model.
    for key, value in regions[0]["model"].items():
        assert torch.equal(value, regions[1]["model"][key]), key
    summary = json.loads((run / "summary.json").read_text())
    # 2 syncs; each of a region's 2 ranks carries half the model (padded to an even count) over
    # its own inter-region link, so the region moves what one rank would, spread over 2 links.
    # With the 2 regions' weights riding along.
    half = -(-param_count() // 2)
    assert summary["bytes_sent"] == 2 * 2 * (4 * half + 4 * 2)
    syncs = [r for r in read_records(run / "metrics.jsonl") if r["kind"] == "sync"]
    assert {r["bytes_sent"] for r in syncs} == {4 * half + 4 * 2}


def test_cocodc_adaptive_schedule_decides_alike_in_three_regions(tmp_path):
    # Three regions behind a jittery link model (timings differ on every rank), 4-bit payloads,
    # adaptive fragment choice and tau: every region must log the same decisions, or the
    # collectives would deadlock; every slot's sync is applied where it was planned.
    run = train(
        tmp_path,
        "adaptive",
        "topology.regions=3",
        "sync.method=cocodc",
        "sync.schedule=adaptive",
        "sync.fragments=2",
        "sync.quantize=e3m0",
        "wan.latency_ms=20",
        "wan.jitter_ms=15",
        "wan.bandwidth_mbps=20",
        "eval.every=0",
        "checkpoint.every=0",
    )
    records = read_records(run / "metrics.jsonl")
    keys = (
        "slot",
        "fragment",
        "reason",
        "send_step",
        "apply_step",
        "tau",
        "drift",
        "measured_at",
        "step_s",
        "transfer_s",
    )
    decisions = {m: [tuple(str(r[k]) for k in keys) for r in records if r["kind"] == "decision" and r["region"] == m]
                 for m in range(3)}  # fmt: skip
    assert len(decisions[0]) == 24 // 4 and decisions[0] == decisions[1] == decisions[2]
    plans = [r for r in records if r["kind"] == "decision" and r["region"] == 0]
    assert plans[0]["reason"] == "round-robin" and {p["reason"] for p in plans[1:]} <= {"drift", "stale"}
    assert all(1 <= p["tau"] <= 3 for p in plans)
    applied = sorted((r["fragment"], r["send_step"], r["apply_step"]) for r in records
                     if r["kind"] == "sync" and r["region"] == 0)  # fmt: skip
    assert applied == sorted((p["fragment"], p["send_step"], p["apply_step"]) for p in plans)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "cocodc" and summary["final_eval_loss"] < summary["initial_eval_loss"]


@pytest.mark.parametrize(
    "settings",
    [
        # P = 4 fragments, K = 2, tau = 3: two fragments in flight at the stop.
        ("sync.method=cocodc", "sync.fragments=4", "model.n_layers=4", "sync.sync_every=8", "sync.delay=3"),
        # Two ranks per region, each carrying half of every 4-bit fragment.
        (
            "sync.method=streaming",
            "sync.fragments=2",
            "sync.delay=2",
            "topology.ranks_per_region=2",
            "sync.quantize=e3m0",
        ),
    ],
    ids=["in-flight", "two-ranks-e3m0"],
)
def test_resume_with_fragments_in_flight_is_bit_identical(tmp_path, settings):
    common = ("train.steps=16", "eval.every=0", "checkpoint.every=0", *settings)
    full = train(tmp_path, "full", *common)
    stopped = cocodc("train", "-c", TINY, "--stop-at", "7",
                     *overrides(*BASE, f"run.dir={tmp_path}", "run.name=split", *common), cwd=tmp_path)  # fmt: skip
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    assert checkpoint.read_region(tmp_path / "split" / "checkpoints", 7, 0)["outer"]["in_flight"]
    resumed = train(tmp_path, "split", *common, flags=("--resume",))
    for region in (0, 1):
        a = checkpoint.read_region(full / "checkpoints", 16, region)
        b = checkpoint.read_region(resumed / "checkpoints", 16, region)
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), key
        for key, value in a["outer"]["global_params"].items():
            assert torch.equal(value, b["outer"]["global_params"][key]), key
    summaries = [json.loads((run / "summary.json").read_text()) for run in (full, resumed)]
    assert summaries[0]["final_eval_loss"] == summaries[1]["final_eval_loss"]
    assert summaries[0]["bytes_sent"] == summaries[1]["bytes_sent"]


@pytest.mark.parametrize(
    "shape",
    [
        ["topology.regions=1"],  # one rank
        ["sync.method=ddp"],  # DDP over 2 regions: the micro-batches but the last skip the all-reduce
    ],
    ids=["one-rank", "ddp"],
)
def test_two_micro_batches_of_4_train_as_one_batch_of_8(tmp_path, shape):
    # The same 8 rows a step (the loader deals a step's rows), and the same eval sequences (the
    # first 32 of the held-out order, in 8 batches of 4 or 4 of 8).
    common = [*shape, "train.steps=30", "eval.every=0", "checkpoint.every=0"]
    whole = train(tmp_path, "whole", *common, "train.batch_size=8", "eval.batches=4")
    micro = train(tmp_path, "micro", *common, "train.batch_size=4", "train.grad_accum=2", "eval.batches=8")
    a, b = (json.loads((run / "summary.json").read_text()) for run in (whole, micro))
    assert a["initial_eval_loss"] == pytest.approx(b["initial_eval_loss"], abs=1e-6)
    assert abs(a["final_eval_loss"] - b["final_eval_loss"]) < 1e-5
    assert a["final_eval_loss"] < a["initial_eval_loss"] - 1
    assert a["bytes_sent"] == b["bytes_sent"]  # ddp: one all-reduce a step either way


def test_a_hub_corpus_out_of_reach_falls_back_to_the_shipped_one(tmp_path):
    # HF_HUB_OFFLINE makes the hub out of reach whatever this machine's network.
    args = overrides(*BASE, "data.source=hf:HuggingFaceFW/fineweb-edu", "train.steps=2", "eval.every=0",
                     "checkpoint.every=0", f"run.dir={tmp_path}", "run.name=offline")  # fmt: skip
    stale = tmp_path / "offline" / "stale.txt"  # an earlier run's: --overwrite replaces the directory
    stale.parent.mkdir()
    stale.write_text("old")
    result = cocodc("train", "-c", TINY, *args, "--overwrite", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert not stale.exists()
    assert result.stderr.count("data.source hf:HuggingFaceFW/fineweb-edu falls back to the shipped corpus") == 1
    assert load_config(tmp_path / "offline" / "config.yaml").data.source == "kjv"


def test_a_used_run_directory_is_refused_unless_overwritten_or_resumed(tmp_path):
    config = load_config(TINY, [f"run.dir={tmp_path}", "run.name=used"])
    check_run_dir(config, resume=False, overwrite=False)  # not there yet
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"run directory .*used exists; pass --resume to continue it, --overwrite"):
        check_run_dir(config, resume=False, overwrite=False)
    check_run_dir(config, resume=False, overwrite=True)
    with pytest.raises(ConfigError, match="--resume and --overwrite contradict each other"):
        check_run_dir(config, resume=True, overwrite=True)
