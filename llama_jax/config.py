"""The frozen model config, built once from the ConfigDict and passed whole to the model."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
CHOICES = {
    "norm": ("rmsnorm", "layernorm"),
    "norm_placement": ("pre", "post"),
    "mlp": ("swiglu", "gelu"),
    "position": ("rope", "learned", "none"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Model hyper-parameters; field names follow the reference LLaMA ModelArgs."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = -1
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float = -1.0
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    init_std: float = 0.02
    attention_impl: str = "auto"
    attn_block_q: int = 512
    attn_block_k: int = 512
    remat_policy: str = "save_linear"
    norm: str = "rmsnorm"
    norm_placement: str = "pre"
    mlp: str = "swiglu"
    position: str = "rope"

    def __post_init__(self):
        if self.n_kv_heads in (-1, 0, None):
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name}={getattr(self, name)!r}; valid: {sorted(DTYPES)}")
        for name, valid in CHOICES.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"model.{name}={getattr(self, name)!r}; valid: {list(valid)}")

    @classmethod
    def from_config(cls, model_cfg) -> ModelConfig:
        """Builds from a ConfigDict (or dict); an unknown field is an error naming it."""
        d = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s): {unknown}; valid: {sorted(known)}")
        return cls(**d)

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


def load_config_file(path: str, overrides=()):
    """Loads configs/<name>.py's get_config() and applies "a.b=value" overrides.

    For tools that do not use absl flags (benchmarks, notebooks); launch.train uses
    ml_collections.config_flags, which behaves the same. An unknown field is an error naming it.
    """
    import importlib.util
    import os
    import sys

    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {path}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:  # so "from configs.base import ..." resolves next to the file
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("_llama_jax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    for item in overrides:
        key, _, value = item.lstrip("-").removeprefix("config.").partition("=")
        set_field(cfg, key, value)
    return cfg


def set_field(cfg, dotted: str, value: str):
    """Sets cfg.<dotted> from a string, parsed to the field's current type."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        if p not in node:
            raise KeyError(f"unknown config field {dotted!r} ({p!r} does not exist)")
        node = node[p]
    if leaf not in node:
        raise KeyError(f"unknown config field {dotted!r}; valid in this group: {sorted(node.keys())}")
    old = node[leaf]
    if isinstance(old, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"config field {dotted!r} needs true/false, got {value!r}")
        node[leaf] = value.lower() in ("true", "1")
    elif isinstance(old, int):
        node[leaf] = int(value)
    elif isinstance(old, float):
        node[leaf] = float(value)
    else:
        node[leaf] = value
