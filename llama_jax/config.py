"""The typed run config: one frozen dataclass per group, built once at the entry point.

configs/<name>.py files return an ml_collections ConfigDict (configs/base.py is the schema
users read, one comment per field). `load(path, overrides)` reads the file with
ml_collections' config_flags, turns it into a `RunConfig` validated field by field, and applies
`group.field=value` overrides parsed to each field's type; below the entry points every
function takes a RunConfig (or one of its groups, or plain arguments), never a ConfigDict.
This is the only library module that imports ml_collections. What each field may hold (its
type, named choices, numeric range) and the checks are llama_jax/config_fields.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from llama_jax.config_fields import (
    DTYPES,
    LORA_TARGETS,
    MESH_CHOICES,
    MODEL_CHOICES,
    ON_CORRUPT,
    TYPES,
    ConfigError,
    Group,
    UnknownFieldError,
    check_choices,
)


@dataclasses.dataclass(frozen=True)
class ModelConfig(Group):
    """Model hyper-parameters; field names follow the reference LLaMA ModelArgs."""

    GROUP = "model"
    RANGES = {
        "dim": ">= 1", "n_layers": ">= 1", "n_heads": ">= 1", "n_kv_heads": "-1 or >= 1",
        "vocab_size": ">= 1", "multiple_of": ">= 1", "ffn_dim_multiplier": "-1 or > 0",
        "norm_eps": "> 0", "rope_theta": "> 0", "max_seq_len": ">= 1", "init_std": "> 0",
        "attn_block_q": ">= 1", "attn_block_k": ">= 1", "lora_rank": ">= 0", "lora_alpha": "> 0",
    }  # fmt: skip
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = -1
    vocab_size: int = 32000
    tie_word_embeddings: bool = False
    multiple_of: int = 256
    ffn_dim_multiplier: float = -1.0
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    residual_dtype: str = "float32"
    init_std: float = 0.02
    attention_impl: str = "auto"
    attn_block_q: int = 512
    attn_block_k: int = 512
    remat_policy: str = "save_linear"
    norm: str = "rmsnorm"
    norm_placement: str = "pre"
    mlp: str = "swiglu"
    position: str = "rope"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "q,v"

    def __post_init__(self):
        super().__post_init__()
        bad = sorted(set(self.lora_targets.split(",")) - set(LORA_TARGETS))
        if bad or not self.lora_targets:
            raise ConfigError(
                f"model.lora_targets={self.lora_targets!r}: unknown {bad}; a comma-separated "
                f"subset of {list(LORA_TARGETS)}"
            )
        if self.dim % self.n_heads:
            raise ConfigError(
                f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}"
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not a multiple of "
                f"model.n_kv_heads={self.n_kv_heads} (-1 = n_heads)"
            )
        check_choices("model", self, MODEL_CHOICES)

    @property
    def kv_heads(self) -> int:
        """Key/value heads K: n_kv_heads, or n_heads when that is -1 (multi-head attention).
        The field keeps the -1, so overriding n_heads alone keeps a config multi-head."""
        return self.n_heads if self.n_kv_heads == -1 else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width, exactly as the reference LLaMA FeedForward computes it."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier not in (-1, -1.0, None):
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def mlp_dim(self) -> int:
        """Hidden width of the MLP in use: GELU gets 1.5x SwiGLU's so parameter counts match."""
        return self.hidden_dim if self.mlp == "swiglu" else (3 * self.hidden_dim) // 2

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def residual(self):
        """dtype of the residual stream between sublayers (the scan carry)."""
        return DTYPES[self.residual_dtype]


