"""Weights in and out: Hugging Face LLaMA and Meta consolidated shards <-> ours (params_io).

Every format is read into, or written from, one in-memory form: our raw params tree of NumPy
arrays plus a ModelConfig derived from the source's own config (config.json / params.json /
model_config.json), never typed by hand.

Layouts. Meta and Hugging Face store torch nn.Linear weights as [out, in]; ours are einsum
operands [in, ...out] with heads split out (wq [D, N, H], wo [N, H, D]). RoPE: ours rotates
interleaved pairs (x[2i], x[2i+1]) exactly like Meta's code, so Meta's q/k rows map directly.
Hugging Face rotates halves (x[i], x[i + H/2]); its conversion script permutes the rows of
wq and wk within each head so that the two layouts compute the same function, and we apply
the same permutation (and its inverse on export). Getting it wrong still runs, with a silently
worse model, which is why tests compare logits against transformers itself.

Meta's model-parallel shards (consolidated.XX.pth) split ColumnParallelLinear weights (wq, wk,
wv, w1, w3, output) along the output rows, RowParallelLinear weights (wo, w2) along the input
columns, ParallelEmbedding (tok_embeddings) along the embedding dim, and replicate the norms.
Reading streams tensor by tensor from memory-mapped shards into the preallocated output arrays.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from collections.abc import Callable

import numpy as np

from llama_jax.adapters import lora
from llama_jax.config import ModelConfig
from llama_jax.config_fields import dtype_name, dtype_of
from llama_jax.weights.params_io import load_params, save_params

FORMATS = ("hf", "meta", "ours")


# ---------------------------------------------------------------------------------------------
# The weight table: one row per tensor, with its name in each format and how it changes layout.
# "torch" layout is nn.Linear's [out, in], shared by Meta and Hugging Face.


def _qkv_in(heads: str):
    def f(w, c: ModelConfig):  # [n*H, D] -> [D, n, H]
        return w.T.reshape(c.dim, getattr(c, heads), c.head_dim)

    return f


def _qkv_out(w, c: ModelConfig):  # [D, n, H] -> [n*H, D]
    return w.reshape(c.dim, -1).T


def _wo_in(w, c: ModelConfig):  # [D, N*H] -> [N, H, D]
    return w.T.reshape(c.n_heads, c.head_dim, c.dim)


def _wo_out(w, c: ModelConfig):  # [N, H, D] -> [D, N*H]
    return w.reshape(-1, c.dim).T


def _transpose(w, c):
    return w.T


def _same(w, c):
    return w


# layout name -> (torch layout -> ours, ours -> torch layout, heads whose rows HF permutes)
LAYOUTS = {
    "same": (_same, _same, None),
    "T": (_transpose, _transpose, None),
    "q": (_qkv_in("n_heads"), _qkv_out, "n_heads"),
    "k": (_qkv_in("kv_heads"), _qkv_out, "kv_heads"),
    "v": (_qkv_in("kv_heads"), _qkv_out, None),
    "o": (_wo_in, _wo_out, None),
}


@dataclasses.dataclass(frozen=True)
class _Weight:
    ours: tuple[str, ...]  # path in our tree; per-layer weights live under ("layers", ...)
    meta: str  # Meta state-dict key; "{i}" is the layer index
    hf: str  # Hugging Face state-dict key
    layout: str  # a key of LAYOUTS
    meta_axis: int | None  # torch-layout axis Meta's model parallelism splits; None = replicated

    @property
    def per_layer(self) -> bool:
        return self.ours[0] == "layers"

    def to_ours(self, w, c):
        return LAYOUTS[self.layout][0](w, c)

    def from_ours(self, w, c):
        return LAYOUTS[self.layout][1](w, c)

    @property
    def rope_heads(self) -> str | None:
        return LAYOUTS[self.layout][2]


def _row(ours: str, meta: str, hf: str, layout: str, meta_axis: int | None) -> _Weight:
    if ours.startswith("layers/"):
        meta, hf = f"layers.{{i}}.{meta}", f"model.layers.{{i}}.{hf}"
    return _Weight(tuple(ours.split("/")), meta + ".weight", hf + ".weight", layout, meta_axis)


# fmt: off
WEIGHTS = (
    # ours                              Meta               Hugging Face                layout  split
    _row("tok_embeddings",              "tok_embeddings",  "model.embed_tokens",       "same", 1),
    _row("layers/attention/wq",         "attention.wq",    "self_attn.q_proj",         "q",    0),
    _row("layers/attention/wk",         "attention.wk",    "self_attn.k_proj",         "k",    0),
    _row("layers/attention/wv",         "attention.wv",    "self_attn.v_proj",         "v",    0),
    _row("layers/attention/wo",         "attention.wo",    "self_attn.o_proj",         "o",    1),
    _row("layers/feed_forward/w1",      "feed_forward.w1", "mlp.gate_proj",            "T",    0),
    _row("layers/feed_forward/w2",      "feed_forward.w2", "mlp.down_proj",            "T",    1),
    _row("layers/feed_forward/w3",      "feed_forward.w3", "mlp.up_proj",              "T",    0),
    _row("layers/attention_norm/scale", "attention_norm",  "input_layernorm",          "same", None),
    _row("layers/ffn_norm/scale",       "ffn_norm",        "post_attention_layernorm", "same", None),
    _row("norm/scale",                  "norm",            "model.norm",               "same", None),
    _row("output",                      "output",          "lm_head",                  "T",    0),
)
# fmt: on


def weights(c: ModelConfig) -> tuple[_Weight, ...]:
    """The tensors c's model holds: WEIGHTS, less output when the head is the embedding table."""
    return tuple(w for w in WEIGHTS if not (c.tie_word_embeddings and w.ours == ("output",)))


