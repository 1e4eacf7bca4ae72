"""The architecture switches (model.norm, norm_placement, mlp, position) do what their names say.

Every variant is checked against an independent float64 NumPy forward written from the
textbook definitions, then each switch against a property that holds for it and fails for
the alternatives: LayerNorm ignores a shift of its input (RMSNorm does not), a post-norm block
hands on a normalized residual stream, GELU matches SwiGLU's parameter count, RoPE sees only
relative positions while learned positions are absolute, and without positions the first
layer at the last token cannot tell the order of the tokens before it.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import ModelConfig, load
from llama_jax.model import stats
from llama_jax.model.llama import Block, Llama, Norm


def cfg_of(**kw) -> ModelConfig:
    base = {
        "dim": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": 61,
        "multiple_of": 16,
        "dtype": "float32",
        "attention_impl": "reference",
        "max_seq_len": 32,
        "remat_policy": "none",
    }
    return ModelConfig(**{**base, **kw})


def init(cfg, seed=0, noise=0.3):
    """Random parameters from the model's own shapes (no init compile): weights and embeddings
    N(0, 0.2^2); norm gains 1 and biases 0, each perturbed by N(0, noise^2) so that a missing or
    misplaced gain or bias shows in a comparison."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        z = rng.standard_normal(s.shape).astype(np.float32)
        if "scale" in name:
            return 1.0 + noise * z
        return noise * z if "bias" in name else 0.2 * z

    return {"params": jax.tree_util.tree_map_with_path(draw, stats.param_shapes(cfg))}


def apply(cfg, params, tokens, **kw):
    return _jitted(cfg)(params, tokens, **kw)


_JITTED = {}


def _jitted(cfg):
    if cfg not in _JITTED:
        _JITTED[cfg] = jax.jit(Llama(cfg).apply, static_argnames=("decode", "mutable"))
    return _JITTED[cfg]


# ---- independent float64 forward, from the definitions of each choice ----


def np_norm(x, p, cfg):
    if cfg.norm == "layernorm":  # Ba et al. 2016: centre, scale to unit variance, gain, bias
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.norm_eps) * p["scale"] + p["bias"]
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * p["scale"]


def np_rope(x, theta):  # x [T, N, H]; adjacent pairs rotated as complex numbers (Meta's code)
    T, _, H = x.shape
    freqs = 1.0 / theta ** (np.arange(0, H, 2) / H)
    xc = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * np.outer(np.arange(T), freqs))[:, None]
    return np.stack([xc.real, xc.imag], -1).reshape(x.shape)


def np_gelu(g):  # the tanh form of GELU (GPT-2, BERT); flax's nn.gelu default
    return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))


def np_attention(h, a, cfg):  # causal softmax attention of one layer, GQA by repeating k/v
    T = len(h)
    q = np.einsum("td,dnh->tnh", h, a["wq"])
    k = np.einsum("td,dkh->tkh", h, a["wk"])
    v = np.einsum("td,dkh->tkh", h, a["wv"])
    if cfg.position == "rope":
        q, k = np_rope(q, cfg.rope_theta), np_rope(k, cfg.rope_theta)
    rep = cfg.n_heads // cfg.kv_heads
    k, v = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
    s = np.einsum("tnh,snh->nts", q, k) / np.sqrt(cfg.head_dim)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("tnh,nhd->td", np.einsum("nts,snh->tnh", w, v), a["wo"])


def np_mlp(h, f, cfg):
    g = h @ f["w1"]
    if cfg.mlp == "swiglu":
        return (g / (1 + np.exp(-g)) * (h @ f["w3"])) @ f["w2"]
    return np_gelu(g) @ f["w2"]


def np_forward(p, tokens, cfg):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    out = []
    for seq in np.asarray(tokens):
        x = p["tok_embeddings"][seq]
        if cfg.position == "learned":
            x = x + p["pos_embeddings"][: len(seq)]
        for i in range(cfg.n_layers):
            L = jax.tree.map(lambda a, i=i: a[i], p["layers"])
            a, f = L["attention"], L["feed_forward"]
            if cfg.norm_placement == "pre":  # GPT-2 / LLaMA: normalize each sublayer's input
                x = x + np_attention(np_norm(x, L["attention_norm"], cfg), a, cfg)
                x = x + np_mlp(np_norm(x, L["ffn_norm"], cfg), f, cfg)
            else:  # Vaswani et al.: normalize after each residual addition
                x = np_norm(x + np_attention(x, a, cfg), L["attention_norm"], cfg)
                x = np_norm(x + np_mlp(x, f, cfg), L["ffn_norm"], cfg)
        out.append(np_norm(x, p["norm"], cfg) @ p["output"])
    return np.stack(out)


