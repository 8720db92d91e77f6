"""Typed run configuration: a YAML file plus `--set a.b=c` overrides, validated with one-line errors.

Every key has a default here; a YAML file and the overrides only change what they name. Any
problem raises `ConfigError` with a message that names the key, the value or the file, and the
command line turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message is shown to the user as is."""


@dataclass
class TopologyConfig:
    regions: int = 2  # M: regions, joined by the (slow) WAN
    # R: ranks (GPUs) per region, on the region's fast link; each carries 1/R of every fragment over the WAN
    ranks_per_region: int = 1
    # auto: NCCL on GPUs with a GPU per rank, else gloo (ranks that share GPUs, the CPU)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # How a region holds its model: ddp (a whole replica on every rank) or fsdp (FSDP2: parameters,
    # gradients, inner and outer optimizer state sharded over the region's ranks).
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # A collective or transfer that does not complete within this many seconds plus twice its
    # expected time on the link (a peer died or fell silent) ends the run with one error line a rank.
    timeout_s: float = 120.0


@dataclass
class RopeScalingConfig:
    """Llama 3's long-context rotary scaling: wavelengths longer than original_max_len /
    low_freq_factor are slowed by `factor`, those shorter than original_max_len / high_freq_factor
    kept, those between blended."""

    factor: float = 0.0  # 0: no scaling; Llama 3.1 uses 8
    low_freq_factor: float = 1.0  # wavelengths past original_max_len / this are slowed by factor
    high_freq_factor: float = 4.0  # wavelengths below original_max_len / this are kept
    original_max_len: int = 8192  # the context length the unscaled model was trained for


@dataclass
class ModelConfig:
    """A Llama-style decoder; `cocodc export --hf` writes it as a transformers LlamaForCausalLM."""

    n_layers: int = 4  # transformer blocks
    d_model: int = 128  # width of the residual stream
    n_heads: int = 4  # attention heads (d_model / n_heads: an even head size)
    n_kv_heads: int = 0  # key/value heads: 0 for n_heads; fewer (a divisor of n_heads) is grouped-query attention
    ffn_hidden: int = 0  # 0: 8/3 * d_model rounded up to a multiple of ffn_multiple_of (SwiGLU sizing)
    ffn_multiple_of: int = 64  # the SwiGLU hidden size rounds up to a multiple of this (Llama: 256)
    tie_embeddings: bool = False  # the output head shares the embedding's weight
    max_seq_len: int = 0  # the longest sequence the rotary tables cover; 0: train.seq_len
    rope_theta: float = 10000.0  # the rotary positions' base
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)  # Llama 3's (a section)
    norm_eps: float = 1e-5  # RMSNorm's epsilon
    # The parameters to start from, in any mode: a cocodc run directory (the global model of its
    # latest checkpoint), a directory `cocodc export --hf` (or transformers) wrote with a Llama of this
    # shape, or a checkpoint file (.pt) holding the model's state dict.
    init_from: str = ""
    # A transformers model instead of this section's: the config.json (or a directory with one) of
    # a causal LM, built from it alone (no download); the keys above but init_from do not apply.
    hf_config: str = ""


@dataclass
class TrainConfig:
    steps: int = 300  # inner steps (rounds, in the federated mode)
    batch_size: int = 16  # sequences per rank per inner step (per micro-batch with grad_accum)
    seq_len: int = 128  # tokens per sequence
    lr: float = 3e-3  # AdamW's peak learning rate
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 20  # linear warmup to lr
    weight_decay: float = 0.1  # AdamW's, on the matrices (not the norms)
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    grad_clip: float = 1.0  # the gradients' global norm is clipped to this; 0 disables clipping
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA where there is one (the regions mode)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on cuda, fp32 on cpu
    threads: int = 0  # torch intra-op threads per rank; 0: the cores divided among local ranks
    # The outer sync's fused kernels: auto runs Triton on CUDA tensors where triton is installed,
    # torch forces the reference (the semantics), triton forces the kernels (on CPU: TRITON_INTERPRET=1).
    kernels: Literal["auto", "torch", "triton"] = "auto"
    # CUDA: deterministic kernels only (slower), so a GPU run repeats bit for bit; the CPU always does.
    deterministic: bool = False
    log_every: int = 10  # steps between two train records (the console's progress is every step)
    # Micro-batches of batch_size per inner step (the regions mode); the region reduces the
    # gradients after the last only.
    grad_accum: int = 1
    compile: bool = False  # the blocks through torch.compile (inductor: needs a C compiler, on the CPU too)
    # The blocks recompute their activations in backward: "full" keeps each block's input only,
    # "selective" keeps the matmuls' and attention's outputs and recomputes norms, rotary and SiLU.
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # The loss's fp32 logits made this many tokens at a time and recomputed in backward, so a whole
    # batch's never exist at once; 0: in one piece.
    loss_chunk_tokens: int = 4096


