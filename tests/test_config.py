import importlib.util
import re

import pytest

from cocodc.config import Config, ConfigError, load_config

from conftest import REPO, TINY, cocodc, one_line_error


def test_defaults_and_file_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  steps: 10\nsync:\n  sync_every: 5\n")
    config = load_config(path, ["train.lr=1", "sync.outer_nesterov=false", "data.hf_config=null"])
    assert isinstance(config, Config)
    assert config.train.steps == 10 and config.sync.sync_every == 5
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.sync.outer_nesterov is False
    assert config.data.hf_config is None
    assert config.run.name == "exp"  # defaults to the file's stem
    assert config.model.d_model == 128  # untouched default


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("no_such_key=1", "unknown config key 'no_such_key'"),
        ("train.no_such=1", "unknown config key 'train.no_such'"),
        ("train.steps.x=1", "unknown config key 'train.steps.x'"),
        ("train.steps=abc", "config key 'train.steps' expects int; got 'abc'"),
        ("train.steps=1.5", "config key 'train.steps' expects int; got 1.5"),
        ("train.steps=true", "config key 'train.steps' expects int; got True"),
        ("train.steps=0", "config key 'train.steps' must be at least 1; got 0"),
        ("sync.method=gossip", "config key 'sync.method' must be one of ddp, diloco, streaming, cocodc; got 'gossip'"),
        ("sync.fragments=2", "sync.method diloco syncs the whole model without overlap"),
        ("sync.sync_every=7", None),
        ("model.d_model=100", "model.d_model (100) must split into model.n_heads (4) heads of even size"),
        ("sync.alpha=2", "config key 'sync.alpha' must lie in [0, 1]; got 2.0"),
        ("train", "override 'train' is not of the form key=value"),
        ("train=3", "config key 'train' is a section"),
        ("run.name=a/b", "config key 'run.name' must be a plain directory name"),
        ("train.kernels=fast", "config key 'train.kernels' must be one of auto, torch, triton; got 'fast'"),
        ("sync.link_share=2", "config key 'sync.link_share' must lie in [0, 1]; got 2.0"),
        ("sync.link_share=0.5", "sync.link_share needs sync.schedule adaptive with sync.adaptive_delay"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    if message is None:  # a valid value: no error
        load_config(TINY, [override])
        return
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("config", "override", "message"),
    [
        ("federated.yaml", "train.device=cuda", "mode federated runs on CPU over gloo; train.device cuda is for"),
        ("split.yaml", "topology.backend=nccl", "mode split runs on CPU over gloo; topology.backend nccl is for"),
    ],
)
def test_federated_and_split_refuse_a_gpu_setting(config, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / config, [override])


@pytest.mark.parametrize(
    "overrides, mix",
    [
        ([], 0.0),
        (["sync.method=streaming"], 0.0),
        (["sync.method=cocodc"], 0.5),
        (["sync.method=cocodc", "sync.alpha=0"], 0.0),
    ],
)
def test_alpha_defaults_by_method(overrides, mix):
    # Unset, the merge keeps none of the live parameters for streaming (torchft) and half for cocodc.
    assert load_config(None, overrides).sync.mix == mix


def test_impossible_combinations():
    with pytest.raises(ConfigError, match=r"sync.sync_every \(10\) must be a multiple of sync.fragments \(3\)"):
        load_config(TINY, ["sync.method=streaming", "sync.fragments=3", "sync.sync_every=10"])
    with pytest.raises(ConfigError, match=r"sync.delay \(50\) must be less than sync.sync_every \(50\)"):
        load_config(TINY, ["sync.method=streaming", "sync.delay=50"])
    # The adaptive schedule runs several fragments in flight: tau up to H - 1, as round-robin.
    load_config(TINY, ["sync.method=cocodc", "sync.schedule=adaptive", "sync.fragments=2", "sync.delay=49"])
    with pytest.raises(ConfigError, match="hub streams"):
        load_config(TINY, ["data.source=hf:some/dataset", "data.split=non_iid"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML \(line"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections, not a list"):
        load_config(bad)
    bad.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="config key 'train' must be a section of keys"):
        load_config(bad)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-c", TINY, "--set", "no_such_key=1"], "cocodc: error: unknown config key 'no_such_key'"),
        (["-c", "missing.yaml"], "cocodc: error: config file not found: missing.yaml"),
        (["-c", TINY, "--resume", "--set", "run.dir=nowhere"], "cocodc: error: no checkpoint to resume in"),
    ],
)
def test_cli_reports_one_line_and_exits_2(tmp_path, args, message):
    assert one_line_error(cocodc("train", *args, cwd=tmp_path, timeout=120)).startswith(message)
    assert not (tmp_path / "runs").exists()


