"""Causal attention behind one entry point; the model calls only dot_product_attention.

Implementations, chosen by name (model.attention_impl):
  reference  plain softmax(QK^T)V that stores the [B, N, T, S] matrix: the test oracle.
  blockwise  memory-efficient attention (Rabe & Staats 2021; FlashAttention-2's backward):
             tiles of queries and keys with an online softmax, a custom VJP that saves only
             the output and the per-row log-sum-exp, and causal key tiles above the diagonal
             skipped, not computed and masked. Pure JAX, so it runs on every backend.
  cudnn      jax.nn.dot_product_attention(..., implementation="cudnn") on NVIDIA GPUs.
  auto       the fastest of those that can run this call, as measured on this kind of device
             (attention_table.py); without a measurement cudnn where it runs, else blockwise.

Dimension letters as in model/llama.py; tiled arrays add nq/nk (tile counts) and q/k (tile rows).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from llama_jax.config_fields import ATTENTION_IMPLS
from llama_jax.model import attention_table

logger = logging.getLogger(__name__)

DEFAULT_BLOCK = 512  # tile rows when the caller passes none; the model passes its config's
# A finite "minus infinity" for masked scores and the initial running max: exp(NEG_INF - m)
# is exactly 0 for any real m, and NEG_INF - NEG_INF is 0, not the NaN that inf - inf gives.
NEG_INF = -1e30
SCOPE = "attention_kernel"  # named scope of the kernel's ops, forward and backward
# Small problems run their tile loops unrolled into one graph: no XLA loop machinery, static
# tile slices, independent tiles free to run side by side (+3-4% of the whole training step
# on CPU at T = 256-512). XLA may then keep every tile's scores live at once, so only while
# all of them (the [B, N, T, S] float32 matrix) fit UNROLL_BUDGET_BYTES, in <= UNROLL_TILES.
UNROLL_BUDGET_BYTES = 64 * 2**20
UNROLL_TILES = 64


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


# ----------------------------------------------------------------------------- blockwise


class _Spec(NamedTuple):
    """Static facts the tiled kernels need (hashable: a nondiff argument of the custom VJP)."""

    T: int  # true (unpadded) query length
    S: int  # true key length; causal rows see keys c <= r + S - T (bottom-right aligned)
    causal: bool
    skip: bool  # skip key tiles that the causal mask hides entirely
    scale: float
    unroll: bool = False  # tile loops as Python loops: one flat graph (see UNROLL_*)


def _fori(lo, hi, body, carry, static: bool):
    """lax.fori_loop, or with static bounds a Python loop, unrolled into the graph."""
    if not static:
        return lax.fori_loop(lo, hi, body, carry)
    for j in range(int(lo), int(hi)):
        carry = body(j, carry)
    return carry


def _scan_tiles(body, carry, xs, n: int, static: bool):
    """lax.scan of body(carry, (i, *x[i] for x in xs)) over tiles i < n; with static, a Python
    loop in which i is a Python int, so that tile ranges and slices are static too."""
    if not static:
        return lax.scan(body, carry, (jnp.arange(n), *xs))
    ys = []
    for i in range(n):
        carry, y = body(carry, (i, *(x[i] for x in xs)))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _clip(x, lo, hi):  # Python ints (unrolled loops) stay Python ints
    return max(lo, min(x, hi)) if isinstance(x, int) else jnp.clip(x, lo, hi)


def _where(c, a, b):
    return (a if c else b) if isinstance(c, bool) else jnp.where(c, a, b)


def _fwd_key_range(i, bq, bk, nk, spec: _Spec):
    """Key tiles of query tile i: [0, lo) need no position mask, [lo, hi) do, [hi, nk) are skipped."""
    full = spec.S // bk  # tiles with no padded keys
    if not spec.causal:
        return full, nk
    offset = spec.S - spec.T
    last_row = _clip((i + 1) * bq, 0, spec.T) - 1
    hi = _clip((last_row + offset) // bk + 1, 0, nk) if spec.skip else nk
    lo = _clip((i * bq + offset + 1) // bk, 0, full)  # tiles every row sees in full
    return _clip(lo, 0, hi), hi


def _bwd_query_range(j, bq, bk, nq, spec: _Spec):
    """Query tiles of key tile j: [lo, mid) need a position mask, [mid, nq) do not, [0, lo) skipped.

    The same (query tile, key tile) pairs as _fwd_key_range, seen from the key side.
    """
    full = spec.S // bk
    if not spec.causal:
        return 0, _where(j < full, 0, nq)
    offset = spec.S - spec.T
    lo = _clip((j * bk - offset) // bq, 0, nq) if spec.skip else 0
    mid = -((offset + 1 - (j + 1) * bk) // bq)  # ceil(((j+1)*bk - 1 - offset) / bq)
    mid = _where(j < full, _clip(mid, 0, nq), nq)
    return lo, _clip(mid, lo, nq)


def _tile_mask(i, j, qseg, kseg, bq, bk, spec: _Spec, positional: bool):
    """Which scores of tile (i, j) are visible: [B or 1, 1, 1, q, k] bools, or None for all."""
    mask = None
    if positional:
        rows = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        cols = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        mask = cols < spec.S  # padded keys
        if spec.causal:
            mask = mask & (cols <= rows + (spec.S - spec.T))
        mask = mask[None]  # [1, q, k]
    if qseg is not None:
        same = qseg[:, :, None] == kseg[:, None, :]  # [B, q, k]
        mask = same if mask is None else mask & same
    return None if mask is None else mask[:, None, None]


def _scores(qi, kj, mask, scale):
    s = jnp.einsum("BKGqH,BKkH->BKGqk", qi, kj, preferred_element_type=jnp.float32) * scale
    return s if mask is None else jnp.where(mask, s, NEG_INF)


def _flash_fwd_impl(q, k, v, qseg, kseg, spec: _Spec):
    """q: [nq, B, K, G, q, H]; k, v: [nk, B, K, k, H]; segs: [nq, B, q] / [nk, B, k] or None.

    Returns o like q (q's dtype) and lse [nq, B, K, G, q] float32.
    """
    nq, bq = q.shape[0], q.shape[4]
    nk, bk = k.shape[0], k.shape[3]
    static = spec.unroll

    def query_tile(_, xs):
        i, qi, qsegi = xs

        def step(j, carry, positional):
            m, l, acc = carry  # running max, running sum [B, K, G, q]; acc [B, K, G, q, H]
            kseg_j = None if kseg is None else kseg[j]
            s = _scores(
                qi, k[j], _tile_mask(i, j, qsegi, kseg_j, bq, bk, spec, positional), spec.scale
            )
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])  # [B, K, G, q, k]
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum(
                "BKGqk,BKkH->BKGqH", p.astype(v.dtype), v[j], preferred_element_type=jnp.float32
            )
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        # *_like keeps qi's sharding on the carries (needed with explicit mesh axes).
        acc = jnp.zeros_like(qi, jnp.float32)  # [B, K, G, q, H]
        carry = (jnp.full_like(acc[..., 0], NEG_INF), jnp.zeros_like(acc[..., 0]), acc)
        lo, hi = _fwd_key_range(i, bq, bk, nk, spec)
        carry = _fori(0, lo, functools.partial(step, positional=False), carry, static)
        m, l, acc = _fori(lo, hi, functools.partial(step, positional=True), carry, static)
        # A row that saw only masked scores still has m == NEG_INF (its masked p were
        # exp(0) = 1, so l and acc hold junk): it outputs 0 and an lse that zeroes its p.
        dead = m <= NEG_INF / 2
        l = jnp.where(dead, 1.0, l)
        o = jnp.where(dead[..., None], 0.0, acc / l[..., None])
        lse = jnp.where(dead, -NEG_INF, m + jnp.log(l))
        return None, (o.astype(q.dtype), lse)

    segs = qseg if qseg is not None else jnp.zeros((nq, 0), jnp.int32)
    _, (o, lse) = _scan_tiles(
        lambda c, xs: query_tile(c, (xs[0], xs[1], None if qseg is None else xs[2])),
        None,
        (q, segs),
        nq,
        static,
    )
    return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, qseg, kseg, spec):
    return _flash_fwd_impl(q, k, v, qseg, kseg, spec)[0]


def _flash_fwd(q, k, v, qseg, kseg, spec):
    o, lse = _flash_fwd_impl(q, k, v, qseg, kseg, spec)
    return o, (q, k, v, qseg, kseg, o, lse)


def _flash_bwd(spec, res, do):
    """FlashAttention-2 backward: per key tile, loop over the query tiles that see it,
    recomputing p = exp(s - lse); dk, dv accumulate in the loop, dq in a [nq, ...] carry."""
    q, k, v, qseg, kseg, o, lse = res
    nq, bq = q.shape[0], q.shape[4]
    nk, bk = k.shape[0], k.shape[3]
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1)  # [nq, B, K, G, q]
    static = spec.unroll

    def key_tile(dq, xs):
        j, kj, vj, ksegj = xs

        def step(i, carry, positional):
            dq, dk, dv = carry
            qi, doi = q[i], do[i]
            qseg_i = None if qseg is None else qseg[i]
            s = _scores(
                qi, kj, _tile_mask(i, j, qseg_i, ksegj, bq, bk, spec, positional), spec.scale
            )
            p = jnp.exp(s - lse[i][..., None])  # [B, K, G, q, k]; masked and dead rows give 0
            dv = dv + jnp.einsum(
                "BKGqk,BKGqH->BKkH", p.astype(do.dtype), doi, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum("BKGqH,BKkH->BKGqk", doi, vj, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta[i][..., None])).astype(q.dtype)
            dq = dq.at[i].add(
                jnp.einsum("BKGqk,BKkH->BKGqH", ds, kj, preferred_element_type=jnp.float32)
            )
            dk = dk + jnp.einsum("BKGqk,BKGqH->BKkH", ds, qi, preferred_element_type=jnp.float32)
            return dq, dk, dv

        zeros = jnp.zeros_like(kj, jnp.float32)  # [B, K, k, H]
        lo, mid = _bwd_query_range(j, bq, bk, nq, spec)
        carry = _fori(lo, mid, functools.partial(step, positional=True), (dq, zeros, zeros), static)
        dq, dk, dv = _fori(mid, nq, functools.partial(step, positional=False), carry, static)
        return dq, ((dk * spec.scale).astype(k.dtype), dv.astype(v.dtype))

    segs = kseg if kseg is not None else jnp.zeros((nk, 0), jnp.int32)
    dq, (dk, dv) = _scan_tiles(
        lambda c, xs: key_tile(c, (*xs[:3], None if kseg is None else xs[3])),
        jnp.zeros_like(q, jnp.float32),
        (k, v, segs),
        nk,
        static,
    )
    return (dq * spec.scale).astype(q.dtype), dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _to_tiles(x, n, b):
    """[B, T, ...] -> [n, B, ..., b, ...]: T padded with zeros to n*b and split into tiles."""
    x = jnp.pad(x, [(0, 0), (0, n * b - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(x.shape[0], n, b, *x.shape[2:])  # [B, n, b, ...]
    return jnp.moveaxis(x, 1, 0)  # [n, B, b, ...]


def blockwise_attention(
    q, k, v, *, causal=True, segment_ids=None, block_q=None, block_k=None, skip_masked_blocks=True
):
    """Memory-efficient attention; memory O(T) and, when causal, about half the FLOPs.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H], N a multiple of K; bf16 or f32 (stats are f32).
      segment_ids: optional [B, T] ints (needs S == T); a token sees only its own segment.
      block_q, block_k: tile rows (default DEFAULT_BLOCK, capped at T and S); any T works.
      skip_masked_blocks: False computes and masks the causal tiles above the diagonal too
        (for benchmarks and tests); the result is the same.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if N % K:
        raise ValueError(f"query heads N={N} is not a multiple of kv heads K={K}")
    if segment_ids is not None and S != T:
        raise ValueError(f"segment_ids need S == T, got T={T}, S={S}")
    bq = min(block_q or DEFAULT_BLOCK, T)
    bk = min(block_k or DEFAULT_BLOCK, S)
    nq, nk = -(-T // bq), -(-S // bk)
    unroll = B * N * T * S * 4 <= UNROLL_BUDGET_BYTES and nq * nk <= UNROLL_TILES
    spec = _Spec(T, S, causal, skip_masked_blocks, 1.0 / math.sqrt(H), unroll)

    qt = _to_tiles(q.reshape(B, T, K, N // K, H), nq, bq)  # [nq, B, q, K, G, H]
    qt = qt.transpose(0, 1, 3, 4, 2, 5)  # [nq, B, K, G, q, H]
    kt = _to_tiles(k, nk, bk).transpose(0, 1, 3, 2, 4)  # [nk, B, K, k, H]
    vt = _to_tiles(v, nk, bk).transpose(0, 1, 3, 2, 4)
    qseg = kseg = None
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        qseg, kseg = _to_tiles(seg, nq, bq), _to_tiles(seg, nk, bk)  # [nq, B, q], [nk, B, k]

    o = _flash(qt, kt, vt, qseg, kseg, spec)  # [nq, B, K, G, q, H]
    o = o.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, K, N // K, H)  # [B, T', K, G, H]
    o = o.reshape(B, nq * bq, N, H)
    return o[:, :T]


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
