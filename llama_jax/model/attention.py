"""Causal attention behind one entry point; the model calls only dot_product_attention.

Implementations, chosen by name (model.attention_impl):
  reference  plain softmax(QK^T)V that stores the [B, N, T, S] matrix: the test oracle.
  blockwise  memory-efficient attention (Rabe & Staats 2021; FlashAttention-2's backward):
             tiles of queries and keys with an online softmax, a custom VJP that saves only
             the output and the per-row log-sum-exp, and causal key tiles above the diagonal
             skipped, not computed and masked. Pure JAX, so it runs on every backend
             (model/blockwise.py).
  cudnn      jax.nn.dot_product_attention(..., implementation="cudnn") on NVIDIA GPUs.
  auto       the fastest of those that can run this call, as measured on this kind of device
             (attention_table.py); without a measurement cudnn where it runs, else blockwise.

Dimension letters as in model/llama.py; tiled arrays add nq/nk (tile counts) and q/k (tile rows).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from llama_jax.config_fields import ATTENTION_IMPLS
from llama_jax.model import attention_table, blockwise
from llama_jax.model.blockwise import blockwise_attention

logger = logging.getLogger(__name__)

DEFAULT_BLOCK = blockwise.DEFAULT_BLOCK
SCOPE = "attention_kernel"  # named scope of the kernel's ops, forward and backward


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


# ----------------------------------------------------------------------------- cudnn, auto


def cudnn_attention(q, k, v, *, causal=True, segment_ids=None, **_):
    """cuDNN flash attention (NVIDIA GPUs, bf16/fp16, H <= 128 and a multiple of 8).

    With segment_ids the mask is passed as a [B, 1, T, S] boolean array: O(T^2) memory,
    which is why "auto" picks blockwise for packed documents.
    """
    if causal and q.shape[1] != k.shape[1]:
        # cuDNN aligns the causal mask top-left, every other impl bottom-right: refuse rather
        # than silently change which keys a query sees.
        raise ValueError(
            f"cudnn attention needs T == S when causal, got T={q.shape[1]}, "
            f"S={k.shape[1]}; use impl='blockwise'"
        )
    mask = None
    if segment_ids is not None:
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [B, 1, T, S]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, implementation="cudnn"
    )


IMPLEMENTATIONS = {
    "reference": reference_attention,
    "blockwise": blockwise_attention,
    "cudnn": cudnn_attention,
}
VALID_IMPLS = sorted(IMPLEMENTATIONS) + ["auto"]
if tuple(VALID_IMPLS) != ATTENTION_IMPLS:  # the schema names the choices; this table serves them
    raise ImportError(
        f"config_fields.ATTENTION_IMPLS {ATTENTION_IMPLS} != the implemented {VALID_IMPLS}"
    )


def _cudnn_unusable(backend: str, dtype, head_dim: int, has_segments: bool) -> str:
    """Why cudnn cannot run this call ("" when it can)."""
    if backend != "gpu":
        return f"backend is {backend}"
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cudnn needs bf16/fp16, got {dtype.name}"
    if head_dim > 128 or head_dim % 8:
        return f"cudnn needs head_dim <= 128 and a multiple of 8, got {head_dim}"
    if has_segments:
        return "segment_ids would need an O(T^2) mask in cudnn"
    return ""


def _resolve(
    impl: str,
    dtype,
    head_dim: int,
    has_segments: bool,
    backend: str | None,
    shape: tuple[int | None, int | None, int | None] = (None, None, None),
) -> tuple[str, str]:
    """(implementation, reason) for a name. "auto" takes the fastest measured one that this
    call can use (attention_table.py), else cudnn where it runs, else blockwise.
    shape: (rows = B * N, T, S) of the call, where known."""
    if impl not in VALID_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; valid: {VALID_IMPLS}")
    if impl != "auto":
        return impl, "requested"
    backend = backend or jax.default_backend()
    dtype = jnp.dtype(dtype)
    rows, T, S = shape
    no_cudnn = _cudnn_unusable(backend, dtype, head_dim, has_segments)
    if not no_cudnn and T is not None and S is not None and T != S:
        no_cudnn = "causal with T != S"  # cuDNN aligns the causal mask top-left, ours bottom-right
    candidates = ["blockwise"] + ["cudnn"] * (not no_cudnn)
    candidates += ["reference"] * attention_table.reference_fits(rows, T, S)
    measured = attention_table.choose(backend, dtype.name, T, head_dim, candidates)
    if measured is not None:
        return measured
    if no_cudnn:
        return "blockwise", no_cudnn
    return "cudnn", f"gpu, {dtype.name}, head_dim {head_dim} (no measurement in the table)"


def resolve_impl(
    impl: str,
    dtype,
    head_dim: int,
    has_segments: bool,
    *,
    backend: str | None = None,
    shape: tuple[int | None, int | None, int | None] = (None, None, None),
) -> str:
    """The implementation dot_product_attention runs for these settings ("auto" resolved);
    shape is (B * N, T, S) of the call where known (the measured table needs T)."""
    return _resolve(impl, dtype, head_dim, has_segments, backend, shape)[0]


_logged_choices: set = set()


def dot_product_attention(
    q, k, v, *, impl="auto", causal=True, segment_ids=None, block_q=None, block_k=None
):
    """Multi-head attention with grouped-query support.

    Args:
      q: [B, T, N, H] queries; k, v: [B, S, K, H] keys and values, N a multiple of K.
      impl: a name in IMPLEMENTATIONS, or "auto".
      segment_ids: optional [B, T] ints; tokens attend only within their own segment.
      block_q, block_k: tile sizes of "blockwise" (others ignore them).
    Returns:
      [B, T, N, H] in q's dtype.
    """
    B, T, N, H = q.shape
    shape = (B * N, T, k.shape[1] if causal else T)
    name, reason = _resolve(impl, q.dtype, H, segment_ids is not None, None, shape)
    if impl == "auto" and (name, reason) not in _logged_choices:
        _logged_choices.add((name, reason))
        logger.info("attention impl: auto -> %s (%s)", name, reason)
    with jax.named_scope(SCOPE):  # the profile's "attention" category (bench/profile.py)
        out = IMPLEMENTATIONS[name](
            q, k, v, causal=causal, segment_ids=segment_ids, block_q=block_q, block_k=block_k
        )
    return out.astype(q.dtype)
