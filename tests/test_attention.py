"""Attention implementations against an independent float64 NumPy oracle written here."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax.model import attention, attention_table, blockwise
from llama_jax.model.attention import blockwise_attention, dot_product_attention, resolve_impl

TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def np_attention(q, k, v, do, *, causal=True, segment_ids=None):
    """float64 forward and backward, one head at a time: (o, dq, dk, dv).

    Causal is bottom-right aligned (query r sees keys c <= r + S - T); a row that sees no
    key outputs 0 and passes no gradient.
    """
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(H)
    visible = np.ones((B, T, S), bool)
    if causal:
        visible &= np.arange(S)[None, None, :] <= np.arange(T)[None, :, None] + (S - T)
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        visible &= seg[:, :, None] == seg[:, None, :]
    o, dq = np.zeros_like(q), np.zeros_like(q)
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    for b in range(B):
        for n in range(N):
            kh = n // (N // K)
            qn, kn, vn, don = q[b, :, n], k[b, :, kh], v[b, :, kh], do[b, :, n]
            s = np.where(visible[b], qn @ kn.T * scale, -np.inf)  # [T, S]
            row_max = s.max(-1, keepdims=True)
            p = np.exp(s - np.where(np.isfinite(row_max), row_max, 0.0))
            denom = p.sum(-1, keepdims=True)
            p = p / np.where(denom > 0, denom, 1.0)
            o[b, :, n] = p @ vn
            dp = don @ vn.T
            ds = p * (dp - (dp * p).sum(-1, keepdims=True))
            dq[b, :, n] = ds @ kn * scale
            dk[b, :, kh] += ds.T @ qn * scale
            dv[b, :, kh] += p.T @ don
    return o, dq, dk, dv


def rel_err(x, ref):
    """Norm-wise relative error; an all-zero reference makes it an absolute check."""
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1.0)


def make_inputs(B, T, S, N, K, H, dtype, segments, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape), dtype)
        for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H))
    )
    do = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
    seg = None
    if segments:  # packed documents: sorted ids, a few segments per row
        seg = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1), jnp.int32)
    return q, k, v, do, seg


def check_against_numpy(attn, q, k, v, do, seg, *, causal=True):
    def fwd_bwd(q, k, v, do):
        o, vjp = jax.vjp(attn, q, k, v)
        return o, vjp(do)

    o, grads = jax.jit(fwd_bwd)(q, k, v, do)
    ref = np_attention(q, k, v, do, causal=causal, segment_ids=seg)
    tol = TOL[jnp.dtype(q.dtype).name]
    assert o.shape == q.shape and o.dtype == q.dtype
    for name, x, r in zip(("o", "dq", "dk", "dv"), (o, *grads), ref):
        assert np.all(np.isfinite(np.asarray(x, np.float32))), name
        err = rel_err(x, r)
        assert err < tol, f"{name}: rel err {err:.3g} >= {tol}"
    return o, grads


# (dtype, N, K, T, block_q, block_k, segments): MHA and GQA, tiles that do and do not
# divide T (and tiles larger than T), with and without packed segments. T >= 128: slow compiles.
CASES = [
    ("float32", 2, 2, 1, 16, 16, False),
    ("float32", 4, 2, 7, 4, 3, True),
    ("float32", 4, 1, 7, 8, 8, False),
    pytest.param("float32", 4, 1, 128, 32, 32, False, marks=pytest.mark.slow),
    pytest.param("float32", 2, 2, 128, 48, 40, True, marks=pytest.mark.slow),
    pytest.param("float32", 4, 2, 1000, 128, 128, True, marks=pytest.mark.slow),
    pytest.param("float32", 2, 2, 1000, 256, 200, False, marks=pytest.mark.slow),
    ("bfloat16", 2, 2, 7, 4, 4, False),
    pytest.param("bfloat16", 4, 2, 128, 32, 32, True, marks=pytest.mark.slow),
    pytest.param("bfloat16", 4, 2, 1000, 256, 256, False, marks=pytest.mark.slow),
]


@pytest.fixture(params=["loops", pytest.param("unrolled", marks=pytest.mark.slow)])
def tile_loops(request, monkeypatch):
    """Both ways blockwise runs its tiles: XLA loops, or unrolled Python loops (what small
    problems get by default; slow: each tile is its own ops to compile)."""
    unrolled = request.param == "unrolled"
    monkeypatch.setattr(blockwise, "UNROLL_BUDGET_BYTES", 2**40 if unrolled else 0)
    return request.param


@pytest.mark.parametrize("dtype,N,K,T,bq,bk,segments", CASES)
def test_blockwise_matches_float64(dtype, N, K, T, bq, bk, segments, tile_loops):
    q, k, v, do, seg = make_inputs(1 if T == 1000 else 2, T, T, N, K, 16, dtype, segments)
    attn = lambda q, k, v: dot_product_attention(
        q, k, v, impl="blockwise", segment_ids=seg, block_q=bq, block_k=bk
    )
    check_against_numpy(attn, q, k, v, do, seg)


@pytest.mark.parametrize("skip,causal", [(False, True), (True, False)])
def test_blockwise_without_skipping_and_noncausal(skip, causal, tile_loops):
    q, k, v, do, seg = make_inputs(2, 100, 100, 4, 2, 16, "float32", True, seed=1)
    attn = lambda q, k, v: blockwise_attention(
        q, k, v, causal=causal, segment_ids=seg, block_q=32, block_k=24, skip_masked_blocks=skip
    )
    check_against_numpy(attn, q, k, v, do, seg, causal=causal)


def test_rows_without_visible_keys_are_zero_not_nan(tile_loops):
    # S < T with bottom-right causal alignment: the first T - S queries see no key at all.
    q, k, v, do, _ = make_inputs(2, 9, 5, 2, 1, 8, "float32", False, seed=2)
    attn = lambda q, k, v: blockwise_attention(q, k, v, block_q=4, block_k=2)
    o, _ = check_against_numpy(attn, q, k, v, do, None)
    np.testing.assert_array_equal(np.asarray(o)[:, :4], 0.0)


def test_reference_impl_matches_float64():
    q, k, v, do, seg = make_inputs(2, 33, 33, 4, 2, 16, "float32", True, seed=3)
    attn = lambda q, k, v: dot_product_attention(q, k, v, impl="reference", segment_ids=seg)
    check_against_numpy(attn, q, k, v, do, seg)


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_under_remat(axis_type):
    """Batch and heads sharded over 8 devices, under jit and jax.checkpoint: no collectives."""
    q, k, v, do, seg = make_inputs(2, 64, 64, 8, 4, 16, "float32", True, seed=4)
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(axis_type,) * 2)
    heads = NamedSharding(mesh, P("data", None, "tensor", None))
    q, k, v, do = (jax.device_put(x, heads) for x in (q, k, v, do))
    seg = jax.device_put(seg, NamedSharding(mesh, P("data", None)))
    attn = jax.checkpoint(
        lambda q, k, v: blockwise_attention(q, k, v, segment_ids=seg, block_q=16, block_k=16)
    )
    with jax.set_mesh(mesh):
        o, grads = check_against_numpy(attn, q, k, v, do, seg)
    for x in (o, *grads):
        assert x.sharding.spec == heads.spec


@pytest.mark.slow
def test_tiny_model_blockwise_matches_reference():
    """The scanned, rematerialized tiny Llama: logits and parameter grads agree to 1e-5."""
    from llama_jax.config import load
    from llama_jax.model.llama import Llama

    base = load("configs/tiny.py").model
    base = dataclasses.replace(base, n_layers=2, attn_block_q=16, attn_block_k=16)
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(0, base.vocab_size, (2, 40)), jnp.int32)
    seg = jnp.asarray(np.sort(rng.integers(0, 2, (2, 40)), axis=1), jnp.int32)
    init = jax.jit(Llama(dataclasses.replace(base, attention_impl="reference")).init)
    params = init(jax.random.PRNGKey(0), tokens, segment_ids=seg)

    def loss_and_grads(impl):
        model = Llama(dataclasses.replace(base, attention_impl=impl))
        loss = lambda p: jnp.mean(model.apply(p, tokens, segment_ids=seg) ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    (l_ref, g_ref), (l_bw, g_bw) = loss_and_grads("reference"), loss_and_grads("blockwise")
    assert abs(float(l_bw) - float(l_ref)) <= 1e-5 * abs(float(l_ref))
    for a, b in zip(jax.tree.leaves(g_bw), jax.tree.leaves(g_ref)):
        assert rel_err(a, np.asarray(b, np.float64)) < 1e-5


def temp_bytes(attn, T, B=1, N=8, H=64):
    """Compiled (never run) temp memory of value_and_grad through attn, float32."""
    x = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    loss = lambda q, k, v, ct: jnp.sum(attn(q, k, v) * ct)
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_blockwise_memory_is_linear_in_T():
    blockwise = lambda q, k, v: blockwise_attention(q, k, v, block_q=512, block_k=512)
    mem = {T: temp_bytes(blockwise, T) for T in (2048, 4096, 8192)}
    ref = temp_bytes(lambda q, k, v: attention.reference_attention(q, k, v), 8192)
    assert mem[8192] < 0.05 * ref, (mem, ref)
    assert mem[4096] <= 2.2 * mem[2048] and mem[8192] <= 2.2 * mem[4096], mem


def test_resolve_impl():
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert resolve_impl("auto", bf16, 128, False, backend="gpu") == "cudnn"
    assert resolve_impl("auto", jnp.float16, 64, False, backend="gpu") == "cudnn"
    assert resolve_impl("auto", f32, 128, False, backend="gpu") == "blockwise"
    assert resolve_impl("auto", bf16, 256, False, backend="gpu") == "blockwise"
    assert resolve_impl("auto", bf16, 100, False, backend="gpu") == "blockwise"
    assert resolve_impl("auto", bf16, 128, True, backend="gpu") == "blockwise"
    assert resolve_impl("auto", bf16, 128, False, backend="cpu") == "blockwise"
    assert resolve_impl("reference", bf16, 128, False, backend="gpu") == "reference"


def test_unknown_impl_lists_valid_names():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="blockwise.*cudnn.*reference.*auto"):
        dot_product_attention(q, q, q, impl="flash")
    with pytest.raises(ValueError, match="valid"):
        resolve_impl("xformers", jnp.float32, 8, False)


def test_auto_logs_its_choice(caplog, monkeypatch):
    monkeypatch.setattr(attention_table, "load", lambda path=None: TABLE)
    q = jnp.ones((1, 256, 2, 32))
    attention._logged_choices.clear()
    with caplog.at_level(logging.INFO, logger="llama_jax.model.attention"):
        for _ in range(2):  # logged once only; tracing is enough, so nothing is compiled
            jax.eval_shape(lambda q: dot_product_attention(q, q, q), q)
    msgs = [r.getMessage() for r in caplog.records if "attention impl" in r.getMessage()]
    assert msgs == [
        "attention impl: auto -> reference (measured on cpu float32 at T=256 H=32: "
        "reference 10 ms, blockwise 20 ms)"
    ]


TABLE = [  # two measured points of a made-up CPU
    {"platform": "cpu", "device": "cpu", "dtype": "float32", "T": 256, "H": 32,
     "ms": {"reference": 10.0, "blockwise": 20.0}},
    {"platform": "cpu", "device": "cpu", "dtype": "float32", "T": 1024, "H": 32,
     "ms": {"reference": 100.0, "blockwise": 50.0}},
    {"platform": "gpu", "device": "H100", "dtype": "bfloat16", "T": 4096, "H": 128,
     "ms": {"blockwise": 9.0, "cudnn": 1.0, "reference": 0.5}},
]  # fmt: skip


def test_auto_takes_the_fastest_measured_impl_that_fits(monkeypatch):
    monkeypatch.setattr(attention_table, "load", lambda path=None: TABLE)
    f32, bf16 = jnp.float32, jnp.bfloat16

    def auto(dtype, H, rows, T, backend="cpu", segments=False):
        shape = (rows, T, T)
        return resolve_impl("auto", dtype, H, segments, backend=backend, shape=shape)

    assert auto(f32, 32, 64, 256) == "reference"  # measured faster at T=256
    assert auto(f32, 32, 64, 300) == "reference"  # the nearest point is T=256
    assert auto(f32, 32, 64, 1024) == "blockwise"  # measured faster at T=1024
    # 1024 x 256 x 256 float32 probabilities are 256 MiB: over the reference's budget
    assert auto(f32, 32, 1024, 256) == "blockwise"
    assert auto(f32, 32, 64, 256, backend="gpu") == "blockwise"  # no gpu float32 entry
    assert auto(bf16, 128, 1, 4096, backend="gpu") == "reference"  # fits: 64 MiB, fastest
    assert auto(bf16, 128, 64, 4096, backend="gpu") == "cudnn"  # reference over budget
    assert auto(bf16, 128, 64, 4096, backend="gpu", segments=True) == "blockwise"
    assert resolve_impl("auto", bf16, 128, False, backend="gpu") == "cudnn"  # T unknown: rule


def test_the_packaged_table_measures_this_cpu_kind():
    """The table in the package has float32 CPU points over T and H (the benchmark wrote it)
    and every entry times blockwise, the implementation that always runs."""
    entries = attention_table.load()
    cpu = [e for e in entries if e["platform"] == "cpu" and e["dtype"] == "float32"]
    assert {e["T"] for e in cpu} >= {128, 256, 512, 1024} and len({e["H"] for e in cpu}) >= 2
    assert all(e["ms"]["blockwise"] > 0 for e in entries)
