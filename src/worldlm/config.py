"""One run configuration: a TOML file plus dotted overrides, validated before anything runs.

Each component owns a frozen section (`ModelConfig`, `TrainConfig`, ...); `RunConfig` composes
them. Functions receive their own section, never the root config. Every field is documented in
`docs/config.md`; unknown keys, wrong types and impossible values raise `ConfigError` naming
the key.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from worldlm.config_fedbuff import FedBuffConfig as FedBuffConfig
from worldlm.config_fedbuff import SpeedConfig as SpeedConfig
from worldlm.config_leaf_data import LeafDataConfig as LeafDataConfig

# Re-exported: callers build configs from dicts with these (worldlm.config's API).
from worldlm.config_monitor import MonitorConfig as MonitorConfig
from worldlm.config_section import Section as Section
from worldlm.config_toml import apply_overrides as apply_overrides
from worldlm.config_toml import read_toml as read_toml
from worldlm.config_toml import to_toml as to_toml
from worldlm.config_train import TrainConfig as TrainConfig
from worldlm.config_worldlm import WorldLMConfig as WorldLMConfig
from worldlm.presets import PRESETS, preset_names

Method = Literal["hierfavg", "fedavg", "centralized", "local", "fedper", "worldlm"]


class RunSection(Section):
    name: str = Field(
        "default", min_length=1, description="Run name; the run directory is out_dir/name."
    )
    out_dir: str = Field("runs", description="Directory that holds run directories.")
    seed: int = Field(0, ge=0, description="Seed of every random draw in the run.")
    method: Method = Field(
        "hierfavg",
        description="hierfavg, fedavg (flat), local, centralized, fedper (flat, K per leaf) or "
        "worldlm (K per sub-federation).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present.")
    cache_dir: str | None = Field(
        None,
        description="Cache of corpora and tokenizers; default $WORLDLM_CACHE or ~/.cache/worldlm.",
    )
    backend: Literal["inprocess", "ray"] = Field(
        "inprocess",
        description="Where leaves train: inprocess = one after another in this process; ray = "
        "in parallel on Ray actors, one per CPU core (pip install 'worldlm[ray]'). Same results "
        "(with run.leaf_ranks > 1, up to float rounding).",
    )
    ray_address: str | None = Field(
        None,
        description="backend ray: an existing Ray cluster (auto, or host:port); default a local "
        "Ray instance with every core of this machine.",
    )
    leaf_state: Literal["memory", "disk"] = Field(
        "memory",
        description="Where simulated leaves keep their state between their rounds (optimizer "
        "moments, personal and adapted weights): memory, or disk (safetensors files under the "
        "run directory's leaf-state/, or on Ray in each worker's temporary directory, deleted "
        "when the run ends; written after each leaf's round and read before its next), so that "
        "memory holds one leaf's state at a time whatever the number of leaves. The same "
        "results bit for bit.",
    )
    leaf_ranks: int = Field(
        1,
        ge=1,
        description="backend ray: processes (Ray actors, one CPU each) that train each leaf "
        "together, as torchrun's processes train a deployed leaf: each trains its share of "
        "every step's batch (DDP, or FSDP2 with train.shard = 'fsdp'); rank 0 is the leaf. "
        "Needs leaves x leaf_ranks CPUs in the Ray cluster and train.batch_size a multiple of "
        "leaf_ranks x train.grad_accum_steps. The same training up to float rounding. 1: one "
        "process per leaf, several leaves to an actor.",
    )
    plugins: list[str] = Field(
        default_factory=list,
        description="Python modules imported before the config is checked, so that the "
        "strategies, server optimizers, local trainers, data sources and model builders they "
        'register can be named here (e.g. ["mypkg.mystrategy"]); every process of the run '
        "(Ray workers, deployed nodes) imports them too.",
    )


class LoRAConfig(Section):
    enabled: bool = Field(
        False,
        description="Fine-tune low-rank adapters (PEFT LoRA) on a frozen base: only the adapters "
        "are trained, sent, aggregated and checkpointed; the base is loaded once per node.",
    )
    r: int = Field(8, ge=1, le=1024, description="Rank of each adapter.")
    alpha: int = Field(16, ge=1, description="Scale: the update is (alpha / r) B A.")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on each adapter's input (seeded per session)."
    )
    target_modules: list[str] = Field(
        ["all-linear"],
        min_length=1,
        description='Layers that get adapters: ["all-linear"] = every linear layer of the '
        "transformer blocks (on Llama the q, k, v, o, gate, up and down projections), or "
        'module names such as ["q_proj", "v_proj"].',
    )


class ModelConfig(Section):
    preset: str | None = Field(
        None,
        description=f"Random-init size preset ({', '.join(PRESETS)}), or a model builder a "
        "plugin registers (worldlm.register_model_builder); default small.",
    )
    path: str | None = Field(
        None,
        description="A local Hugging Face model directory (or one holding gguf_file), or a hub "
        'id such as "HuggingFaceTB/SmolLM2-135M" read offline from the Hugging Face cache '
        "(HF_HUB_CACHE); a local path that exists wins over a hub id.",
    )
    gguf_file: str | None = Field(
        None,
        description="A GGUF file inside model.path, loaded (with its tokenizer) through "
        "transformers and cached dequantized as safetensors under run.cache_dir/models.",
    )
    block_size: int = Field(128, gt=1, le=8192, description="Tokens per training block.")
    load_in: Literal["full", "8bit", "4bit"] = Field(
        "full",
        description="Base weights in full precision, or quantized to 8/4 bits by bitsandbytes "
        "(CUDA only; needs model.path and lora.enabled).",
    )
    lora: LoRAConfig = Field(
        default_factory=LoRAConfig, description="LoRA fine-tuning of a pretrained model."
    )

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        names = preset_names()
        if value is not None and value not in names:
            raise ValueError(f"unknown preset {value!r}; choose one of {', '.join(names)}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("path") is not None and data.get("preset") is not None:
            raise ValueError("set either model.preset or model.path, not both")
        if data.get("path") is None and data.get("preset") is None:
            return {**data, "preset": "small"}
        return data

    @model_validator(mode="after")
    def _pretrained_only(self) -> ModelConfig:
        if self.gguf_file is not None and self.path is None:
            raise ValueError("model.gguf_file names a file inside model.path; set model.path")
        if self.lora.enabled and self.path is None:
            raise ValueError(
                "model.lora fine-tunes a pretrained model: set model.path (a random-init preset "
                "has no base on disk to load the adapters on)"
            )
        if self.load_in != "full" and (self.path is None or not self.lora.enabled):
            raise ValueError(
                f"model.load_in = {self.load_in!r} quantizes a pretrained base for LoRA; "
                "set model.path and model.lora.enabled = true, or use load_in = 'full'"
            )
        return self


class TokenizerConfig(Section):
    vocab_size: int = Field(4096, ge=300, le=262144, description="BPE vocabulary when trained.")
    path: str | None = Field(
        None, description="tokenizer.json or a model directory; default: train, or the model's own."
    )


class DataConfig(Section):
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of chunks held out.")
    max_chars: int = Field(
        2_000_000, ge=0, description="Characters read per leaf at most; 0 = all."
    )
    chunk_chars: int = Field(
        2000, ge=100, description="Documents are cut to this before splitting."
    )
    text_field: str = Field("text", min_length=1, description="JSONL/parquet field holding text.")
    root: str = Field(
        "", description="Where relative leaf paths are read from; default: the config's directory."
    )


class EvalConfig(Section):
    every: int = Field(1, ge=1, description="Evaluate every N root rounds (and always at the end).")
    max_blocks: int = Field(64, ge=0, description="Validation blocks per leaf at most; 0 = all.")
    batch_size: int = Field(16, ge=1, description="Blocks per evaluation forward pass.")
    global_model: bool = Field(
        True,
        description=(
            "Also evaluate the global model on every leaf (eval_global rows); for methods that "
            "personalize (worldlm, fedper, local) this costs a second evaluation."
        ),
    )


class StopConfig(Section):
    rounds: int = Field(5, ge=1, description="Root rounds at most (also the schedule's horizon).")
    target_ppl: float | None = Field(None, gt=1.0, description="Stop when mean val ppl is below.")
    max_tokens: int | None = Field(None, ge=1, description="Stop after this many trained tokens.")
    max_seconds: float | None = Field(None, gt=0.0, description="Stop after this wall time.")


class CheckpointConfig(Section):
    every: int = Field(1, ge=1, description="Write a checkpoint every N root rounds.")
    keep: int = Field(2, ge=1, description="How many recent checkpoints to keep.")


class SampleConfig(Section):
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="Share of children sampled per round.")
    min: int = Field(1, ge=1, description="Children sampled per round at least.")
    weighting: Literal["uniform", "data_size"] = Field(
        "uniform", description="Sample uniformly, or with probability by training tokens."
    )
    skip_unavailable: bool = Field(
        True, description="Leave out children that reported themselves unavailable on attaching."
    )
    min_memory_gb: float = Field(
        0.0, ge=0.0, description="Leave out children that reported less memory (GB) than this."
    )
    straggler_misses: int = Field(
        0,
        ge=0,
        description="Bench a child after this many selected rounds in a row without a valid "
        "reply (0: never).",
    )
    straggler_cooldown: int = Field(
        5, ge=1, description="Rounds a benched straggler sits out before it is tried again."
    )


class RobustConfig(Section):
    byzantine: int = Field(
        0,
        ge=0,
        description="f, the children per round that may be Byzantine: what krum, multi_krum "
        "and bulyan defend against (krum and multi_krum need n > 2f + 2, bulyan n >= 4f + 3).",
    )
    trim_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=0.5,
        description="trimmed_mean: share of the replies dropped at each end, per coordinate.",
    )
    multi_krum_keep: int | None = Field(
        None, ge=1, description="multi_krum: replies averaged (m); default n - f."
    )
    norm_bound: float | None = Field(
        None,
        gt=0.0,
        description="Scale each child's change (its reply minus the model it was sent) down to "
        "this L2 norm before any rule combines it; none by default.",
    )


class DPConfig(Section):
    enabled: bool = Field(
        False,
        description="User-level DP at this aggregator (DP-FedAvg): clip each child's change, "
        "add Gaussian noise to the sum once, account the privacy spent.",
    )
    clip: float = Field(1.0, gt=0.0, description="C: L2 bound of each child's change (start).")
    noise_multiplier: float = Field(
        1.0, ge=0.0, description="z: the noise's standard deviation is z * C on the sum."
    )
    adaptive_clip: bool = Field(
        False, description="Move C toward a quantile of the changes' norms (Andrew et al. 2021)."
    )
    target_quantile: float = Field(
        0.5, gt=0.0, lt=1.0, description="Adaptive clipping: share of changes left unclipped."
    )
    clip_learning_rate: float = Field(
        0.2, gt=0.0, description="Adaptive clipping: step of the geometric update of C."
    )
    clip_count_stddev: float | None = Field(
        None,
        ge=0.0,
        description="Adaptive clipping: noise on the count of unclipped changes; default "
        "expected children / 20, as Andrew et al. suggest.",
    )
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="δ at which ε is reported.")
    epsilon_budget: float | None = Field(
        None,
        gt=0.0,
        description="Stop the run before a round would take this federation's ε above it.",
    )
    seeded_noise: bool = Field(
        False,
        description="Draw the noise, and the sample of children, from the run seed "
        "(reproducible runs and bit-exact resume: simulation only) instead of the OS's secure "
        "randomness: anyone who knows the seed can subtract seeded noise and predict the "
        "sample, so it protects nothing against them.",
    )
    local_noise_multiplier: float = Field(
        0.0,
        ge=0.0,
        description="Leaves only: local DP. The leaf clips its own change to dp.clip and adds "
        "N(0, (z_local * C)^2) per value before sending it, so its parent sees only the noisy "
        "change; ε at dp.delta is reported each round (a `privacy` row with local = true). "
        "0 = off.",
    )


class SecAggConfig(Section):
    enabled: bool = Field(
        False,
        description="Secure aggregation among this aggregator's children: it learns only "
        "the sum of their weighted changes (Bonawitz et al. 2017, SecAgg+ of Bell et al. "
        "2020). Needs strategy fedavg without norm_bound and at least 3 children per round.",
    )
    neighbours: int = Field(
        0,
        ge=0,
        description="SecAgg+: pairwise masks with this many neighbours per child (about "
        "log n is enough); 0 = every other child (the original protocol).",
    )
    threshold: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Share of a child's neighbours needed to rebuild its secrets; fewer "
        "survivors abort the round.",
    )
    bits: int = Field(
        32, ge=8, le=62, description="Fixed-point width of each masked value (the field size)."
    )
    clip_range: float = Field(
        1.0,
        gt=0.0,
        description="Bound on each coordinate of a child's change to the model in one round: "
        "larger ones are clipped to it (counted, in total, as secagg_clipped). The weighted "
        "value masked stays within it, so quantization never saturates; its step is "
        "2 clip_range / floor((2^bits - 1) / children).",
    )


class LinkConfig(Section):
    up: Literal["none", "bf16", "fp16", "int8", "topk"] = Field(
        "none",
        description="Compression of this node's replies to its parent: its change to the model "
        "it was sent, cast to bf16 or fp16, quantized to int8 per row, or its top-k entries "
        "(see docs/compression.md); none = the model itself, as without compression.",
    )
    down: Literal["none", "bf16", "fp16", "int8"] = Field(
        "none",
        description="Compression of the weights the parent sends this node: cast to bf16 or "
        "fp16, or quantized to int8 per row.",
    )
    topk_fraction: float = Field(
        0.1,
        gt=0.0,
        le=1.0,
        description="up = topk: share of each tensor's entries sent (the largest in magnitude).",
    )
    error_feedback: bool = Field(
        True,
        description="Lossy uplinks: keep what compression left out and add it to the next "
        "reply (error feedback), so that nothing is lost for good; saved in checkpoints.",
    )


ServerOptimizerName = Literal["fedavg", "fedavgm", "nesterov", "fedadam", "fedyogi", "fedadagrad"]


class ServerOptimizerConfig(Section):
    """The optimizer an aggregator applies to its round's pseudo-gradient (the model it sent
    minus the aggregate): FedOpt (Reddi et al. 2021), FedAvgM (Hsu et al. 2019), and DiLoCo's
    outer Nesterov step (Douillard et al. 2023)."""

    name: str = Field(
        "fedavg",
        min_length=1,
        description="fedavg (the aggregate itself at lr 1; a server learning rate otherwise), "
        "fedavgm (heavy-ball momentum), nesterov (DiLoCo's outer optimizer: lr 0.7, momentum "
        "0.9), fedadam, fedyogi or fedadagrad (adaptive, Reddi et al. 2021), or one a plugin "
        "registers (worldlm.register_server_optimizer).",
    )
    lr: float | None = Field(
        None,
        gt=0.0,
        description="Server learning rate; default 0.7 for nesterov, 0.01 for the adaptive "
        "ones, 1.0 for the others (fedavg, fedavgm, a plugin's).",
    )
    momentum: float = Field(
        0.9, ge=0.0, lt=1.0, description="fedavgm and nesterov: momentum of the update."
    )
    beta1: float = Field(
        0.9, ge=0.0, lt=1.0, description="Adaptive ones: decay of the first moment."
    )
    beta2: float = Field(
        0.99, ge=0.0, lt=1.0, description="fedadam and fedyogi: decay of the second moment."
    )
    tau: float = Field(
        1e-3,
        gt=0.0,
        description="Adaptive ones: the adaptivity floor added to sqrt(v) (and v's start, tau^2).",
    )
    key_layers: bool = Field(
        False,
        description="WorldLM: also step on the key layers' attention update at aggregators "
        "that personalize them; by default the optimizer steps on the backbone only.",
    )

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        adaptive = ("fedadam", "fedyogi", "fedadagrad")
        return 0.7 if self.name == "nesterov" else 0.01 if self.name in adaptive else 1.0


class NodeSettings(Section):
    """What every node of the tree has, aggregator or leaf."""

    dp: DPConfig = Field(default_factory=DPConfig, description="Differential privacy here.")
    link: LinkConfig = Field(
        default_factory=LinkConfig,
        description="Compression of the link between this node and its parent (not the root).",
    )
    slowdown: float = Field(
        1.0,
        gt=0.0,
        description="Simulation under a FedBuff parent: this node's simulated training "
        "durations are multiplied by this (10 = a straggler ten times slower); ignored under "
        "synchronous parents and on a FedBuff parent's real clock (fedbuff.clock = 'real').",
    )


class AggregatorConfig(NodeSettings):
    """A node with children: the root or a sub-federation."""

    strategy: str = Field(
        "fedavg",
        description="Aggregation rule of an aggregator: fedavg, none, a Byzantine-robust "
        "rule (median, trimmed_mean, krum, multi_krum, bulyan; see robust), or fedbuff "
        "(buffered asynchronous steps on a simulated or a real clock; see fedbuff and "
        "docs/fedbuff.md).",
    )
    inner_rounds: int = Field(1, ge=1, description="Rounds over its children per parent round.")
    sample: SampleConfig = Field(
        default_factory=SampleConfig, description="How children are sampled each round."
    )
    min_replies: int = Field(
        1,
        ge=1,
        description="Valid replies a round needs; with fewer, the round changes nothing "
        "and is recorded as skipped.",
    )
    sum_dtype: Literal["float64", "float32"] = Field(
        "float32",
        description="Precision of FedAvg's running sum of replies, folded in path order on "
        "every transport (in process, Ray and gRPC give the same bits either way). float32: "
        "1 model copy and a sum at memory speed; a hierarchy equals flat FedAvg up to float32 "
        "rounding. float64: 2 model copies at about half the speed; an inner aggregator "
        "forwards its exact sum (twice the bytes up), so a hierarchy with one inner round "
        "equals flat FedAvg bit for bit.",
    )
    # Honest replies move the model by well under its norm (0.01x to 0.25x in the study's runs,
    # docs/study.md; the first round from random initialization the largest): 10x leaves them
    # forty-fold room and refuses a model-replacement reply scaled to outweigh the others.
    max_change: float = Field(
        10.0,
        gt=0.0,
        description="Refuse a reply whose distance from the model it was sent is above this "
        "many times that model's norm (a blown-up or hostile update).",
    )
    robust: RobustConfig = Field(
        default_factory=RobustConfig, description="Settings of the robust aggregation rules."
    )
    secure_aggregation: SecAggConfig = Field(
        default_factory=SecAggConfig, description="Secure aggregation of this node's children."
    )
    server_optimizer: ServerOptimizerConfig = Field(
        default_factory=ServerOptimizerConfig,
        description="An aggregator's optimizer on its round's pseudo-gradient (after robust "
        "rules and DP noise).",
    )
    fedbuff: FedBuffConfig = Field(
        default_factory=FedBuffConfig,
        description="strategy = 'fedbuff': buffer size, concurrency, staleness weighting and "
        "the clock (simulated, or real when deployed).",
    )


class LeafConfig(NodeSettings):
    """A node without children: a data owner that trains on its own text."""

    data: LeafDataConfig | None = Field(
        None,
        description="Its own data (exactly one of paths, corpus, dataset or hub); every leaf "
        "needs it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_aggregator_settings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        others = set(AggregatorConfig.model_fields) - set(cls.model_fields)
        # Configs written before the split carry some aggregator settings on every leaf, at
        # their defaults: those are dropped, so old run directories still load.
        defaults = _aggregator_defaults()
        data = {k: v for k, v in data.items() if k not in others or v != defaults[k]}
        extra = sorted(set(data) & others)
        if extra:
            raise PydanticCustomError(
                "aggregator_only",
                "only aggregators have this setting (a node table with data is a leaf's: "
                "remove data if this node has children)",
                {"key": extra[0]},
            )
        return data


@functools.cache
def _aggregator_defaults() -> dict[str, Any]:
    return AggregatorConfig().model_dump(mode="json", exclude_none=True)


def _node_kind(value: Any) -> str:
    """A node table with `data` is a leaf's; the tree then checks that leaves and nodes
    without children are the same (a leaf without data is reported there, by path)."""
    if isinstance(value, dict):
        return "leaf" if "data" in value else "aggregator"
    return "leaf" if isinstance(value, LeafConfig) else "aggregator"


# One node table: an aggregator's settings or a leaf's, told apart by `data`.
NodeConfig = Annotated[
    Annotated[AggregatorConfig, Tag("aggregator")] | Annotated[LeafConfig, Tag("leaf")],
    Discriminator(_node_kind),
]


class RunConfig(Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    stop: StopConfig = Field(default_factory=StopConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    worldlm: WorldLMConfig = Field(default_factory=WorldLMConfig)
    nodes: dict[str, NodeConfig] = Field(description="The federation tree, keyed by node path.")


DEFAULT_CONFIG = "default.toml"


def default_config_text() -> str:
    """The embedded default config that `worldlm run` uses with no arguments."""
    return resources.files("worldlm.configs").joinpath(DEFAULT_CONFIG).read_text("utf-8")


def dump_config(config: RunConfig) -> str:
    """The resolved config as TOML text (written into the run directory)."""
    return to_toml(config.model_dump(mode="json", exclude_none=True))
