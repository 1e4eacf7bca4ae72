"""Start a run from released weights: train.init_from = hf:DIR | meta:DIR | ours:DIR.

The model's shape comes from the weights (config.json, params.json or our export's
model_config.json); a config that sets a shape field to something else is refused, naming the
field. Weights stream into the sharded train state one tensor at a time: each process builds
only the shards its devices hold (per layer for stacked layers), so a 65B start never holds the
whole model in one host's memory. The source's tokenizer.model, when it has one, becomes
data.tokenizer unless the config names one.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from llama_jax.config import ModelConfig, RunConfig
from llama_jax.config_fields import dtype_of
from llama_jax.weights import params_io
from llama_jax.weights.convert import OPENERS
from llama_jax.weights.table import expected_shape, get_path, set_path, weights

SOURCES = ("hf", "meta", "ours")
# The model fields weights fix, compared by what they mean: (field, value of a ModelConfig).
SHAPE = {
    "dim": lambda m: m.dim,
    "n_layers": lambda m: m.n_layers,
    "n_heads": lambda m: m.n_heads,
    "n_kv_heads": lambda m: m.kv_heads,
    "vocab_size": lambda m: m.vocab_size,
    "multiple_of": lambda m: m.hidden_dim,  # multiple_of and ffn_dim_multiplier fix the FFN width
    "ffn_dim_multiplier": lambda m: m.hidden_dim,
    "norm_eps": lambda m: m.norm_eps,
    "rope_theta": lambda m: m.rope_theta,
    "tie_word_embeddings": lambda m: m.tie_word_embeddings,  # whether the tree has an output
}


def parse(spec: str) -> tuple[str, str]:
    """ "hf:DIR" -> ("hf", DIR); raises a one-line error naming the valid forms."""
    fmt, _, path = spec.partition(":")
    if fmt not in SOURCES or not path:
        raise ValueError(
            f"train.init_from={spec!r}: expected '' (random init) or one of "
            + ", ".join(f"{s}:DIR" for s in SOURCES)
        )
    if not os.path.isdir(path):
        raise FileNotFoundError(f"train.init_from={spec!r}: no directory {path}")
    return fmt, path


def source_config(fmt: str, path: str) -> ModelConfig:

    if fmt == "ours":
        return params_io.load_config(path)
    return OPENERS[fmt](path)[0]


def apply_source(cfg: RunConfig) -> RunConfig:
    """cfg with the model shape of train.init_from's weights (and their tokenizer). The config
    file's shape is what a run without weights would build; a shape field given by name
    (cfg.given: the command line's overrides) must agree with the weights."""
    if not cfg.train.init_from:
        return cfg
    fmt, path = parse(cfg.train.init_from)
    src = source_config(fmt, path)
    for field, value in SHAPE.items():
        if f"model.{field}" in cfg.given and value(cfg.model) != value(src):
            raise ValueError(
                f"model.{field}={getattr(cfg.model, field)!r} in the config, but "
                f"{cfg.train.init_from} has {getattr(src, field)!r}: the model's shape comes "
                "from the weights; drop the field from the config or start from other weights"
            )
    changes = {f"model.{f}": getattr(src, f) for f in SHAPE}
    tokenizer = os.path.join(path, "tokenizer.model")
    if not cfg.data.tokenizer and os.path.isfile(tokenizer):
        changes["data.tokenizer"] = tokenizer
    return cfg.replace(changes)


def load_params(cfg: RunConfig, shardings):
    """The params of train.init_from on `shardings` (the train state's), in model.param_dtype."""

    fmt, path = parse(cfg.train.init_from)
    dtype = cfg.model.param_dtype
    if fmt == "ours":  # orbax restores each shard where it belongs already
        return params_io.load_params(path, dtype=dtype, sharding=shardings)[0]
    c, _, get = OPENERS[fmt](path)
    tree: dict = {}
    for w in weights(c):
        layers = c.n_layers if w.per_layer else None
        shape = ((layers,) if layers else ()) + expected_shape(w, c)
        read = lambda i, w=w: w.to_ours(get(w, i), c)  # noqa: E731
        place = _place(read, shape, get_path(shardings, w.ours), layers, dtype_of(dtype))
        set_path(tree, w.ours, place)
    return tree


def _place(read, shape, sharding, layers: int | None, dtype) -> jax.Array:
    """A global array of `shape` on `sharding` from read(layer) -> one tensor (read(None) when
    not stacked): only this process's shards are built, one source tensor at a time."""
    index = sharding.addressable_devices_indices_map(shape)  # device -> tuple of slices
    bufs = {d: np.empty(_sliced(shape, idx), dtype) for d, idx in index.items()}
    for i in range(layers) if layers else [None]:
        x = np.asarray(read(i)).astype(dtype, copy=False)
        for d, idx in index.items():
            if i is None:
                bufs[d][...] = x[idx]
                continue
            rows = range(shape[0])[idx[0]]
            if i in rows:
                bufs[d][rows.index(i)] = x[idx[1:]]
    arrays = [jax.device_put(bufs[d], d) for d in index]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _sliced(shape, idx) -> tuple[int, ...]:
    return tuple(len(range(n)[s]) for n, s in zip(shape, idx, strict=True))


def describe(cfg: RunConfig) -> str:
    """One line for the start-up log."""
    m = cfg.model
    return (
        f"initialized from {cfg.train.init_from}: dim {m.dim}, {m.n_layers} layers, "
        f"{m.n_heads} heads ({m.kv_heads} kv), vocab {m.vocab_size}"
    )
