"""Meta's consolidated LLaMA checkpoints <-> ours: params.json and consolidated.XX.pth.

Meta's model-parallel shards (consolidated.XX.pth) split ColumnParallelLinear weights (wq, wk,
wv, w1, w3, output) along the output rows, RowParallelLinear weights (wo, w2) along the input
columns, ParallelEmbedding (tok_embeddings) along the embedding dim, and replicate the norms.
Reading streams tensor by tensor from memory-mapped shards into the preallocated output arrays.
Meta's q/k rows are in our RoPE order already (weights/table.py).
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.weights.arrays import to_numpy, to_torch
from llama_jax.weights.table import (
    WEIGHTS,
    Weight,
    check_supported,
    dtypes,
    get_path,
    np_dtype,
    read_tree,
)


def config_from_meta(params: dict, vocab_size: int, **overrides) -> ModelConfig:
    """ModelConfig from Meta's params.json; vocab_size -1 there means "the tokenizer's"."""
    if params.get("use_scaled_rope"):
        raise NotImplementedError("use_scaled_rope (LLaMA-3.1 RoPE scaling) is not implemented")
    mult = params.get("ffn_dim_multiplier")
    fields = {
        "dim": params["dim"],
        "n_layers": params["n_layers"],
        "n_heads": params["n_heads"],
        "n_kv_heads": params.get("n_kv_heads") or params["n_heads"],
        "vocab_size": vocab_size,
        "multiple_of": params.get("multiple_of", 256),
        "ffn_dim_multiplier": -1.0 if mult is None else float(mult),
        "norm_eps": params.get("norm_eps", 1e-5),
        "rope_theta": float(params.get("rope_theta", 10000.0)),
    }
    if "max_seq_len" in params:
        fields["max_seq_len"] = params["max_seq_len"]
    return ModelConfig(**{**fields, **overrides})


def config_to_meta(c: ModelConfig) -> dict:
    check_supported(c, "meta")
    out = {
        "dim": c.dim,
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "n_kv_heads": c.kv_heads,
        "vocab_size": c.vocab_size,
        "multiple_of": c.multiple_of,
        "norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "max_seq_len": c.max_seq_len,
    }
    if c.ffn_dim_multiplier not in (-1, -1.0, None):
        out["ffn_dim_multiplier"] = c.ffn_dim_multiplier
    return out


def read_meta(path: str, dtype=None, overrides: dict | None = None):
    """Reads Meta's params.json + consolidated.XX.pth model-parallel shards -> (tree, ModelConfig);
    see open_meta."""
    c, dt, get = open_meta(path, dtype, overrides)
    return read_tree(get, c, dt), c


def open_meta(path: str, dtype=None, overrides: dict | None = None):
    """Meta's params.json + consolidated.XX.pth model-parallel shards as (ModelConfig, dtype,
    get): get(weight, layer) reads one tensor in torch layout. Each shard is memory-mapped;
    a tensor is merged from its shards along their split axis when it is read."""
    import torch

    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not files:
        raise FileNotFoundError(f"no consolidated.*.pth in {path}")
    with open(os.path.join(path, "params.json")) as f:
        params = json.load(f)
    shards = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in files]

    def merged(w: Weight, i):
        parts = [to_numpy(s[w.meta.format(i=i)]) for s in shards]
        if w.meta_axis is None or len(parts) == 1:
            return parts[0]
        return np.concatenate(parts, axis=w.meta_axis)

    emb = shards[0][WEIGHTS[0].meta]  # [V, D / shards]: vocab is whole in every shard
    dt = np_dtype(dtype) or to_numpy(shards[0]["norm.weight"]).dtype
    over = {**dtypes(dt), **(overrides or {})}
    c = config_from_meta(params, vocab_size=emb.shape[0], **over)
    return c, dt, lambda w, i: merged(w, i).astype(dt, copy=False)


def write_meta(path: str, tree: dict, c: ModelConfig, num_shards: int = 1):
    """Writes params.json + consolidated.XX.pth split the way Meta's model-parallel code loads.

    Meta's params.json has no tie flag and its model always loads an output.weight (transformers'
    conversion script reads one for the tied LLaMA-3.2 too), so a tied model is written with
    output.weight = tok_embeddings: it reads back untied with the same logits, or tied again
    with the override tie_word_embeddings=True.
    """
    import torch

    if c.tie_word_embeddings:
        tree = {**tree, "output": np.asarray(tree["tok_embeddings"]).T}  # [D, V]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(config_to_meta(c), f, indent=2)
    shards = [{} for _ in range(num_shards)]
    for w in WEIGHTS:
        full = get_path(tree, w.ours)
        for i in range(c.n_layers) if w.per_layer else [None]:
            x = w.from_ours(np.asarray(full[i] if w.per_layer else full), c)
            key = w.meta.format(i=i)
            if w.meta_axis is None:
                parts = [x] * num_shards
            else:
                if x.shape[w.meta_axis] % num_shards:
                    raise ValueError(
                        f"{key}: axis {w.meta_axis} of {x.shape} not divisible by "
                        f"{num_shards} shards"
                    )
                parts = np.split(x, num_shards, axis=w.meta_axis)
            for shard, part in zip(shards, parts):
                shard[key] = to_torch(part).clone()  # clone: own storage, not a view of x
    for n, shard in enumerate(shards):
        torch.save(shard, os.path.join(path, f"consolidated.{n:02d}.pth"))
