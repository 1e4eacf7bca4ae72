"""Hugging Face LLaMA <-> ours: config.json and (sharded) safetensors or pytorch_model*.bin.

RoPE: ours rotates interleaved pairs (x[2i], x[2i+1]) like Meta's code; Hugging Face rotates
halves (x[i], x[i + H/2]). Its conversion script permutes the rows of wq and wk within each
head so that the two layouts compute the same function, and we apply the same permutation (and
its inverse on export). Getting it wrong still runs, with a silently worse model, which is why
tests compare logits against transformers itself.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.config_fields import dtype_name
from llama_jax.weights.arrays import to_numpy, to_torch
from llama_jax.weights.table import (
    Weight,
    check_supported,
    dtypes,
    get_path,
    np_dtype,
    read_tree,
    weights,
)


def hf_to_meta_rows(w: np.ndarray, n: int) -> np.ndarray:
    """Undoes HF's q/k permutation: per head, rows [halves (2), H/2] -> interleaved [H/2, 2]."""
    rows, D = w.shape
    return w.reshape(n, 2, rows // n // 2, D).transpose(0, 2, 1, 3).reshape(rows, D)


def meta_to_hf_rows(w: np.ndarray, n: int) -> np.ndarray:
    """HF's permute() from convert_llama_weights_to_hf.py: interleaved pairs -> halves."""
    rows, D = w.shape
    return w.reshape(n, rows // n // 2, 2, D).transpose(0, 2, 1, 3).reshape(rows, D)


# ---------------------------------------------------------------------------------------------
# Config mapping.


def ffn_rule(dim: int, hidden: int) -> tuple[int, float]:
    """(multiple_of, ffn_dim_multiplier) for which ModelConfig.hidden_dim == hidden.

    Prefers the rule without a multiplier (LLaMA-1 sizes: 11008 for dim 4096 is 256-rounded
    8/3*dim); otherwise a multiplier of about hidden / (8/3*dim), as LLaMA-2-70B's 1.3.
    """
    base = int(2 * (4 * dim) / 3)
    for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if hidden % m == 0 and m * math.ceil(base / m) == hidden:
            return m, -1.0
    m = hidden & -hidden  # largest power of two dividing hidden
    mult = (hidden + 0.5) / base  # int(mult * base) lands on hidden despite rounding
    rule = (m, mult)
    got = ModelConfig(dim=dim, n_heads=1, multiple_of=m, ffn_dim_multiplier=mult).hidden_dim
    if got != hidden:
        raise ValueError(f"no multiple_of/ffn_dim_multiplier gives ffn width {hidden} at dim {dim}")
    return rule


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig from a Hugging Face LlamaConfig dict (config.json)."""
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"model_type={hf.get('model_type')!r}; only 'llama' converts")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag, False):
            raise ValueError(f"{flag}=True: LLaMA has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r}; LLaMA's SwiGLU uses silu")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(f"RoPE scaling {rope_type!r} is not implemented in ours")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads")
    multiple_of, mult = ffn_rule(dim, hf["intermediate_size"])
    fields = {
        "dim": dim,
        "n_layers": hf["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
        "vocab_size": hf["vocab_size"],
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": mult,
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "rope_theta": float(theta),
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        # tied, lm_head.weight is not read even when stored: transformers ties it to the table
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    return ModelConfig(**{**fields, **overrides})


def config_to_hf(c: ModelConfig, torch_dtype: str) -> dict:
    check_supported(c, "hf")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,  # transformers < 5 reads this ...
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},  # ... >= 5 this
        "max_position_embeddings": c.max_seq_len,
        "hidden_act": "silu",
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }


# ---------------------------------------------------------------------------------------------
# Reading.


class _HFTensors:
    """Lazy access to a (sharded or single) safetensors or pytorch_model*.bin checkpoint."""

    def __init__(self, path: str):
        self.path = path
        self.files: dict[str, object] = {}
        index = [
            f
            for f in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
            if os.path.isfile(os.path.join(path, f))
        ]
        if index:
            with open(os.path.join(path, index[0])) as f:
                self.where = json.load(f)["weight_map"]
        else:
            single = [
                f
                for f in ("model.safetensors", "pytorch_model.bin")
                if os.path.isfile(os.path.join(path, f))
            ]
            if not single:
                raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
            self.where = None
            self.single = single[0]

    def _open(self, fname: str):
        if fname not in self.files:
            full = os.path.join(self.path, fname)
            try:
                self.files[fname] = _open_weights(full)
            except Exception as e:  # noqa: BLE001 - SafetensorError, torch's UnpicklingError, ...
                raise ValueError(
                    f"cannot read {full} (truncated or not a weights file?): "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                ) from e
        return self.files[fname]

    def get(self, key: str) -> np.ndarray:
        fname = self.single if self.where is None else self.where.get(key)
        if fname is None:
            raise KeyError(f"{key} not in {self.path}")
        f = self._open(fname)
        t = f.get_tensor(key) if hasattr(f, "get_tensor") else f[key]
        return to_numpy(t)


def _open_weights(path: str):
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        return safe_open(path, framework="pt")
    import torch

    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def open_hf(path: str, dtype=None, overrides: dict | None = None):
    """A Hugging Face LLaMA directory (config.json + weights) as (ModelConfig, dtype, get):
    get(weight, layer) reads one tensor, in torch layout, with Meta's q/k row order.

    dtype: None keeps the stored dtype (e.g. bfloat16); else a name in config.DTYPES.
    """
    with open(os.path.join(path, "config.json")) as f:
        hf_cfg = json.load(f)
    src = _HFTensors(path)
    probe = src.get("model.norm.weight")
    dt = np_dtype(dtype) or probe.dtype
    # computing in the weights' dtype, as transformers does: a float32 checkpoint decoded in
    # bfloat16 leaves transformers' greedy text within a few dozen tokens
    c = config_from_hf(hf_cfg, **{**dtypes(dt), **(overrides or {})})

    def get(w: Weight, i):
        x = src.get(w.hf.format(i=i))
        if w.rope_heads:
            x = hf_to_meta_rows(x, getattr(c, w.rope_heads))
        return x.astype(dt, copy=False)

    return c, dt, get


def read_hf(path: str, dtype=None, overrides: dict | None = None):
    """Reads a Hugging Face LLaMA directory -> (tree, ModelConfig); see open_hf."""
    c, dt, get = open_hf(path, dtype, overrides)
    return read_tree(get, c, dt), c


# ---------------------------------------------------------------------------------------------
# Writing.


def write_hf(path: str, tree: dict, c: ModelConfig, max_shard_bytes: int = 5 << 30):
    """Writes config.json and model*.safetensors (with an index when sharded) for transformers."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    dtype = np.asarray(get_path(tree, ("norm", "scale"))).dtype
    torch_dtype = dtype_name(dtype)  # transformers' torch_dtype names are ours
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(c, torch_dtype), f, indent=2)

    def tensors():
        for w in weights(c):  # tied: no lm_head, as transformers' save_pretrained writes it
            full = get_path(tree, w.ours)
            for i in range(c.n_layers) if w.per_layer else [None]:
                x = w.from_ours(np.asarray(full[i] if w.per_layer else full), c)
                if w.rope_heads:
                    x = meta_to_hf_rows(x, getattr(c, w.rope_heads))
                yield w.hf.format(i=i), x

    shards, current, size = [], {}, 0
    for key, x in tensors():
        if current and size + x.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size = to_torch(x), size + x.nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
        fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
