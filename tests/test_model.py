"""The model against an independent float64 NumPy LLaMA, published parameter counts, causality."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import ModelConfig, load
from llama_jax.model import stats
from llama_jax.model.llama import Llama

PUBLISHED = {  # parameter counts of the released checkpoints
    "llama_7b": (6_738_415_616, 11008),
    "llama_13b": (13_015_864_320, 13824),
    "llama_33b": (32_528_943_616, 17920),
    "llama_65b": (65_285_660_672, 22016),
}


def tiny(**kw) -> ModelConfig:
    base = dict(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,
        vocab_size=97,
        multiple_of=16,
        dtype="float32",
        attention_impl="reference",
        max_seq_len=64,
    )
    return ModelConfig(**{**base, **kw})


def init(cfg, T=8, seed=0):
    tokens = jnp.zeros((1, T), jnp.int32)
    return nn.unbox(Llama(cfg).init(jax.random.key(seed), tokens))


# ---- an independent float64 LLaMA forward (Meta's formulation: complex rotary) ----


def np_rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def np_rotary(x, theta):  # x [T, N, H]; Meta: view adjacent pairs as complex numbers
    T, _, H = x.shape
    freqs = 1.0 / theta ** (np.arange(0, H, 2)[: H // 2] / H)
    cis = np.exp(1j * np.outer(np.arange(T), freqs))[:, None, :]  # [T, 1, H/2]
    xc = x[..., 0::2] + 1j * x[..., 1::2]
    out = xc * cis
    return np.stack([out.real, out.imag], -1).reshape(x.shape)


def np_llama(p, tokens, cfg):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    out = []
    for seq in np.asarray(tokens):
        x = p["tok_embeddings"][seq]  # [T, D]
        T = len(seq)
        mask = np.tril(np.ones((T, T), bool))
        for i in range(cfg.n_layers):
            L = jax.tree.map(lambda a: a[i], p["layers"])  # noqa: B023 (used at once)
            a = L["attention"]
            h = np_rmsnorm(x, L["attention_norm"]["scale"], cfg.norm_eps)
            q = np_rotary(np.einsum("td,dnh->tnh", h, a["wq"]), cfg.rope_theta)
            k = np_rotary(np.einsum("td,dkh->tkh", h, a["wk"]), cfg.rope_theta)
            v = np.einsum("td,dkh->tkh", h, a["wv"])
            rep = cfg.n_heads // cfg.kv_heads
            k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # [T, N, H]
            s = np.einsum("tnh,snh->nts", q, k) / np.sqrt(cfg.head_dim)
            s = np.where(mask, s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            o = np.einsum("nts,snh->tnh", w, v)
            x = x + np.einsum("tnh,nhd->td", o, a["wo"])
            f = L["feed_forward"]
            h = np_rmsnorm(x, L["ffn_norm"]["scale"], cfg.norm_eps)
            g = h @ f["w1"]
            x = x + ((g / (1 + np.exp(-g))) * (h @ f["w3"])) @ f["w2"]
        x = np_rmsnorm(x, p["norm"]["scale"], cfg.norm_eps)
        out.append(x @ p["output"])
    return np.stack(out)


@pytest.mark.slow
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_logits_match_float64_numpy(n_kv_heads):
    cfg = tiny(n_kv_heads=n_kv_heads)
    params = init(cfg)
    # Non-trivial norm scales so a missing or misplaced norm weight shows.
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: (
            a * (1 + 0.3 * jax.random.normal(jax.random.key(1), a.shape))
            if "scale" in jax.tree_util.keystr(path)
            else a
        ),
        params,
    )
    tokens = jax.random.randint(jax.random.key(2), (2, 19), 0, cfg.vocab_size)
    got = np.asarray(Llama(cfg).apply(params, tokens), np.float64)
    want = np_llama(params["params"], tokens, cfg)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert got.shape == (2, 19, cfg.vocab_size)
    assert rel < 1e-5, rel


@pytest.mark.slow
def test_causality():
    cfg = tiny(n_kv_heads=2)
    params = init(cfg)
    tokens = jax.random.randint(jax.random.key(3), (1, 16), 0, cfg.vocab_size)
    base = Llama(cfg).apply(params, tokens)
    for t in (0, 5, 15):
        changed = tokens.at[0, t].set((tokens[0, t] + 1) % cfg.vocab_size)
        out = Llama(cfg).apply(params, changed)
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t], base[:, t])  # the changed position itself does move


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    cfg = load(f"configs/{name}.py").model
    count, hidden = PUBLISHED[name]
    assert cfg.hidden_dim == hidden
    assert stats.count_params(cfg) == count


def test_inspect_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "launch.inspect", "--config", "configs/llama_7b.py", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    info = json.loads(out)
    assert info["parameters"] == 6_738_415_616
    # 6N plus causal attention: 6*N + 3 * 2*2*L*D*T / 2
    assert info["flops_per_token"] == 6 * 6_738_415_616 + 3 * 2 * 32 * 4096 * 2048


def test_inspect_cli_unknown_field_is_one_line():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.inspect",
            "--config",
            "configs/tiny.py",
            "--config.model.dimm=3",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "dimm" in r.stderr


def test_mfu_on_the_paper_and_palm_bases():
    """Both MFU conventions, labelled: the paper's 6N and PaLM's 6 x non-embedding + 12 L D T,
    checked by hand for 7B at seq 2048 (the embedding table is 32000 x 4096)."""
    cfg = load("configs/llama_7b.py").model
    flops = stats.flops_per_token(cfg, 2048)
    n = 6_738_415_616
    assert flops["6n"] == 6 * n
    assert flops["palm"] == 6 * (n - 32000 * 4096) + 12 * 32 * 4096 * 2048
    # 380 tokens/s/GPU (the paper's 65B-scale rate, here on 7B shapes) on 8 devices of 312 TFLOP/s
    got = stats.mfu(8 * 380.0, flops, devices=8, peak=312e12)
    assert got == pytest.approx(
        {"mfu_6n": 380 * 6 * n / 312e12, "mfu_palm": 380 * flops["palm"] / 312e12}
    )
    assert stats.mfu(1000.0, flops, devices=1, peak=None) == {}  # CPUs: no vendor peak, no MFU


# Training tokens of each model in the paper (Table 1 / Figure 1): 1.0T for 7B and 13B, 1.4T for
# 33B and 65B.
PAPER_TOKENS = {"llama_7b": 1.0e12, "llama_13b": 1.0e12, "llama_33b": 1.4e12, "llama_65b": 1.4e12}


@pytest.mark.parametrize("name", sorted(PAPER_TOKENS))
def test_paper_token_budgets(name):
    """steps x batch x seq is the paper's token count to within one step's tokens (it was
    250,000 / 350,000 steps = 1.049T / 1.468T, 5% over)."""
    t = load(f"configs/{name}.py").train
    assert t.tokens_per_step == 2048 * 2048  # the paper's 4M-token batches
    assert abs(t.steps * t.tokens_per_step - PAPER_TOKENS[name]) <= t.tokens_per_step


def test_unknown_model_field_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown model config field.*'dimm'"):
        ModelConfig.from_dict({"dimm": 3})
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)


def test_scan_program_size_does_not_grow_with_depth():
    def hlo_size(n_layers):
        cfg = tiny(n_layers=n_layers)
        shapes = jax.eval_shape(lambda: init(cfg))
        tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        return len(jax.jit(Llama(cfg).apply).lower(shapes, tokens).as_text())

    small, deep = hlo_size(4), hlo_size(32)
    assert deep < 1.02 * small, (small, deep)


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_params():
    cfg = tiny(dtype="bfloat16")
    params = init(cfg)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    logits = Llama(cfg).apply(params, jnp.ones((1, 8), jnp.int32))
    ref = Llama(tiny()).apply(params, jnp.ones((1, 8), jnp.int32))
    assert logits.dtype == jnp.float32
    assert np.linalg.norm(logits - ref) / np.linalg.norm(ref) < 3e-2