def hf_to_meta_rows(w: np.ndarray, n: int) -> np.ndarray:
    """Undoes HF's q/k permutation: per head, rows [halves (2), H/2] -> interleaved [H/2, 2]."""
    rows, D = w.shape
    return w.reshape(n, 2, rows // n // 2, D).transpose(0, 2, 1, 3).reshape(rows, D)


def meta_to_hf_rows(w: np.ndarray, n: int) -> np.ndarray:
    """HF's permute() from convert_llama_weights_to_hf.py: interleaved pairs -> halves."""
    rows, D = w.shape
    return w.reshape(n, rows // n // 2, 2, D).transpose(0, 2, 1, 3).reshape(rows, D)


def _check_supported(c: ModelConfig, fmt: str):
    arch = {"norm": "rmsnorm", "norm_placement": "pre", "mlp": "swiglu", "position": "rope"}
    bad = {k: getattr(c, k) for k, v in arch.items() if getattr(c, k) != v}
    if bad:
        raise ValueError(
            f"the {fmt} format holds only the LLaMA architecture; this model has {bad}"
        )


def _expected_shape(w: _Weight, c: ModelConfig) -> tuple[int, ...]:
    D, N, K, H, F, V = c.dim, c.n_heads, c.kv_heads, c.head_dim, c.hidden_dim, c.vocab_size
    shapes = {
        "tok_embeddings": (V, D),
        "wq": (D, N, H),
        "wk": (D, K, H),
        "wv": (D, K, H),
        "wo": (N, H, D),
        "w1": (D, F),
        "w3": (D, F),
        "w2": (F, D),
        "scale": (D,),
        "output": (D, V),
    }
    return shapes[w.ours[-1]]


def _set(tree: dict, path: tuple[str, ...], value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _np_dtype(dtype):
    return None if dtype is None else np.dtype(dtype_of(dtype))


def _read_tree(get: Callable[[str, _Weight], np.ndarray], c: ModelConfig, dtype) -> dict:
    """Builds our tree from get(key, weight) -> torch-layout array, one tensor at a time.

    Per-layer weights are written into one preallocated [L, ...] array each, so peak memory is
    the output plus one source tensor.
    """
    tree: dict = {}
    for w in weights(c):
        shape = _expected_shape(w, c)
        if w.per_layer:
            out = None
            for i in range(c.n_layers):
                x = w.to_ours(get(w, i), c)
                if out is None:
                    out = np.empty((c.n_layers, *shape), dtype or x.dtype)
                _check_shape(x, shape, w, i)
                out[i] = x
        else:
            out = w.to_ours(get(w, None), c)
            _check_shape(out, shape, w, None)
            out = out.astype(dtype or out.dtype)
        _set(tree, w.ours, out)
    return tree


def _check_shape(x, shape, w: _Weight, i):
    if tuple(x.shape) != tuple(shape):
        where = w.meta.format(i=i)
        raise ValueError(
            f"{where}: shape {tuple(x.shape)} (ours) does not match the config's {shape}"
        )


# ---------------------------------------------------------------------------------------------
# torch <-> NumPy without float32 round trips (NumPy has no bfloat16; ml_dtypes does).


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _to_torch(x: np.ndarray):
    import ml_dtypes
    import torch

    x = np.ascontiguousarray(x)
    if not x.flags.writeable:  # torch wants to own writable memory
        x = x.copy()
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


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
    _check_supported(c, "hf")
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
    _check_supported(c, "meta")
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


# ---------------------------------------------------------------------------------------------
# Hugging Face.


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
        return _to_numpy(t)


def _dtypes(dt) -> dict[str, str]:
    """The ModelConfig dtypes of weights stored in dt: held and computed in it."""
    return {"param_dtype": dtype_name(dt), "dtype": dtype_name(dt)}


def open_hf(path: str, dtype=None, overrides: dict | None = None):
    """A Hugging Face LLaMA directory (config.json + weights) as (ModelConfig, dtype, get):
    get(weight, layer) reads one tensor, in torch layout, with Meta's q/k row order.

    dtype: None keeps the stored dtype (e.g. bfloat16); else a name in config.DTYPES.
    """
    with open(os.path.join(path, "config.json")) as f:
        hf_cfg = json.load(f)
    src = _HFTensors(path)
    probe = src.get("model.norm.weight")
    dt = _np_dtype(dtype) or probe.dtype
    # computing in the weights' dtype, as transformers does: a float32 checkpoint decoded in
    # bfloat16 leaves transformers' greedy text within a few dozen tokens
    c = config_from_hf(hf_cfg, **{**_dtypes(dt), **(overrides or {})})

    def get(w: _Weight, i):
        x = src.get(w.hf.format(i=i))
        if w.rope_heads:
            x = hf_to_meta_rows(x, getattr(c, w.rope_heads))
        return x.astype(dt, copy=False)

    return c, dt, get


def read_hf(path: str, dtype=None, overrides: dict | None = None):
    """Reads a Hugging Face LLaMA directory -> (tree, ModelConfig); see open_hf."""
    c, dt, get = open_hf(path, dtype, overrides)
    return _read_tree(get, c, dt), c


def _open_weights(path: str):
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        return safe_open(path, framework="pt")
    import torch

    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def write_hf(path: str, tree: dict, c: ModelConfig, max_shard_bytes: int = 5 << 30):
    """Writes config.json and model*.safetensors (with an index when sharded) for transformers."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    dtype = np.asarray(_get(tree, ("norm", "scale"))).dtype
    torch_dtype = dtype_name(dtype)  # transformers' torch_dtype names are ours
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(c, torch_dtype), f, indent=2)

    def tensors():
        for w in weights(c):  # tied: no lm_head, as transformers' save_pretrained writes it
            full = _get(tree, w.ours)
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
        current[key], size = _to_torch(x), size + x.nbytes
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


# ---------------------------------------------------------------------------------------------
# Meta.


def read_meta(path: str, dtype=None, overrides: dict | None = None):
    """Reads Meta's params.json + consolidated.XX.pth model-parallel shards -> (tree, ModelConfig);
    see open_meta."""
    c, dt, get = open_meta(path, dtype, overrides)
    return _read_tree(get, c, dt), c


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

    def merged(w: _Weight, i):
        parts = [_to_numpy(s[w.meta.format(i=i)]) for s in shards]
        if w.meta_axis is None or len(parts) == 1:
            return parts[0]
        return np.concatenate(parts, axis=w.meta_axis)

    emb = shards[0][WEIGHTS[0].meta]  # [V, D / shards]: vocab is whole in every shard
    dt = _np_dtype(dtype) or _to_numpy(shards[0]["norm.weight"]).dtype
    over = {**_dtypes(dt), **(overrides or {})}
    c = config_from_meta(params, vocab_size=emb.shape[0], **over)
    return c, dt, lambda w, i: merged(w, i).astype(dt, copy=False)


OPENERS = {"hf": open_hf, "meta": open_meta}  # "ours" is params_io's orbax checkpoint


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
        full = _get(tree, w.ours)
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
                shard[key] = _to_torch(part).clone()  # clone: own storage, not a view of x
    for n, shard in enumerate(shards):
        torch.save(shard, os.path.join(path, f"consolidated.{n:02d}.pth"))


# ---------------------------------------------------------------------------------------------
# Ours, and the dispatcher behind launch.convert.


def read_ours(path: str, dtype=None, overrides: dict | None = None):
    import jax

    params, c = load_params(path, dtype=dtype)
    if overrides:
        c = dataclasses.replace(c, **overrides)
    return jax.tree.map(np.asarray, params), c


def write_ours(path: str, tree: dict, c: ModelConfig):

    save_params(path, tree, c)


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
        write_ours(output_path, tree, c)
    return c


# ---------------------------------------------------------------------------------------------
# LoRA adapters -> a Hugging Face PEFT adapter.

# LoRA target -> its Hugging Face module under model.layers.{i}
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "w1": "mlp.gate_proj", "w2": "mlp.down_proj",
              "w3": "mlp.up_proj"}  # fmt: skip


def write_peft(path: str, adapters, cfg, base: str = "") -> str:
    """A Hugging Face PEFT adapter (adapter_config.json + adapter_model.safetensors) that peft
    loads onto the transformers LlamaForCausalLM of the base: torch's lora_A [r, in] and
    lora_B [out, r], with q/k output rows in Hugging Face's RoPE order (as convert.py does)."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {}
    for t in lora.targets(cfg):
        module = lora.TARGETS[t][0]
        a = np.asarray(adapters["layers"][module][f"{t}_a"], np.float32)  # [L, in..., r]
        b = np.asarray(adapters["layers"][module][f"{t}_b"], np.float32)  # [L, r, out...]
        for layer in range(cfg.n_layers):
            lora_a = a[layer].reshape(-1, cfg.lora_rank).T  # [r, in]
            lora_b = b[layer].reshape(cfg.lora_rank, -1).T  # [out, r]
            if t in ("q", "k"):
                lora_b = meta_to_hf_rows(lora_b, cfg.n_heads if t == "q" else cfg.kv_heads)
            key = f"base_model.model.model.layers.{layer}.{HF_MODULES[t]}"
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(lora_a)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(lora_b)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": sorted(HF_MODULES[t].split(".")[1] for t in lora.targets(cfg)),
        "use_rslora": False,
        "use_dora": False,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path