@dataclass
class SyncConfig:
    # ddp: data-parallel over every rank, an all-reduce a step; diloco: the whole model every H
    # steps; streaming: P fragments in turn, overlapped with tau steps; cocodc: streaming with delay
    # compensation (and, with schedule adaptive, adaptive transmission)
    method: Literal["ddp", "diloco", "streaming", "cocodc"] = "diloco"
    sync_every: int = 50  # H: inner steps between two syncs of the same fragment
    outer_lr: float = 0.7  # the outer SGD's learning rate
    outer_momentum: float = 0.9  # the outer SGD's momentum
    outer_nesterov: bool = True  # Nesterov momentum for the outer step
    fragments: int = 1  # P: the model's blocks in P fragments, synced in turn
    fragment_pattern: Literal["strided", "sequential"] = "strided"  # strided: block i in fragment i mod P
    # The model's blocks, as a dotted path ("model.layers"); "": its `blocks`, or else the ModuleList of
    # repeated modules holding the most parameters (a transformers model's decoder layers)
    blocks: str = ""
    delay: int = 0  # tau: inner steps between sending a fragment and applying its result
    # The merge's share of the live parameters: live <- alpha * live + (1 - alpha) * global for
    # streaming; the mix after cocodc's compensation. Unset: 0 for streaming (torchft's default),
    # 0.5 for cocodc (benchmarks/convergence.py chose it).
    alpha: float | None = None
    quantize: Literal["fp32", "bf16", "fp8", "int8", "e3m0"] = "fp32"  # pseudo-gradients on the wire
    # cocodc: theta <- theta_g + delta - w * (theta_g - theta_send), then the alpha mix; w per element
    # is dc_lambda * delta^2 without dc_adaptive, or by dc_normaliser: "adam", dc_lambda * tau * lr *
    # sqrt(v) with v the inner AdamW's bias-corrected second moment (the Taylor term with the
    # curvature AdamW tracks; capped at 0.9); "running", dc_lambda * delta^2 over a running mean
    # (decay dc_beta) of delta^2, clamped to 1; "tensor", over this apply's mean(delta^2) per tensor
    # (scale-free at every apply: w = dc_lambda where all moved alike; capped at 0.9).
    # dc_lambda unset: 750 for "adam" (it multiplies a gradient's size; benchmarks/convergence.py
    # chose it: 3000 did as well at H 40 and never reached Streaming DiLoCo at H 80), 0.5 for the others.
    dc_lambda: float | None = None
    dc_adaptive: bool = True  # cocodc: w normalised by dc_normaliser; false: dc_lambda * delta^2
    dc_beta: float = 0.99  # the running normaliser's decay
    dc_normaliser: Literal["adam", "running", "tensor"] = "adam"  # cocodc's weight rule (see dc_lambda)
    # round_robin: fragments in turn; adaptive: each slot syncs the fragment that drifted most
    # (none unsynced longer than max_staleness) with a tau from the measured step and transfer times.
    schedule: Literal["round_robin", "adaptive"] = "round_robin"
    max_staleness: int = 0  # adaptive: the longest a fragment may go unsynced, in steps; 0: 2 H
    adaptive_delay: bool = True  # adaptive: tau from the measured times; false: sync.delay
    # The adaptive schedule's share of the link: where the measured transfers leave the link idle,
    # a slot carries as many fragments as fit in this share of its time (0: one a slot).
    link_share: float = 0.0
    # Where the outer state (global copy, momentum, normaliser, theta_send) lives: beside the model
    # ("device"), or in host memory ("host": pinned on CUDA; the outer step then runs on the CPU,
    # the live values crossing to the host and back at each sync). On a CPU run both are RAM.
    outer_state: Literal["device", "host"] = "device"

    @property
    def compensation_lambda(self) -> float:
        """dc_lambda, or its default for the weight rule."""
        if self.dc_lambda is not None:
            return self.dc_lambda
        return 750.0 if self.dc_adaptive and self.dc_normaliser == "adam" else 0.5

    @property
    def mix(self) -> float:
        """alpha, or its default for the method."""
        if self.alpha is not None:
            return self.alpha
        return 0.5 if self.method == "cocodc" else 0.0


@dataclass
class WanConfig:
    """The link between regions. A number applies to every pair of regions; an M x M list of
    lists (row: from region, column: to region) sets each one-way link on its own."""

    emulation: Literal["model", "netem"] = "model"  # model: the comm engine's link model; netem: namespaces
    latency_ms: float | list[list[float]] = 0.0  # one-way
    bandwidth_mbps: float | list[list[float]] = 0.0  # 0: unlimited
    jitter_ms: float = 0.0  # latency drawn uniformly within +- this
    loss_pct: float = 0.0  # packet loss; netem only (TCP retransmits are not modelled)

    @property
    def enabled(self) -> bool:
        return any(_any_positive(v) for v in (self.latency_ms, self.bandwidth_mbps, self.jitter_ms, self.loss_pct))


def _any_positive(value: float | list[list[float]]) -> bool:
    return any(v > 0 for row in value for v in row) if isinstance(value, list) else value > 0


