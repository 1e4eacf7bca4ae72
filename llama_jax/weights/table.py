"""The weight table every format shares: one row per tensor, its name in each format, how its
layout changes, the shape our model expects, and the in-memory tree a format reads into.

Every format is read into, or written from, one in-memory form: our raw params tree of NumPy
arrays plus a ModelConfig derived from the source's own config (config.json / params.json /
model_config.json), never typed by hand.

Layouts. Meta and Hugging Face store torch nn.Linear weights as [out, in]; ours are einsum
operands [in, ...out] with heads split out (wq [D, N, H], wo [N, H, D]). RoPE: ours rotates
interleaved pairs (x[2i], x[2i+1]) exactly like Meta's code, so Meta's q/k rows map directly;
Hugging Face's row order is weights/hf.py's concern.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.config_fields import dtype_name, dtype_of

# ---------------------------------------------------------------------------------------------
# Layout changes. "torch" layout is nn.Linear's [out, in], shared by Meta and Hugging Face.


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
class Weight:
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


def _row(ours: str, meta: str, hf: str, layout: str, meta_axis: int | None) -> Weight:
    if ours.startswith("layers/"):
        meta, hf = f"layers.{{i}}.{meta}", f"model.layers.{{i}}.{hf}"
    return Weight(tuple(ours.split("/")), meta + ".weight", hf + ".weight", layout, meta_axis)


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


def weights(c: ModelConfig) -> tuple[Weight, ...]:
    """The tensors c's model holds: WEIGHTS, less output when the head is the embedding table."""
    return tuple(w for w in WEIGHTS if not (c.tie_word_embeddings and w.ours == ("output",)))


def check_supported(c: ModelConfig, fmt: str):
    """Raises unless c is the plain LLaMA architecture, the only one fmt's files describe."""
    arch = {"norm": "rmsnorm", "norm_placement": "pre", "mlp": "swiglu", "position": "rope"}
    bad = {k: getattr(c, k) for k, v in arch.items() if getattr(c, k) != v}
    if bad:
        raise ValueError(
            f"the {fmt} format holds only the LLaMA architecture; this model has {bad}"
        )


def expected_shape(w: Weight, c: ModelConfig) -> tuple[int, ...]:
    """The shape of w in our layout under c, one layer's for a per-layer weight."""
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


def set_path(tree: dict, path: tuple[str, ...], value):
    """tree[path[0]][path[1]]... = value, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple[str, ...]):
    """tree[path[0]][path[1]]..."""
    for key in path:
        tree = tree[key]
    return tree


def np_dtype(dtype):
    """The NumPy dtype of a config.DTYPES name (or dtype); None stays None (keep the stored)."""
    return None if dtype is None else np.dtype(dtype_of(dtype))


def dtypes(dt) -> dict[str, str]:
    """The ModelConfig dtypes of weights stored in dt: held and computed in it."""
    return {"param_dtype": dtype_name(dt), "dtype": dtype_name(dt)}


def read_tree(get: Callable[[Weight, int | None], np.ndarray], c: ModelConfig, dtype) -> dict:
    """Builds our tree from get(weight, layer) -> torch-layout array, one tensor at a time.

    Per-layer weights are written into one preallocated [L, ...] array each, so peak memory is
    the output plus one source tensor.
    """
    tree: dict = {}
    for w in weights(c):
        shape = expected_shape(w, c)
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
        set_path(tree, w.ours, out)
    return tree


def _check_shape(x, shape, w: Weight, i):
    if tuple(x.shape) != tuple(shape):
        where = w.meta.format(i=i)
        raise ValueError(
            f"{where}: shape {tuple(x.shape)} (ours) does not match the config's {shape}"
        )
