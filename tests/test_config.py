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