@dataclass
class DataConfig:
    source: str = "kjv"  # "kjv" (shipped), a path/glob of text files, or "hf:<dataset>"
    hf_config: str | None = None  # hf: the dataset's configuration (e.g. sample-10BT)
    text_field: str = "text"  # hf: the column that holds the text
    # bytes (256 tokens), bpe (trained on the corpus at start), or hf:PATH (a tokenizer.json, or a
    # directory with one, e.g. a model's from the hub, read offline; its end-of-text token ends documents)
    tokenizer: str = "bytes"
    vocab_size: int = 4096  # bpe only
    bpe_train_docs: int = 20000  # hub streams: documents read to train the BPE
    # iid: a seeded shuffle dealt round-robin; non_iid: each domain split among regions by
    # Dirichlet(dirichlet_alpha) shares
    split: Literal["iid", "non_iid"] = "iid"
    dirichlet_alpha: float = 0.5  # non_iid: smaller means regions hold more distinct domains
    eval_fraction: float = 0.02  # local corpora: tail of every domain held out for eval
    eval_docs: int = 200  # hub streams: leading documents held out for eval
    prefetch: int = 2  # batches made ahead of the step on a background thread (regions mode); 0: in the step


@dataclass
class EvalConfig:
    every: int = 50  # steps between evals of the global model; 0: only at the start and the end
    batches: int = 8  # eval batches of train.batch_size sequences (a fixed held-out set)
    per_region: bool = False  # also each region's live model


@dataclass
class FtConfig:
    """Regions that fail and come back (torchft): each region is its own torchrun job, a replica
    group of torchft's, and a lighthouse decides who takes part in every fragment sync."""

    enabled: bool = False  # regions that fail are left out of the syncs, restarted and healed from a peer
    lighthouse: str = ""  # http://host:port of a running lighthouse; empty: `cocodc train` starts one
    min_regions: int = 1  # a sync commits only with at least this many regions in its quorum
    # A region whose heartbeat is silent this long is out of the next quorum: the bound on how long
    # the others wait for a dead region.
    heartbeat_timeout_s: float = 5.0
    # A region that is up again (heartbeating) but not yet asking is waited for this long by the
    # others' next quorum: long enough for a restart's setup, short enough not to stall them.
    join_timeout_s: float = 60.0
    quorum_timeout_s: float = 600.0  # the longest wait for a quorum (a peer's long outer step, a restart)
    max_restarts: int = 3  # torchrun restarts of a region's job that failed


@dataclass
class RunConfig:
    dir: str = "runs"  # where run directories go
    name: str = ""  # the run directory's name; empty: the config file's stem


@dataclass
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = "disabled"  # online after `wandb login`
    project: str = "cocodc"  # the wandb project
    entity: str | None = None  # the wandb team or user; unset: wandb's default


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0: only at the end
    keep: int = 2  # complete checkpoints kept
    # Write the region's checkpoint on a background thread once its state is copied to host memory
    # (torch.distributed.checkpoint's async_save); the step is committed when every rank's files are
    # in, at the latest when the next save begins.
    async_save: bool = False


@dataclass
class SplitConfig:
    """`mode: split`: workers (dealt over `executors` processes) hold the data and the model's
    bottom, the embedding and the first `cut` blocks; the server (rank 0) the rest."""

    workers: int = 4  # workers, each with its own data shard
    executors: int = 2  # processes the workers are dealt over
    cut: int = 1  # blocks on the workers: 1 .. model.n_layers - 1
    shape: Literal["two", "u"] = "two"  # u: the final norm and head stay on the workers with the labels
    merge: bool = True  # one server step on every worker's activations at once; false: SplitFed v2
    # 1: the workers' parts stay one model (their gradients are averaged every step, weighted by
    # batch); k > 1: each worker steps its own part, and the parts are averaged every k steps.
    aggregate_every: int = 1
    batch_regulation: bool = False  # batch sizes so every worker's activations arrive together
    server_lr: float | None = None  # the server part's AdamW peak lr; unset: train.lr
    quantize: Literal["fp32", "bf16", "fp8", "int8", "e3m0"] = "fp32"  # activations and gradients on the wire


@dataclass
class DevicesConfig:
    """The modelled devices and links of federated clients and split-learning workers, drawn once
    from the seed: each is log-uniform over [median / sqrt(spread), median * sqrt(spread)]
    (spread 1: every device alike)."""

    step_s: float = 0.1  # modelled seconds of one train.batch_size step on the median device
    speed_spread: float = 1.0  # the slowest device's step time over the fastest's
    bandwidth_mbps: float = 0.0  # the median device's link, each way; 0: unlimited
    bandwidth_spread: float = 1.0  # the fastest link's bandwidth over the slowest's
    latency_ms: float = 0.0  # the median device's one-way latency
    latency_spread: float = 1.0  # the longest latency over the shortest
    server_bandwidth_mbps: float = 0.0  # the server's link, shared by every device; 0: unlimited
    edge_bandwidth_mbps: float = 0.0  # federated.groups: an edge's link to its devices, shared by them; 0: unlimited
    cloud_bandwidth_mbps: float = 0.0  # federated.groups: an edge's link to the cloud (the server's); 0: unlimited
    cloud_latency_ms: float = 0.0  # federated.groups: an edge's one-way latency to the cloud


