"""What a config field may hold, checked where a group is built: the dtype table and the
named choices of choice-valued fields, the allowed range of every numeric field, the type
check of each value, the errors that name a bad field, and the base class of the groups that
applies them (the groups themselves, RunConfig and loading are llama_jax/config.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

LORA_TARGETS = ("q", "k", "v", "o", "w1", "w2", "w3")  # lora.TARGETS: the weights LoRA adapts
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Choice-valued fields of each group -> the valid names. The tables that implement them check at
# import that they implement exactly these (model/attention.py, model/remat.py), so the schema
# names its choices without importing the kernels.
ATTENTION_IMPLS = ("blockwise", "cudnn", "reference", "auto")
REMAT_POLICIES = ("none", "full", "save_linear", "save_qkv_attn", "offload_linear")
# What a run does with a checkpoint that cannot be restored (checkpoint.Checkpointer
# .restore_newest): move it aside and continue from the newest older one, or stop.
ON_CORRUPT = ("fallback", "fail")
# field -> (what it names, valid names)
MODEL_CHOICES = {
    "dtype": ("dtype", tuple(DTYPES)),
    "param_dtype": ("dtype", tuple(DTYPES)),
    "residual_dtype": ("dtype", tuple(DTYPES)),
    "attention_impl": ("attention impl", ATTENTION_IMPLS),
    "remat_policy": ("remat policy", REMAT_POLICIES),
    # The ablation switches (model/llama.py branches on them).
    "norm": ("norm", ("rmsnorm", "layernorm")),
    "norm_placement": ("norm placement", ("pre", "post")),
    "mlp": ("mlp", ("swiglu", "gelu")),
    "position": ("position", ("rope", "learned", "none")),
}


def dtype_of(dtype):
    """A jnp dtype from a DTYPES name (or a dtype, returned as is); None stays None."""
    if dtype is None or not isinstance(dtype, str):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype) -> str:
    """The DTYPES name of a dtype (a jnp/np dtype, a type, or a name)."""
    for name, dt in DTYPES.items():
        if jnp.dtype(dt) == jnp.dtype(dtype):
            return name
    raise ValueError(f"dtype {dtype} has no name in config.DTYPES {sorted(DTYPES)}")


class ConfigError(ValueError):
    """A config field that holds a bad value, or does not exist; the message names it."""

    def __str__(self) -> str:  # plain, also for UnknownFieldError (KeyError would quote it)
        return str(self.args[0]) if self.args else ""


class UnknownFieldError(ConfigError, KeyError):
    """A config field or group that does not exist (a KeyError too, as for a dict)."""


TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _checked(group: str, f: dataclasses.Field, value):
    """value, type-checked against the field's annotation (an int is accepted as a float)."""
    want = TYPES[f.type]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{group}.{f.name}={value!r} is a {type(value).__name__}; want {f.type}")
    return value


MESH_CHOICES = {"context_strategy": ("context strategy", ("all_gather", "ring"))}


def check_choices(group: str, obj, choices: Mapping[str, tuple]) -> None:
    for name, (what, valid) in choices.items():
        if getattr(obj, name) not in valid:
            raise ConfigError(
                f"unknown {what}: {group}.{name}={getattr(obj, name)!r}; valid: {list(valid)}"
            )


# The allowed range of a numeric field, by name; every numeric field of every group has one
# (tests/test_config.py checks), so a bad value is refused when the config is built, not found
# out as a ZeroDivisionError, a negative learning rate or a run that trains nothing.
RULES = {
    "any": lambda v: True,
    ">= 1": lambda v: v >= 1,
    ">= 0": lambda v: v >= 0,
    "> 0": lambda v: v > 0,
    ">= -1": lambda v: v >= -1,
    "-1 or >= 1": lambda v: v == -1 or v >= 1,
    "-1 or > 0": lambda v: v == -1 or v > 0,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
}


class Group:
    """Shared construction and checks of the config groups: from a dict, strictly; every
    numeric field within its RANGES rule."""

    GROUP = ""
    RANGES: dict[str, str] = {}

    def __post_init__(self):
        for name, rule in self.RANGES.items():
            value = getattr(self, name)
            if not RULES[rule](value):
                raise ConfigError(f"{self.GROUP}.{name}={value!r}: must be {rule}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Builds from a dict (or ConfigDict); an unknown field is an error naming it and the
        valid ones; a missing field takes its default (configs saved by older versions)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise UnknownFieldError(
                f"unknown {cls.GROUP} config field(s): {unknown}; valid: {sorted(fields)}"
            )
        return cls(**{k: _checked(cls.GROUP, fields[k], v) for k, v in d.items()})
