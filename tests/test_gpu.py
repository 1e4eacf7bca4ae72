"""GPU-only parity: cuDNN and blockwise attention against a float32 reference, and a model step.

Skipped (not passed) off GPU; launch/gpu_check.sh runs them first on an H100/H200. The
reference is the plain softmax(QK^T)V computed in float32 from the same bf16 inputs, so
the bound is bf16 rounding of the output (and of the cotangent path for gradients).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.model.attention import (
    blockwise_attention,
    cudnn_attention,
    reference_attention,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (cuDNN)")

IMPLS = {
    "cudnn": cudnn_attention,
    "blockwise": functools.partial(blockwise_attention, block_q=512, block_k=512),
}


def _inputs(B, T, N, K, H, dtype=jnp.bfloat16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), dtype)
    k = jax.random.normal(ks[1], (B, T, K, H), dtype)
    v = jax.random.normal(ks[2], (B, T, K, H), dtype)
    ct = jax.random.normal(ks[3], (B, T, N, H), dtype)
    return q, k, v, ct


def _f32(fn):
    """fn evaluated in float32 on upcast inputs: the reference for bf16 implementations."""
    return lambda q, k, v: fn(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))


def _fwd_bwd(attn, q, k, v, ct):
    out, vjp = jax.vjp(attn, q, k, v)
    return (out, *vjp(ct.astype(out.dtype)))


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("N,K", [(16, 16), (32, 4)], ids=["MHA", "GQA"])
@pytest.mark.parametrize("T", [1024, 2048])
def test_attention_matches_float32_reference(impl, N, K, T):
    q, k, v, ct = _inputs(2, T, N, K, 128)
    got = jax.jit(functools.partial(_fwd_bwd, IMPLS[impl]))(q, k, v, ct)
    ref = jax.jit(functools.partial(_fwd_bwd, _f32(reference_attention)))(q, k, v, ct)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert g.shape == r.shape
        scale = np.abs(r).max()
        err = np.abs(g - r).max() / scale
        # bf16 has 8 bits of mantissa (~4e-3 relative); gradients accumulate over T keys
        assert err < (2e-2 if name == "out" else 5e-2), (impl, name, err)


def test_cudnn_and_blockwise_agree_with_each_other():
    q, k, v, ct = _inputs(1, 4096, 16, 16, 128, seed=1)
    a = jax.jit(functools.partial(_fwd_bwd, IMPLS["cudnn"]))(q, k, v, ct)
    b = jax.jit(functools.partial(_fwd_bwd, IMPLS["blockwise"]))(q, k, v, ct)
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        assert np.abs(x - y).max() / np.abs(y).max() < 5e-2


def test_llama_step_on_gpu_cudnn_matches_blockwise_loss():
    """A small bf16 LLaMA's loss is the same (to bf16) with cudnn and blockwise attention."""
    from llama_jax.config import load
    from llama_jax.parallel import sharding as shd
    from llama_jax.train import step as ts

    losses = {}
    for impl in ("cudnn", "blockwise"):
        cfg = load(
            os.path.join(ROOT, "configs/tiny.py"),
            [
                "model.dtype=bfloat16",
                f"model.attention_impl={impl}",
                "model.dim=512",
                "model.n_heads=4",
                "model.n_kv_heads=2",
                "model.max_seq_len=1024",
                "model.attn_block_q=256",
                "model.attn_block_k=256",
                "train.seq_len=1024",
                "train.batch_size=4",
                "mesh.fsdp=1",
                "mesh.data=-1",
            ],
        )
        mesh = shd.make_mesh(*cfg.mesh.sizes, devices=jax.devices()[:1])
        state, shardings = ts.create_train_state(cfg, mesh)
        step = ts.make_train_step(cfg, mesh, shardings)
        toks = np.random.default_rng(0).integers(0, 2048, (4, 1025), dtype=np.int32)
        batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
        _, metrics = step(state, jax.device_put(batch, shd.batch_sharding(mesh)), {})
        losses[impl] = float(metrics["loss"])
    assert np.isfinite(losses["cudnn"])
    assert abs(losses["cudnn"] - losses["blockwise"]) < 2e-2 * abs(losses["blockwise"]), losses


@pytest.mark.parametrize("impl", ["cudnn", "blockwise"])
def test_bf16_gradients_match_float32_on_gpu(impl):
    """tests/test_bf16.py's fidelity check on the GPU, through the cuDNN attention path too:
    the tiny model in bf16 (float32 master weights, float32 residual stream) on Zipf tokens
    against the float32 model, every gradient leaf within 8u relative L2 and cosine 0.999
    (the bound is derived in tests/test_bf16.py). On a GPU bf16 matmuls really round their
    inputs (XLA:CPU computes them in float32), so this is the check that counts."""
    from tests import test_bf16 as b

    params = b._params(b.TINY)
    want = b._grads(b.TINY, params, "float32", "none", "reference")
    b._check(b._grads(b.TINY, params, "bfloat16", "save_linear", impl), want, f"gpu {impl}")


@pytest.mark.parametrize("impl", list(IMPLS))
def test_packed_example_attends_only_to_itself_on_gpu(impl):
    """Document masking on GPU: example B's attention output is the same packed after A
    (segment 2) as alone. Both sides run the same bf16 kernel on the same B rows; only masked
    (exactly zero) probabilities and the softmax's reduction order differ, so the bound is one
    bf16 rounding of the output: 2^-8 relative, 1e-2 absolute on unit-scale values."""
    q, k, v, _ = _inputs(1, 1024, 16, 4, 128)
    a = 384  # A's length; B is the remaining 640 tokens
    seg = jnp.concatenate([jnp.ones((1, a), jnp.int32), jnp.full((1, 1024 - a), 2, jnp.int32)], 1)
    packed = IMPLS[impl](q, k, v, causal=True, segment_ids=seg)[:, a:]
    qb, kb, vb = q[:, a:], k[:, a:], v[:, a:]
    pad = lambda x: jnp.pad(x, ((0, 0), (0, a), (0, 0), (0, 0)))  # noqa: E731  (T = 1024 again)
    alone = IMPLS[impl](pad(qb), pad(kb), pad(vb), causal=True)[:, : 1024 - a]
    np.testing.assert_allclose(np.asarray(packed, np.float32), np.asarray(alone, np.float32),
                               rtol=2**-8, atol=1e-2)  # fmt: skip