@dataclasses.dataclass(frozen=True)
class TrainConfig(Group):
    """The optimization run: steps, batch, optimizer, schedule, logging cadence."""

    GROUP = "train"
    RANGES = {
        "steps": ">= 1", "batch_size": ">= 1", "seq_len": ">= 1", "seed": "any",
        "data_seed": ">= -1", "lr": "> 0", "warmup_steps": ">= 0", "min_lr_ratio": "in [0, 1]",
        "b1": "in [0, 1)", "b2": "in [0, 1)", "eps": "> 0", "weight_decay": ">= 0",
        "clip_norm": "> 0", "grad_accum_steps": ">= 1", "log_every": ">= 1",
        "eval_every": ">= 0", "eval_batches": ">= 0", "samples": ">= 0", "sample_tokens": ">= 1",
        "step_timeout_s": ">= 0",
    }  # fmt: skip
    steps: int = 250_000
    batch_size: int = 2048
    seq_len: int = 2048
    seed: int = 0
    data_seed: int = -1
    lr: float = 3e-4
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    grad_accum_steps: int = 1
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 8
    skip_nonfinite: bool = False
    profile_steps: str = ""
    samples: int = 3
    sample_tokens: int = 64
    step_timeout_s: float = 0.0
    init_from: str = ""

    def __post_init__(self):
        super().__post_init__()
        if self.init_from and self.init_from.partition(":")[0] not in ("hf", "meta", "ours"):
            raise ConfigError(
                f"train.init_from={self.init_from!r}: expected '' (random init), hf:DIR, "
                "meta:DIR or ours:DIR"
            )
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by "
                f"train.grad_accum_steps={self.grad_accum_steps}"
            )
        self.profile_range  # noqa: B018 - parses (and so validates) profile_steps

    @property
    def data_order_seed(self) -> int:
        """Seed of the data order: data_seed, or seed when data_seed is -1."""
        return self.seed if self.data_seed < 0 else self.data_seed

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def microbatch_size(self) -> int:
        return self.batch_size // self.grad_accum_steps

    @property
    def profile_range(self) -> tuple[int, int] | None:
        """profile_steps "a,b" (or "a") as (a, b); None when empty."""
        if not self.profile_steps:
            return None
        a, _, b = self.profile_steps.partition(",")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            lo, hi = -1, -1
        if not 0 <= lo <= hi:
            raise ConfigError(
                f"train.profile_steps={self.profile_steps!r}: want 'a,b' with 0 <= a <= b"
            )
        return lo, hi


@dataclasses.dataclass(frozen=True)
class MeshConfig(Group):
    """Device mesh sizes (one of them may be -1: all devices left over) and how the sequence
    is split: over `context` for the whole model, and with sequence_parallel also over
    `tensor` between the tensor-parallel blocks (parallel/sharding.py, parallel/context.py)."""

    GROUP = "mesh"
    RANGES = {
        "data": "-1 or >= 1", "fsdp": "-1 or >= 1", "tensor": "-1 or >= 1",
        "context": "-1 or >= 1",
    }  # fmt: skip
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    context: int = 1
    context_strategy: str = "all_gather"
    sequence_parallel: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_choices("mesh", self, MESH_CHOICES)
        if self.sequence_parallel and self.tensor == 1:
            raise ConfigError(
                "mesh.sequence_parallel=True splits activations over the tensor axis: "
                "it needs mesh.tensor > 1 (or -1)"
            )

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        """(data, fsdp, tensor, context), the argument order of sharding.make_mesh."""
        return self.data, self.fsdp, self.tensor, self.context


@dataclasses.dataclass(frozen=True)
class DataConfig(Group):
    GROUP = "data"
    RANGES = {"prefetch": ">= 0"}
    path: str = ""
    tokenizer: str = ""
    prefetch: int = 2
    allow_dataset_change: bool = False
    document_masking: bool = False
    mixture: str = ""

    def __post_init__(self):
        super().__post_init__()
        if self.mixture and self.path:
            raise ConfigError("set data.path or data.mixture, not both")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Group):
    GROUP = "checkpoint"
    RANGES = {"every_steps": ">= 0", "keep": ">= 1", "keep_period": ">= 0"}
    every_steps: int = 1000
    keep: int = 3
    keep_period: int = 0
    async_save: bool = True
    allow_restart: bool = False
    strict_resume: bool = False
    on_corrupt: str = "fallback"

    def __post_init__(self):
        super().__post_init__()
        check_choices("checkpoint", self, {"on_corrupt": ("corrupt-checkpoint action", ON_CORRUPT)})


@dataclasses.dataclass(frozen=True)
class DistributedConfig(Group):
    GROUP = "distributed"
    RANGES = {"num_processes": ">= 0", "process_id": ">= -1", "peer_timeout_s": ">= 0"}
    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1
    peer_timeout_s: float = 30.0