@dataclass
class FederatedConfig:
    """`mode: federated`: a server (rank 0) and `executors` processes hosting `clients` virtual clients."""

    clients: int = 20  # N
    clients_per_round: int = 5  # K, sampled without replacement; every client equally often
    rounds: int = 30  # rounds of training
    local_steps: int = 10  # AdamW steps of a client per round (a fresh optimizer every round)
    executors: int = 2  # processes that train the sampled clients, dealt round-robin
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"] = "fedavg"  # as Flower computes it
    server_lr: float | None = None  # fedadam/fedyogi/fedadagrad: the server's lr; unset: Flower's default
    server_beta1: float | None = None  # the server optimizer's beta1; unset: Flower's default
    server_beta2: float | None = None  # the server optimizer's beta2; unset: Flower's default
    server_tau: float | None = None  # the server optimizer's adaptivity (epsilon); unset: Flower's default
    proximal_mu: float = 0.0  # fedprox: mu / 2 ||w - w_global||^2 in the client loss
    quantize: Literal["fp32", "bf16", "fp8", "int8", "e3m0"] = "fp32"  # the uploaded updates
    deadline_s: float = 0.0  # modelled seconds; an update arriving later is dropped. 0: no deadline
    lora_rank: int = 0  # 0: the whole model trains and travels; r: LoRA adapters of rank r only
    lora_alpha: float | None = None  # unset: 2 x lora_rank
    # Hierarchical (HierFedLoRA): clients in groups, each aggregated at its edge (an executor)
    # `rounds` times per global round and tuning its top `depth` blocks; the cloud (the server)
    # averages each parameter over the groups that tuned it. clients_per_round is dealt over the
    # groups by size at every edge round.
    groups: int = 0  # G; 0: flat (one server, no edges)
    group_by: Literal["mix", "random"] = "mix"  # mix: pooled data close to the global mix; random: the ablation
    group_rounds: int = 0  # edge aggregations per global round for every group; 0: our rule (docs/federated.md)
    group_depth: int = 0  # the top blocks every group tunes; 0: our rule
    group_rounds_max: int = 4  # the rule's most edge aggregations per global round