VARIANTS = [
    {},
    {"norm": "layernorm"},
    {"norm_placement": "post"},
    {"mlp": "gelu"},
    {"position": "learned"},
    {"position": "none"},
    {"norm": "layernorm", "norm_placement": "post", "mlp": "gelu", "position": "learned"},
]


@pytest.mark.parametrize(
    "switches", VARIANTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "llama"
)
def test_each_variant_matches_float64_reference(switches):
    cfg = cfg_of(**switches)
    params = init(cfg)
    tokens = jax.random.randint(jax.random.key(2), (2, 13), 0, cfg.vocab_size)
    got = np.asarray(apply(cfg, params, tokens), np.float64)
    want = np_forward(params["params"], tokens, cfg)
    assert got.shape == (2, 13, cfg.vocab_size)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-5, rel


def test_defaults_are_llama():
    cfg = ModelConfig()
    assert (cfg.norm, cfg.norm_placement, cfg.mlp, cfg.position) == (
        "rmsnorm",
        "pre",
        "swiglu",
        "rope",
    )
    base = load("configs/tiny.py").model
    assert (base.norm, base.norm_placement, base.mlp, base.position) == (
        "rmsnorm",
        "pre",
        "swiglu",
        "rope",
    )
    # exactly Meta's parameter set: no biases, no position table, the gated w3
    names = {
        jax.tree_util.keystr(k)
        for k, _ in jax.tree_util.tree_leaves_with_path(stats.param_shapes(cfg_of()))
    }
    assert names == {
        "['tok_embeddings']",
        "['output']",
        "['norm']['scale']",
        "['layers']['attention_norm']['scale']",
        "['layers']['ffn_norm']['scale']",
        *(f"['layers']['attention']['{w}']" for w in ("wq", "wk", "wv", "wo")),
        *(f"['layers']['feed_forward']['{w}']" for w in ("w1", "w2", "w3")),
    }


def test_layernorm_has_the_mean_and_bias_terms():
    x = jax.random.normal(jax.random.key(0), (3, 5, 16)) * 2 + 0.7
    shifted = x + 3.0  # the same shift on every feature of a token
    outs = {}
    for norm in ("rmsnorm", "layernorm"):
        cfg = cfg_of(norm=norm, dim=16)
        params = Norm(cfg).init(jax.random.key(1), x)
        outs[norm] = (Norm(cfg).apply(params, x), Norm(cfg).apply(params, shifted), params)
    ln, ln_shift, ln_params = outs["layernorm"]
    rms, rms_shift, rms_params = outs["rmsnorm"]
    np.testing.assert_allclose(ln_shift, ln, atol=1e-5)  # the mean is removed...
    assert np.abs(np.asarray(ln).mean(-1)).max() < 1e-5  # ...so outputs are centred (bias 0)
    assert not np.allclose(rms_shift, rms, atol=1e-2)  # RMSNorm keeps the mean
    assert set(ln_params["params"]) == {"scale", "bias"} and set(rms_params["params"]) == {"scale"}
    bias = {"params": {**ln_params["params"], "bias": jnp.full((16,), 0.5)}}
    np.testing.assert_allclose(
        Norm(cfg_of(norm="layernorm", dim=16)).apply(bias, x), ln + 0.5, atol=1e-5
    )


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_post_norm_block_outputs_a_normalized_stream(norm):
    x = 5.0 * jax.random.normal(jax.random.key(0), (2, 8, 32)) + 1.0  # far from normalized
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    rms, rng = {}, np.random.default_rng(0)
    for placement in ("pre", "post"):
        cfg = cfg_of(norm=norm, norm_placement=placement)
        shapes = jax.eval_shape(
            lambda cfg=cfg: nn.unbox(Block(cfg).init(jax.random.key(1), x, pos, None))
        )
        params = jax.tree_util.tree_map_with_path(  # unit gains, zero biases, random weights
            lambda path, s: (
                (np.ones if "scale" in jax.tree_util.keystr(path) else np.zeros)(s.shape)
                if "norm" in jax.tree_util.keystr(path)
                else 0.2 * rng.standard_normal(s.shape)
            ),
            shapes,
        )
        y, _ = jax.jit(Block(cfg).apply)(params, x, pos, None)
        y = np.asarray(y, np.float64)
        if norm == "layernorm":
            y = y - y.mean(-1, keepdims=True)
        rms[placement] = np.sqrt((y * y).mean(-1))  # per token
    np.testing.assert_allclose(rms["post"], 1.0, rtol=1e-4)  # unit gain, zero bias at init
    assert rms["pre"].min() > 2.0  # the pre-norm residual stream keeps the input's scale