# Group name -> class; the groups later features add (fine-tuning, data mixtures, fault
# tolerance) go here and into RunConfig.
GROUPS: dict[str, type[Group]] = {
    "model": ModelConfig,
    "train": TrainConfig,
    "mesh": MeshConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "distributed": DistributedConfig,
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, one frozen group per concern (see configs/base.py)."""

    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    # "group.field" of every field set by replace() (the command line's overrides): what the
    # user asked for by name, e.g. a model shape field train.init_from's weights must match.
    given: frozenset[str] = dataclasses.field(default=frozenset(), compare=False)

    def __post_init__(self):
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} exceeds "
                f"model.max_seq_len={self.model.max_seq_len}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Mapping[str, Any]]) -> RunConfig:
        """From a nested dict or ConfigDict (a config file, or one saved in a checkpoint)."""
        d = d.to_dict() if hasattr(d, "to_dict") else d
        unknown = sorted(set(d) - set(GROUPS))
        if unknown:
            raise UnknownFieldError(f"unknown config group(s): {unknown}; valid: {sorted(GROUPS)}")
        return cls(**{name: GROUPS[name].from_dict(d[name]) for name in d})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in GROUPS}

    def flat(self) -> dict[str, Any]:
        """{"group.field": value} for every field."""
        return {f"{g}.{k}": v for g, fields in self.to_dict().items() for k, v in fields.items()}

    def diff(self, other: RunConfig) -> dict[str, tuple[Any, Any]]:
        """{field: (value here, value in other)} for every field that differs."""
        a, b = self.flat(), other.flat()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    def replace(self, changes: Mapping[str, Any] | Iterable[str]) -> RunConfig:
        """A copy with changes applied: {"group.field": value} or ["group.field=value", ...];
        string values are parsed to the field's type."""
        if not isinstance(changes, Mapping):
            changes = dict(_split_override(item) for item in changes)
        d, given = self.to_dict(), set(self.given)
        for key, value in changes.items():
            group, field = _resolve_field(key)
            if isinstance(value, str) and _field(group, field).type != "str":
                value = parse_value(key, value)
            d[group][field] = value
            given.add(f"{group}.{field}")
        return dataclasses.replace(RunConfig.from_dict(d), given=frozenset(given))


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.removeprefix("--").removeprefix("config.").partition("=")
    if not sep:
        raise ConfigError(f"config override {item!r}: expected group.field=value")
    return key, value


def parse_override(item: str) -> tuple[str, Any]:
    """ "group.field=value" -> ("group.field", value parsed to the field's type)."""
    key, value = _split_override(item)
    return key, value if _field(*_resolve_field(key)).type == "str" else parse_value(key, value)


def _field(group: str, name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(GROUPS[group])}[name]


def _resolve_field(key: str) -> tuple[str, str]:
    """ "group.field" -> (group, field); an unknown one is an error listing the valid names."""
    group, _, field = key.partition(".")
    if group not in GROUPS:
        raise UnknownFieldError(f"unknown config field {key!r}; valid groups: {sorted(GROUPS)}")
    names = sorted(f.name for f in dataclasses.fields(GROUPS[group]))
    if field not in names:
        raise UnknownFieldError(f"unknown config field {key!r}; valid in {group}: {names}")
    return group, field


def parse_value(key: str, text: str):
    """A command-line string parsed to the type of field "group.field"."""
    group, field = _resolve_field(key)
    kind = _field(group, field).type
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"want true/false, got {text!r}")
            return text.lower() in ("true", "1")
        return TYPES[kind](text)
    except ValueError as e:
        raise ConfigError(f"config field {key}: {e}") from None


def load(path: str, overrides: Mapping[str, Any] | Iterable[str] = ()) -> RunConfig:
    """configs/<name>.py's get_config() as a RunConfig, with overrides applied
    ({"group.field": value} or ["group.field=value", ...], optionally prefixed "--config.").

    A missing file, an unknown field or a bad value is a ConfigError naming it.
    """
    return load_file(path).replace(overrides)


def load_file(path: str) -> RunConfig:
    """The config file as a RunConfig; read by ml_collections' config_flags, so a
    "file.py:arg" config string works as with absl."""
    from absl import flags
    from ml_collections import config_flags

    path = os.path.abspath(path.split(":")[0]) + (
        ":" + path.split(":", 1)[1] if ":" in path else ""
    )
    if not os.path.isfile(path.split(":")[0]):
        raise ConfigError(f"config file not found: {path}")
    root = os.path.dirname(os.path.dirname(path.split(":")[0]))
    if root not in sys.path:  # so "from configs.base import ..." resolves next to the file
        sys.path.insert(0, root)
    argv = ["llama_jax", f"--config={path}"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
    try:
        fv(argv)
        cd = fv["config"].value
    except Exception as e:  # noqa: BLE001 - whatever the file's get_config() raised
        cause = e.__cause__ or e
        raise ConfigError(f"config file {path}: {type(cause).__name__}: {cause}") from e
    return RunConfig.from_dict(cd)