@dataclass
class Config:
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    wan: WanConfig = field(default_factory=WanConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    ft: FtConfig = field(default_factory=FtConfig)
    mode: Literal["regions", "federated", "split"] = "regions"  # what trains: regions, federated clients, split workers
    seed: int = 0  # the model's initialisation, the data's order, the link model's draws

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    @property
    def shape(self) -> tuple[int, int]:
        """(groups, ranks per group) of the torchrun job: regions x ranks, or the federated or split
        server and executors as groups of one."""
        if self.mode == "federated":
            return 1 + self.federated.executors, 1
        if self.mode == "split":
            return 1 + self.split.executors, 1
        return self.topology.regions, self.topology.ranks_per_region

    @property
    def world_size(self) -> int:
        groups, per_group = self.shape
        return groups * per_group

    @property
    def steps(self) -> int:
        """The training loop's length: inner steps, or federated rounds."""
        return self.federated.rounds if self.mode == "federated" else self.train.steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build a validated `Config` from a YAML file (or the defaults) and `key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not a {type(raw).__name__}")
    config = _build(Config, raw, prefix="")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set(config, key.strip(), _parse_value(text))
    if not config.run.name:
        config.run.name = Path(path).stem if path is not None else "run"
    validate(config)
    return config


def saved_config(raw: dict[str, Any]) -> Config:
    """The `Config` a run saved (its config.yaml), its keys renamed since then taken to their new
    names. Not checked again: it was when the run started, and the files it named may have moved."""
    raw = {section: dict(keys) if isinstance(keys, dict) else keys for section, keys in raw.items()}
    for old, new in MOVED_KEYS.items():
        (section, key), (new_section, new_key) = old.split("."), new.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            value = raw[section].pop(key)
            raw.setdefault(new_section, {}).setdefault(new_key, value)
    return _build(Config, raw, prefix="")


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(_unknown(f"{prefix}{key}"))
    values = {}
    for name in names:
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            section = raw[name] if raw[name] is not None else {}
            if not isinstance(section, dict):
                raise ConfigError(f"config key '{prefix}{name}' must be a section of keys")
            values[name] = _build(hint, section, prefix=f"{prefix}{name}.")
        else:
            values[name] = _coerce(f"{prefix}{name}", raw[name], hint)
    return cls(**values)


def _set(config: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    target: Any = config
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(target) or part not in _field_names(target):
            raise ConfigError(_unknown(dotted))
        if depth < len(parts) - 1:
            target = getattr(target, part)
    leaf = parts[-1]
    hint = typing.get_type_hints(type(target))[leaf]
    if dataclasses.is_dataclass(hint):
        raise ConfigError(f"config key '{dotted}' is a section; set one of its keys, e.g. {dotted}.<key>=...")
    setattr(target, leaf, _coerce(dotted, value, hint))


def tokenizer_file(tokenizer: str) -> Path:
    """The tokenizer.json that data.tokenizer hf:PATH names (PATH itself, or the file in it)."""
    path = Path(tokenizer.removeprefix("hf:")).expanduser()
    return path / "tokenizer.json" if path.is_dir() else path


MOVED_KEYS = {"federated.init_from": "model.init_from"}  # old name: new name


def _unknown(key: str) -> str:
    if key in MOVED_KEYS:
        return f"config key '{key}' is now '{MOVED_KEYS[key]}'"
    return f"unknown config key '{key}'"


def _field_names(obj: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)}


# What a YAML value may be for each field type (YAML reads `1` as int, `1.0` as float).
_ACCEPTED_TYPES: dict[type, tuple[type, ...]] = {
    bool: (bool,),
    int: (int,),
    float: (int, float),
    str: (str, int, float),
}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list; got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(key, v, item) for v in value]
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        for arg in args:
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        names = " or ".join(getattr(a, "__name__", None) if typing.get_origin(a) is None else str(a) for a in args)
        raise ConfigError(f"config key '{key}' expects {names}; got {value!r}")
    accepted = _ACCEPTED_TYPES.get(hint, ())
    if isinstance(value, accepted) and (hint is bool or not isinstance(value, bool)):
        return hint(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-2 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"config key '{key}' expects {hint.__name__}; got {value!r}")


def validate(config: Config) -> None:
    """Range and cross-key checks; raises `ConfigError` naming the first offending key."""
    t, m, tr, s, d, e = config.topology, config.model, config.train, config.sync, config.data, config.eval
    positive = {
        "topology.regions": t.regions,
        "topology.ranks_per_region": t.ranks_per_region,
        "model.n_layers": m.n_layers,
        "model.d_model": m.d_model,
        "model.n_heads": m.n_heads,
        "model.ffn_multiple_of": m.ffn_multiple_of,
        "train.steps": tr.steps,
        "train.batch_size": tr.batch_size,
        "train.seq_len": tr.seq_len,
        "train.log_every": tr.log_every,
        "train.grad_accum": tr.grad_accum,
        "sync.sync_every": s.sync_every,
        "sync.fragments": s.fragments,
        "data.vocab_size": d.vocab_size,
        "eval.batches": e.batches,
        "checkpoint.keep": config.checkpoint.keep,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{key}' must be at least 1; got {value}")
    non_negative = {
        "model.ffn_hidden": m.ffn_hidden,
        "train.warmup_steps": tr.warmup_steps,
        "train.threads": tr.threads,
        "sync.delay": s.delay,
        "eval.every": e.every,
        "checkpoint.every": config.checkpoint.every,
        "train.grad_clip": tr.grad_clip,
        "train.weight_decay": tr.weight_decay,
        "sync.outer_momentum": s.outer_momentum,
        "data.eval_docs": d.eval_docs,
        "train.loss_chunk_tokens": tr.loss_chunk_tokens,
        "data.prefetch": d.prefetch,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must not be negative; got {value}")
    if m.d_model % m.n_heads or (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"model.d_model ({m.d_model}) must split into model.n_heads ({m.n_heads}) heads of even size")
    if m.n_kv_heads < 0 or (m.n_kv_heads and m.n_heads % m.n_kv_heads):
        raise ConfigError(f"model.n_kv_heads ({m.n_kv_heads}) must divide model.n_heads ({m.n_heads}), or be 0")
    if m.init_from and not Path(m.init_from).exists():
        raise ConfigError(f"model.init_from: no such run directory, model directory or file: {m.init_from}")
    if m.hf_config:
        _validate_hf_config(config)
    if m.max_seq_len and m.max_seq_len < tr.seq_len:
        raise ConfigError(f"model.max_seq_len ({m.max_seq_len}) must cover train.seq_len ({tr.seq_len}), or be 0")
    rs = m.rope_scaling
    if rs.factor and not (rs.factor >= 1 and 0 < rs.low_freq_factor < rs.high_freq_factor and rs.original_max_len > 0):
        raise ConfigError(
            "model.rope_scaling needs factor >= 1, 0 < low_freq_factor < high_freq_factor and a positive "
            f"original_max_len; got {dataclasses.asdict(rs)}"
        )
    if t.timeout_s <= 0:
        raise ConfigError(f"config key 'topology.timeout_s' must be positive; got {t.timeout_s}")
    if tr.lr <= 0 or s.outer_lr <= 0:
        raise ConfigError("config keys 'train.lr' and 'sync.outer_lr' must be positive")
    if not 0 <= tr.min_lr_ratio <= 1:
        raise ConfigError(f"config key 'train.min_lr_ratio' must lie in [0, 1]; got {tr.min_lr_ratio}")
    if not (0 <= tr.beta1 < 1 and 0 <= tr.beta2 < 1):
        raise ConfigError("config keys 'train.beta1' and 'train.beta2' must lie in [0, 1)")
    if s.outer_nesterov and s.outer_momentum == 0:
        raise ConfigError("sync.outer_nesterov needs a positive sync.outer_momentum")
    if tr.grad_accum > 1 and config.mode != "regions":
        raise ConfigError(
            f"train.grad_accum ({tr.grad_accum}) is for mode regions; mode {config.mode} steps its clients' own "
            "batches: use a larger train.batch_size"
        )
    if tr.compile and shutil.which(os.environ.get("CC", "cc")) is None:
        raise ConfigError(
            "train.compile needs a C compiler for inductor (none found as $CC or cc): install one "
            "(apt install gcc) or set train.compile=false"
        )
    if tr.kernels == "triton" and importlib.util.find_spec("triton") is None:
        raise ConfigError("train.kernels triton needs triton installed: pip install 'cocodc[kernels]'")
    if tr.kernels == "triton" and tr.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("train.kernels triton on train.device cpu runs in Triton's interpreter: TRITON_INTERPRET=1")
    if s.schedule == "adaptive":
        if s.method not in ("streaming", "cocodc"):
            raise ConfigError(f"sync.schedule adaptive needs sync.method streaming or cocodc; got {s.method}")
        slot_len = s.sync_every // max(s.fragments, 1)
        if slot_len < 2:
            raise ConfigError("sync.schedule adaptive needs slots of 2+ steps: sync.sync_every >= 2 x sync.fragments")
    if not 0 <= s.link_share <= 1:
        raise ConfigError(f"config key 'sync.link_share' must lie in [0, 1]; got {s.link_share}")
    if s.link_share and not (s.schedule == "adaptive" and s.adaptive_delay):
        raise ConfigError("sync.link_share needs sync.schedule adaptive with sync.adaptive_delay (the measured times)")
    if s.max_staleness < 0:
        raise ConfigError(f"config key 'sync.max_staleness' must not be negative; got {s.max_staleness}")
    if 0 < s.max_staleness < s.sync_every:
        raise ConfigError(
            f"config key 'sync.max_staleness' ({s.max_staleness}) must be at least sync.sync_every "
            f"({s.sync_every}), or 0 (2 x sync_every): one fragment a slot syncs each every sync_every steps at best"
        )
    if s.dc_lambda is not None and s.dc_lambda < 0:
        raise ConfigError(f"config key 'sync.dc_lambda' must not be negative; got {s.dc_lambda}")
    if not 0 <= s.dc_beta < 1:
        raise ConfigError(f"config key 'sync.dc_beta' must lie in [0, 1); got {s.dc_beta}")
    if s.alpha is not None and not 0 <= s.alpha <= 1:
        raise ConfigError(f"config key 'sync.alpha' must lie in [0, 1]; got {s.alpha}")
    if not 0 < d.eval_fraction < 0.5:
        raise ConfigError(f"config key 'data.eval_fraction' must lie in (0, 0.5); got {d.eval_fraction}")
    if d.tokenizer not in ("bytes", "bpe") and not d.tokenizer.startswith("hf:"):
        raise ConfigError(f"config key 'data.tokenizer' must be bytes, bpe or hf:PATH; got {d.tokenizer!r}")
    if d.tokenizer.startswith("hf:") and not tokenizer_file(d.tokenizer).is_file():
        raise ConfigError(f"data.tokenizer {d.tokenizer}: no tokenizer.json there")
    if d.dirichlet_alpha <= 0:
        raise ConfigError(f"config key 'data.dirichlet_alpha' must be positive; got {d.dirichlet_alpha}")
    if t.parallel == "fsdp" and (s.method == "ddp" or config.mode != "regions"):
        what = "sync.method ddp" if s.method == "ddp" else f"mode {config.mode}"
        raise ConfigError(
            f"topology.parallel fsdp shards a region for an outer sync (diloco, streaming, cocodc); {what} "
            "runs data-parallel replicas: use topology.parallel ddp"
        )
    if s.method == "diloco" and (s.fragments != 1 or s.delay != 0):
        raise ConfigError(
            "sync.method diloco syncs the whole model without overlap: it needs sync.fragments=1 and "
            f"sync.delay=0 (got {s.fragments} and {s.delay}); use sync.method=streaming for more"
        )
    if s.method != "ddp":
        if s.sync_every % s.fragments:
            raise ConfigError(f"sync.sync_every ({s.sync_every}) must be a multiple of sync.fragments ({s.fragments})")
        if s.delay >= s.sync_every:
            raise ConfigError(f"sync.delay ({s.delay}) must be less than sync.sync_every ({s.sync_every})")
        if s.fragments > m.n_layers and not m.hf_config:
            raise ConfigError(
                f"sync.fragments ({s.fragments}) cannot exceed model.n_layers ({m.n_layers}): "
                "a fragment is a group of blocks"
            )
    _validate_wan(config)
    _validate_ft(config)
    if config.mode == "federated":
        _validate_federated(config)
    if config.mode == "split":
        _validate_split(config)
    if config.mode != "regions" and (tr.device == "cuda" or t.backend == "nccl"):
        # Their servers and executors move tensors between ranks on the CPU (gloo); `auto` picks that.
        key = "train.device cuda" if tr.device == "cuda" else "topology.backend nccl"
        raise ConfigError(
            f"mode {config.mode} runs on CPU over gloo; {key} is for the regions mode (its server and executors "
            "pass every tensor through gloo's CPU point-to-point, and no GPU has run it to check a device path)"
        )
    _validate_devices(config.devices)
    if d.split == "non_iid" and d.source.startswith("hf:"):
        raise ConfigError("data.split non_iid needs a local corpus with domains; hub streams ('hf:') are iid")
    name = config.run.name
    if name and (name in {".", ".."} or "/" in name):
        raise ConfigError(f"config key 'run.name' must be a plain directory name; got {name!r}")


def _validate_wan(config: Config) -> None:
    from cocodc.comm.wan import LinkModel

    w = config.wan
    for key in ("latency_ms", "bandwidth_mbps", "jitter_ms", "loss_pct"):
        value = getattr(w, key)
        values = [v for row in value for v in row] if isinstance(value, list) else [value]
        if any(v < 0 for v in values):
            raise ConfigError(f"config key 'wan.{key}' must not be negative; got {value}")
    if w.loss_pct >= 100:
        raise ConfigError(f"config key 'wan.loss_pct' must be below 100; got {w.loss_pct}")
    if w.enabled and w.emulation == "netem" and config.topology.regions < 2:
        raise ConfigError("wan.emulation=netem needs topology.regions of at least 2")
    if w.loss_pct and w.emulation != "netem":
        raise ConfigError("wan.loss_pct needs wan.emulation=netem: the link model does not model retransmits")
    try:
        LinkModel.build(config.topology.regions, w.latency_ms, w.bandwidth_mbps, w.jitter_ms)
    except ValueError as err:
        raise ConfigError(f"config key {err}") from None


def _validate_ft(config: Config) -> None:
    f = config.ft
    if not f.enabled:
        return
    if config.mode != "regions" or config.sync.method == "ddp":
        raise ConfigError(
            f"ft.enabled needs mode regions with an outer sync (sync.method diloco, streaming or cocodc), "
            f"not mode {config.mode} with sync.method {config.sync.method}"
        )
    if importlib.util.find_spec("torchft") is None:
        raise ConfigError("ft.enabled needs torchft: pip install 'cocodc[ft]'")
    if not 1 <= f.min_regions <= config.topology.regions:
        raise ConfigError(f"config key 'ft.min_regions' must be 1 .. topology.regions; got {f.min_regions}")
    for key in ("heartbeat_timeout_s", "join_timeout_s", "quorum_timeout_s"):
        if getattr(f, key) <= 0:
            raise ConfigError(f"config key 'ft.{key}' must be positive; got {getattr(f, key)}")
    if f.max_restarts < 0:
        raise ConfigError(f"config key 'ft.max_restarts' must not be negative; got {f.max_restarts}")
    if f.lighthouse and not f.lighthouse.startswith("http://"):
        raise ConfigError(f"config key 'ft.lighthouse' must be an address like http://host:29510; got {f.lighthouse}")


def _validate_federated(config: Config) -> None:
    f = config.federated
    at_least_one = {
        "federated.clients": f.clients,
        "federated.clients_per_round": f.clients_per_round,
        "federated.rounds": f.rounds,
        "federated.local_steps": f.local_steps,
        "federated.executors": f.executors,
    }
    for key, value in at_least_one.items():
        if value < 1:
            raise ConfigError(f"config key '{key}' must be at least 1; got {value}")
    if f.clients_per_round > f.clients:
        raise ConfigError(
            f"config key 'federated.clients_per_round' ({f.clients_per_round}) cannot exceed "
            f"federated.clients ({f.clients})"
        )
    non_negative = {
        "federated.proximal_mu": f.proximal_mu,
        "federated.deadline_s": f.deadline_s,
        "federated.lora_rank": f.lora_rank,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must not be negative; got {value}")
    if f.strategy == "fedprox" and f.proximal_mu == 0:
        raise ConfigError("federated.strategy fedprox needs a positive federated.proximal_mu")
    if f.proximal_mu and f.strategy != "fedprox":
        raise ConfigError(f"federated.proximal_mu is fedprox's term; federated.strategy is {f.strategy}")
    server_keys = ("server_lr", "server_beta1", "server_beta2", "server_tau")
    if f.strategy in ("fedavg", "fedprox"):
        given = [k for k in server_keys if getattr(f, k) is not None]
        if given:
            raise ConfigError(f"federated.{given[0]} sets a server optimizer; federated.strategy {f.strategy} has none")
    if f.server_lr is not None and f.server_lr <= 0:
        raise ConfigError(f"config key 'federated.server_lr' must be positive; got {f.server_lr}")
    for key in ("server_beta1", "server_beta2"):
        value = getattr(f, key)
        if value is not None and not 0 <= value < 1:
            raise ConfigError(f"config key 'federated.{key}' must lie in [0, 1); got {value}")
    if f.server_tau is not None and f.server_tau <= 0:
        raise ConfigError(f"config key 'federated.server_tau' must be positive; got {f.server_tau}")
    if f.lora_alpha is not None and not f.lora_rank:
        raise ConfigError("federated.lora_alpha needs a positive federated.lora_rank")
    if f.lora_rank and not config.model.init_from:
        raise ConfigError("federated.lora_rank fine-tunes a trained model: set model.init_from to it")
    if f.groups:
        _validate_groups(config)
    if config.wan.enabled:
        raise ConfigError("the wan section links regions; the federated mode's links are the devices section's")
    if config.data.source.startswith("hf:"):
        raise ConfigError("mode federated deals a local corpus's domains to clients; 'hf:' streams are not supported")


def _validate_groups(config: Config) -> None:
    f, layers = config.federated, config.model.n_layers
    if not 0 < f.groups <= f.clients // 2:
        raise ConfigError(
            f"config key 'federated.groups' must be 0 (flat) or 1 .. federated.clients / 2 ({f.clients // 2}): a "
            f"group's edge averages two clients at least; got {f.groups}"
        )
    if f.clients_per_round < f.groups:
        raise ConfigError(
            f"config key 'federated.clients_per_round' ({f.clients_per_round}) must give each of the "
            f"{f.groups} groups a client per edge round"
        )
    if not 0 <= f.group_depth <= layers:
        raise ConfigError(
            f"config key 'federated.group_depth' must be 0 (the rule) .. model.n_layers ({layers}); got {f.group_depth}"
        )
    if f.group_rounds < 0:
        raise ConfigError(f"config key 'federated.group_rounds' must not be negative; got {f.group_rounds}")
    if f.group_rounds_max < 1:
        raise ConfigError(f"config key 'federated.group_rounds_max' must be at least 1; got {f.group_rounds_max}")


def _validate_devices(devices: DevicesConfig) -> None:
    links = ("bandwidth_mbps", "latency_ms", "server_bandwidth_mbps", "edge_bandwidth_mbps", "cloud_bandwidth_mbps")
    for key in ("step_s", *links, "cloud_latency_ms"):
        if getattr(devices, key) < 0:
            raise ConfigError(f"config key 'devices.{key}' must not be negative; got {getattr(devices, key)}")
    for key in ("speed_spread", "bandwidth_spread", "latency_spread"):
        if getattr(devices, key) < 1:
            raise ConfigError(
                f"config key 'devices.{key}' is a ratio of fastest to slowest, at least 1; got {getattr(devices, key)}"
            )


def _validate_hf_config(config: Config) -> None:
    from cocodc.hf_model import hf_config_file, hf_layer_count

    m, s = config.model, config.sync
    file = hf_config_file(m.hf_config)
    if not file.is_file():
        raise ConfigError(f"model.hf_config: no config.json at {m.hf_config}")
    if config.mode == "split":
        raise ConfigError("model.hf_config: mode split cuts cocodc's own model between blocks; use the model section")
    if config.train.activation_checkpointing == "selective":
        raise ConfigError(
            "train.activation_checkpointing selective is for cocodc's own model; use full with model.hf_config"
        )
    try:
        layers = hf_layer_count(m.hf_config)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.hf_config {file} is not a readable JSON file ({type(err).__name__})") from None
    if layers is not None and s.method != "ddp" and s.fragments > layers:
        raise ConfigError(f"sync.fragments ({s.fragments}) cannot exceed the {layers} layers of model.hf_config {file}")


def _validate_split(config: Config) -> None:
    sp, layers = config.split, config.model.n_layers
    for key in ("workers", "executors", "aggregate_every"):
        if getattr(sp, key) < 1:
            raise ConfigError(f"config key 'split.{key}' must be at least 1; got {getattr(sp, key)}")
    if sp.executors > sp.workers:
        raise ConfigError(f"split.executors ({sp.executors}) cannot exceed split.workers ({sp.workers})")
    if config.model.tie_embeddings and sp.shape != "u":
        raise ConfigError(
            "model.tie_embeddings with split.shape two would put the embedding on the workers and its tied head "
            "on the server: use split.shape u (both on the workers) or untied embeddings"
        )
    if config.federated.lora_rank:
        raise ConfigError(
            "federated.lora_rank is for mode federated: mode split trains every parameter of its parts "
            "(start it from a trained model with model.init_from)"
        )
    if not 1 <= sp.cut < layers:
        raise ConfigError(
            f"config key 'split.cut' must cut the model between two blocks, 1 .. {layers - 1} "
            f"(model.n_layers is {layers}); got {sp.cut}"
        )
    if sp.server_lr is not None and sp.server_lr <= 0:
        raise ConfigError(f"config key 'split.server_lr' must be positive; got {sp.server_lr}")
    if config.wan.enabled:
        raise ConfigError("the wan section links regions; the split mode's links are the devices section's")
    if config.data.source.startswith("hf:"):
        raise ConfigError("mode split deals a local corpus's domains to workers; 'hf:' streams are not supported")
