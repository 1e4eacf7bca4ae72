"""Causal attention behind one entry point; the model calls only dot_product_attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reference_attention(q, k, v, *, causal=True, segment_ids=None, **_):
    """Plain softmax(QK^T/sqrt(H))V that stores the [B, N, T, S] matrix: the test oracle."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    s = s * (H**-0.5)
    S = k.shape[1]
    mask = jnp.ones((T, S), bool)
    if causal:
        mask = jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :]
    mask = mask[None, None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, None, :, None] == segment_ids[:, None, None, None, :])
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask, p, 0.0)  # rows with no visible key (padding) give zeros, not NaN
    o = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v)
    return o.reshape(B, T, N, H)


IMPLEMENTATIONS = {"reference": reference_attention}


def dot_product_attention(
    q, k, v, *, impl="auto", causal=True, segment_ids=None, block_q=None, block_k=None
):
    """Multi-head attention with grouped-query support.

    Args:
      q: [B, T, N, H] queries; k, v: [B, S, K, H] keys and values, N a multiple of K.
      impl: a name in IMPLEMENTATIONS, or "auto".
      segment_ids: optional [B, T] ints; tokens attend only within their own segment.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    if impl == "auto":
        impl = "reference"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention impl {impl!r}; valid: {sorted(IMPLEMENTATIONS) + ['auto']}")
    out = IMPLEMENTATIONS[impl](
        q, k, v, causal=causal, segment_ids=segment_ids, block_q=block_q, block_k=block_k
    )
    return out.astype(q.dtype)