def test_configs_in_repo_are_valid():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_forced_kernels_on_the_cpu_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    settings = ["train.kernels=triton", "train.device=cpu"]
    try:
        import triton  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="train.kernels triton needs triton installed"):
            load_config(TINY, settings)
        return
    with pytest.raises(ConfigError, match="runs in Triton's interpreter: TRITON_INTERPRET=1"):
        load_config(TINY, settings)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    load_config(TINY, settings)


def test_ft_is_for_the_regions_modes_outer_sync(tmp_path):
    with pytest.raises(ConfigError, match="ft.enabled needs mode regions with an outer sync"):
        load_config(None, ["ft.enabled=true", "sync.method=ddp"])
    with pytest.raises(ConfigError, match="ft.min_regions"):
        load_config(None, ["ft.enabled=true", "ft.min_regions=3"])


FEDERATED, SPLIT = "configs/federated.yaml", "configs/split.yaml"


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        (TINY, ["model.ffn_hidden=-1"], "config key 'model.ffn_hidden' must not be negative; got -1"),
        (TINY, ["model.n_kv_heads=3"], "model.n_kv_heads (3) must divide model.n_heads (4), or be 0"),
        (TINY, ["model.max_seq_len=64"], "model.max_seq_len (64) must cover train.seq_len (128), or be 0"),
        (TINY, ["model.rope_scaling.factor=0.5"], "model.rope_scaling needs factor >= 1"),
        (TINY, ["model.rope_scaling.factor=8", "model.rope_scaling.low_freq_factor=4"], "0 < low_freq_factor < high"),
        (TINY, ["model.rope_scaling=8"], "config key 'model.rope_scaling' is a section"),
        (TINY, ["model.ffn_multiple_of=0"], "config key 'model.ffn_multiple_of' must be at least 1; got 0"),
        (TINY, ["topology.timeout_s=0"], "config key 'topology.timeout_s' must be positive; got 0.0"),
        (TINY, ["train.lr=0"], "config keys 'train.lr' and 'sync.outer_lr' must be positive"),
        (TINY, ["train.min_lr_ratio=1.5"], "config key 'train.min_lr_ratio' must lie in [0, 1]; got 1.5"),
        (TINY, ["train.beta2=1"], "config keys 'train.beta1' and 'train.beta2' must lie in [0, 1)"),
        (TINY, ["sync.outer_momentum=0", "sync.outer_nesterov=true"], "sync.outer_nesterov needs a positive"),
        (FEDERATED, ["train.grad_accum=2"], "train.grad_accum (2) is for mode regions; mode federated steps"),
        (TINY, ["sync.schedule=adaptive"], "sync.schedule adaptive needs sync.method streaming or cocodc; got diloco"),
        (TINY, ["sync.method=streaming", "sync.fragments=4", "sync.sync_every=4", "sync.schedule=adaptive"],
         "sync.schedule adaptive needs slots of 2+ steps"),
        (TINY, ["sync.max_staleness=-1"], "config key 'sync.max_staleness' must not be negative; got -1"),
        (TINY, ["sync.max_staleness=10"], "config key 'sync.max_staleness' (10) must be at least sync.sync_every (50)"),
        (TINY, ["sync.dc_lambda=-1"], "config key 'sync.dc_lambda' must not be negative; got -1.0"),
        (TINY, ["sync.dc_beta=1"], "config key 'sync.dc_beta' must lie in [0, 1); got 1.0"),
        (TINY, ["data.eval_fraction=0.5"], "config key 'data.eval_fraction' must lie in (0, 0.5); got 0.5"),
        (TINY, ["data.tokenizer=words"], "config key 'data.tokenizer' must be bytes, bpe or hf:PATH; got 'words'"),
        (TINY, ["data.tokenizer=hf:/no/such"], "data.tokenizer hf:/no/such: no tokenizer.json there"),
        (TINY, ["data.dirichlet_alpha=0"], "config key 'data.dirichlet_alpha' must be positive; got 0.0"),
        (TINY, ["sync.method=ddp", "topology.parallel=fsdp"], "topology.parallel fsdp shards a region for an outer"),
        (TINY, ["sync.method=streaming", "sync.fragments=5", "sync.sync_every=50"], "cannot exceed model.n_layers (4)"),
        (TINY, ["wan.latency_ms=-1"], "config key 'wan.latency_ms' must not be negative; got -1"),
        (TINY, ["wan.latency_ms=fast"], "config key 'wan.latency_ms' expects float or list[list[float]]; got 'fast'"),
        (TINY, ["wan.loss_pct=100", "wan.emulation=netem"], "config key 'wan.loss_pct' must be below 100; got 100"),
        (TINY, ["topology.regions=1", "wan.latency_ms=5", "wan.emulation=netem"], "needs topology.regions of at least"),
        (TINY, ["wan.loss_pct=1"], "wan.loss_pct needs wan.emulation=netem"),
        (TINY, ["wan.latency_ms=[[0, 1], [1, 0], [1, 1]]"], "config key 'wan.latency_ms' must be a number or a 2 x 2"),
        (TINY, ["ft.enabled=true", "ft.min_regions=3"], "'ft.min_regions' must be 1 .. topology.regions; got 3"),
        (TINY, ["ft.enabled=true", "ft.quorum_timeout_s=0"], "config key 'ft.quorum_timeout_s' must be positive"),
        (TINY, ["ft.enabled=true", "ft.max_restarts=-1"], "config key 'ft.max_restarts' must not be negative; got -1"),
        (TINY, ["ft.enabled=true", "ft.lighthouse=host:1"], "config key 'ft.lighthouse' must be an address like"),
        (FEDERATED, ["federated.proximal_mu=0.1"], "federated.proximal_mu is fedprox's term"),
        (FEDERATED, ["federated.strategy=fedadam", "federated.server_lr=0"], "'federated.server_lr' must be positive"),
        (FEDERATED, ["federated.strategy=fedadam", "federated.server_beta1=1"], "'federated.server_beta1' must lie in"),
        (FEDERATED, ["federated.strategy=fedadam", "federated.server_tau=0"], "'federated.server_tau' must be"),
        (FEDERATED, ["federated.lora_alpha=4"], "federated.lora_alpha needs a positive federated.lora_rank"),
        (FEDERATED, ["wan.latency_ms=5"], "the wan section links regions; the federated mode's links are the devices"),
        (FEDERATED, ["federated.groups=11"], "'federated.groups' must be 0 (flat) or 1 .. federated.clients / 2 (10)"),
        (FEDERATED, ["federated.groups=-1"], "'federated.groups' must be 0 (flat) or 1 .. federated.clients / 2"),
        (FEDERATED, ["federated.groups=6"], "'federated.clients_per_round' (5) must give each of the 6 groups"),
        (FEDERATED, ["federated.groups=2", "federated.group_depth=5"], "'federated.group_depth' must be 0 (the rule)"),
        (FEDERATED, ["federated.groups=2", "federated.group_rounds=-1"], "'federated.group_rounds' must not be"),
        (FEDERATED, ["federated.groups=2", "federated.group_rounds_max=0"], "'federated.group_rounds_max' must be at"),
        (FEDERATED, ["devices.cloud_latency_ms=-1"], "config key 'devices.cloud_latency_ms' must not be negative"),
        (FEDERATED, ["devices.edge_bandwidth_mbps=-1"], "'devices.edge_bandwidth_mbps' must not be negative"),
        (FEDERATED, ["data.source=hf:some/corpus"], "mode federated deals a local corpus's domains to clients"),
        (FEDERATED, ["devices.step_s=-1"], "config key 'devices.step_s' must not be negative; got -1"),
        (SPLIT, ["federated.lora_rank=4"], "federated.lora_rank is for mode federated: mode split trains every"),
        (SPLIT, ["model.tie_embeddings=true"], "model.tie_embeddings with split.shape two would put the embedding"),
        (SPLIT, ["wan.latency_ms=5"], "the wan section links regions; the split mode's links are the devices"),
        (SPLIT, ["data.source=hf:some/corpus"], "mode split deals a local corpus's domains to workers"),
    ],
)  # fmt: skip
def test_every_check_names_its_keys(config, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(config, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_hf_config_that_is_no_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not a readable JSON file"):
        load_config(TINY, [f"model.hf_config={tmp_path}"])
    with pytest.raises(ConfigError, match="mode split cuts cocodc's own model"):
        load_config(SPLIT, [f"model.hf_config={tmp_path}"])


@pytest.mark.parametrize(
    ("overrides", "missing", "message"),
    [
        (["train.compile=true"], "cc", "train.compile needs a C compiler for inductor"),
        (["train.kernels=triton"], "triton", "train.kernels triton needs triton installed"),
        (["ft.enabled=true"], "torchft", "ft.enabled needs torchft: pip install 'cocodc[ft]'"),
    ],
)
def test_what_a_setting_needs_installed_is_named(monkeypatch, overrides, missing, message):
    # All three are installed here: their absence is what the test makes up (no C compiler on $CC;
    # the module not found).
    if missing == "cc":
        monkeypatch.setenv("CC", "/no/such/compiler")
    else:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TINY, overrides)


def test_a_float_without_a_dot_is_a_float():
    # YAML 1.1 reads 3e-2 as a string; a float key takes it as the number it spells.
    assert load_config(TINY, ["train.lr=3e-2"]).train.lr == 0.03
    with pytest.raises(ConfigError, match="config key 'train.lr' expects float; got 'fast'"):
        load_config(TINY, ["train.lr=fast"])
