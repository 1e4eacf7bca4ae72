"""Weights in and out: Hugging Face LLaMA and Meta consolidated shards <-> ours (params_io).

Every format reads into, or writes from, one in-memory form (weights/table.py): our raw params
tree of NumPy arrays plus a ModelConfig derived from the source's own config. Each format is a
module of its own (weights/hf.py, weights/meta.py, params_io for ours); this one dispatches
between them for launch.convert.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.weights.hf import open_hf, read_hf, write_hf
from llama_jax.weights.meta import open_meta, read_meta, write_meta
from llama_jax.weights.params_io import load_params, save_params

FORMATS = ("hf", "meta", "ours")
# format -> open(path) -> (ModelConfig, dtype, get): one tensor at a time (weights/init_from.py)
OPENERS = {"hf": open_hf, "meta": open_meta}  # "ours" is params_io's orbax checkpoint


def read_ours(path: str, dtype=None, overrides: dict | None = None):
    params, c = load_params(path, dtype=dtype)
    if overrides:
        c = dataclasses.replace(c, **overrides)
    return jax.tree.map(np.asarray, params), c


READERS = {"hf": read_hf, "meta": read_meta, "ours": read_ours}


def convert(
    src: str,
    dst: str,
    input_path: str,
    output_path: str,
    *,
    dtype=None,
    overrides: dict | None = None,
    num_shards: int = 1,
) -> ModelConfig:
    """Converts a checkpoint between formats ("hf", "meta", "ours").

    Args:
      dtype: None keeps the source's dtype; else "float32" | "bfloat16" | "float16".
      overrides: ModelConfig fields to set on the derived config (e.g. max_seq_len, dtype);
        architecture fields are checked against the weights' shapes.
      num_shards: model-parallel shards when writing Meta's format.
    Returns:
      the ModelConfig of the converted model.
    """
    for fmt in (src, dst):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; valid: {list(FORMATS)}")
    tree, c = READERS[src](input_path, dtype=dtype, overrides=overrides)
    if dst == "hf":
        write_hf(output_path, tree, c)
    elif dst == "meta":
        write_meta(output_path, tree, c, num_shards=num_shards)
    else:
        save_params(output_path, tree, c)
    return c