@pytest.mark.parametrize("name", ["tiny", "llama_7b"])
def test_gelu_parameter_count_matches_swiglu(name):
    model = load(f"configs/{name}.py").model
    swiglu = dataclasses.replace(model, mlp="swiglu")
    gelu = dataclasses.replace(model, mlp="gelu")
    n_swiglu, n_gelu = stats.count_params(swiglu), stats.count_params(gelu)
    assert abs(n_gelu - n_swiglu) <= 0.01 * n_swiglu, (n_gelu, n_swiglu)
    shapes = stats.param_shapes(gelu)["layers"]["feed_forward"]
    assert set(shapes) == {"w1", "w2"}  # no gate: a plain two-matrix MLP
    assert shapes["w1"].shape[-1] == gelu.mlp_dim > swiglu.hidden_dim

    # the MLP itself (the only part that differs) matches to within 1% as well
    def mlp(c):
        return sum(
            np.prod(s.shape)
            for s in jax.tree.leaves(stats.param_shapes(c)["layers"]["feed_forward"])
        )

    assert abs(mlp(gelu) - mlp(swiglu)) <= 0.01 * mlp(swiglu)


@pytest.mark.parametrize("position", ["rope", "learned", "none"])
def test_rope_is_relative_learned_is_absolute(position):
    """Shifting every position by the same offset: RoPE attention scores depend only on
    position differences, so nothing changes; a learned table is indexed absolutely."""
    cfg = cfg_of(position=position)
    params = init(cfg)
    tokens = jax.random.randint(jax.random.key(3), (1, 10), 0, cfg.vocab_size)
    pos = jnp.arange(10)[None]
    a = apply(cfg, params, tokens, positions=pos)
    b = apply(cfg, params, tokens, positions=pos + 7)
    if position == "learned":
        assert not np.allclose(a, b, atol=1e-3)
        assert stats.param_shapes(cfg)["pos_embeddings"].shape == (cfg.max_seq_len, cfg.dim)
    else:
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("position", ["rope", "learned", "none"])
def test_no_positions_last_token_ignores_order_of_earlier_tokens(position):
    """One layer, causal attention: the last token's output is softmax-weighted sum over the
    (key, value) pairs of all tokens; without positions that is a function of the *set* of
    earlier tokens, so permuting them leaves it exactly unchanged. With RoPE or learned
    positions the order shows. (Deeper layers see earlier tokens' order-dependent states.)"""
    cfg = cfg_of(position=position, n_layers=1)
    params = init(cfg)
    tokens = jax.random.randint(jax.random.key(4), (1, 12), 0, cfg.vocab_size)
    perm = np.random.default_rng(0).permutation(11)
    permuted = jnp.concatenate([tokens[:, perm], tokens[:, 11:]], axis=1)
    a = apply(cfg, params, tokens)[:, -1]
    b = apply(cfg, params, permuted)[:, -1]
    if position == "none":
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    else:
        assert not np.allclose(a, b, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize(
    "switches", [VARIANTS[-1], {"position": "none"}], ids=["all-switched", "position=none"]
)
def test_kv_cache_decode_matches_full_forward(switches):
    """Generation (llama_jax.inference.generate) works for the variants: the cached path gives the
    full-sequence logits, so a learned-position, post-norm or position-free model samples right."""
    cfg = cfg_of(**switches)
    params = init(cfg)["params"]
    tokens = jax.random.randint(jax.random.key(5), (1, 9), 0, cfg.vocab_size)
    full = apply(cfg, {"params": params}, tokens)
    shapes = jax.eval_shape(
        lambda: Llama(cfg).init(
            jax.random.key(0),
            jnp.zeros((1, 9), jnp.int32),
            positions=jnp.zeros((1, 9), jnp.int32),
            decode=True,
        )["cache"]
    )
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # 9 empty slots
    got = []
    for lo, hi in [(0, 5), (5, 6), (6, 7), (7, 8), (8, 9)]:  # prefill 5 tokens, then one at a time
        out, mut = apply(
            cfg,
            {"params": params, "cache": cache},
            tokens[:, lo:hi],
            positions=jnp.arange(lo, hi)[None],
            decode=True,
            mutable=("cache",),
        )
        cache = mut["cache"]
        got.append(out)
    np.testing.assert_allclose(jnp.concatenate(got, 1), full, atol=1e-4, rtol=1e-4)


def test_bad_switch_value_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"model.position='alibi'; valid: \['rope', 'learned', 'none'\]"
    ):
        cfg_of(position="alibi")
    cfg = load("configs/tiny.py", ["model.mlp=gelu", "model.norm_placement=post"])
    mc = cfg.model
    assert (mc.mlp, mc.norm_placement) == ("gelu", "post")
