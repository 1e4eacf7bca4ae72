"""Blockwise causal attention (Rabe & Staats 2021; FlashAttention-2's backward) in pure JAX.

Tiles of queries and keys with an online softmax, a custom VJP that saves only the output and
the per-row log-sum-exp, and causal key tiles above the diagonal skipped, not computed and
masked. flash_forward/flash_backward on tiled arrays are public so that a context-parallel
ring (parallel/context.py) can run them per key block and merge the blocks by their lse.

Dimension letters as in model/llama.py; tiled arrays add nq/nk (tile counts) and q/k (tile rows).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_BLOCK = 512  # tile rows when the caller passes none; the model passes its config's
# A finite "minus infinity" for masked scores and the initial running max: exp(NEG_INF - m)
# is exactly 0 for any real m, and NEG_INF - NEG_INF is 0, not the NaN that inf - inf gives.
NEG_INF = -1e30
# Small problems run their tile loops unrolled into one graph: no XLA loop machinery, static
# tile slices, independent tiles free to run side by side (+3-4% of the whole training step
# on CPU at T = 256-512). XLA may then keep every tile's scores live at once, so only while
# all of them (the [B, N, T, S] float32 matrix) fit UNROLL_BUDGET_BYTES, in <= UNROLL_TILES.
UNROLL_BUDGET_BYTES = 64 * 2**20
UNROLL_TILES = 64


class _Spec(NamedTuple):
    """Static facts the tiled kernels need (hashable: a nondiff argument of the custom VJP)."""

    T: int  # true (unpadded) query length
    S: int  # true key length; causal rows see keys c <= r + S - T (bottom-right aligned)
    causal: bool
    skip: bool  # skip key tiles that the causal mask hides entirely
    scale: float
    unroll: bool = False  # tile loops as Python loops: one flat graph (see UNROLL_*)
    indexed: bool = False  # causal by q/k index arrays (a shard of the sequence), not by tile


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
    if spec.indexed:  # every tile masked by index; _visit skips the hidden ones at run time
        return 0, nk
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
    if spec.indexed:
        return 0, nq
    full = spec.S // bk
    if not spec.causal:
        return 0, _where(j < full, 0, nq)
    offset = spec.S - spec.T
    lo = _clip((j * bk - offset) // bq, 0, nq) if spec.skip else 0
    mid = -((offset + 1 - (j + 1) * bk) // bq)  # ceil(((j+1)*bk - 1 - offset) / bq)
    mid = _where(j < full, _clip(mid, 0, nq), nq)
    return lo, _clip(mid, lo, nq)


def _tile_mask(i, j, qseg, kseg, bq, bk, spec: _Spec, positional: bool, qidx=None, kidx=None):
    """Which scores of tile (i, j) are visible: [B or 1, 1, 1, q, k] bools, or None for all.
    qidx, kidx: the tiles' [q] / [k] index arrays when spec.indexed (padding: -1 / IDX_PAD)."""
    mask = None
    if spec.indexed:
        mask = (kidx[None, :] <= qidx[:, None])[None]  # [1, q, k]; also hides padded keys
    elif positional:
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


def _visit(step, qidx, kidx, spec: _Spec):
    """step(carry) -> step run only where tile (qidx, kidx) has a visible score: indexed tiles
    are skipped at run time (the order of a shard's rows is data, not a static range)."""
    if not spec.indexed:
        return step
    return lambda carry: lax.cond(kidx.min() <= qidx.max(), step, lambda c: c, carry)


def _scores(qi, kj, mask, scale):
    s = jnp.einsum("BKGqH,BKkH->BKGqk", qi, kj, preferred_element_type=jnp.float32) * scale
    return s if mask is None else jnp.where(mask, s, NEG_INF)


def flash_forward(q, k, v, qseg, kseg, qidx, kidx, spec: _Spec):
    """q: [nq, B, K, G, q, H]; k, v: [nk, B, K, k, H]; segs: [nq, B, q] / [nk, B, k] or None;
    qidx, kidx: [nq, q] / [nk, k] ints when spec.indexed, else None.

    Returns o like q (q's dtype) and lse [nq, B, K, G, q] float32 (a row with no visible
    key: o 0 and lse -NEG_INF, which zeroes its p in the backward).
    """
    nq, bq = q.shape[0], q.shape[4]
    nk, bk = k.shape[0], k.shape[3]
    static = spec.unroll
    pick = lambda x, t: None if x is None else x[t]

    def query_tile(_, xs):
        i, qi, qsegi, qidxi = xs

        def step(j, carry, positional):
            def visit(carry):
                m, l, acc = carry  # running max, running sum [B, K, G, q]; acc [B, K, G, q, H]
                mask = _tile_mask(
                    i, j, qsegi, pick(kseg, j), bq, bk, spec, positional, qidxi, pick(kidx, j)
                )
                s = _scores(qi, k[j], mask, spec.scale)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])  # [B, K, G, q, k]
                alpha = jnp.exp(m - m_new)
                pv = jnp.einsum(
                    "BKGqk,BKkH->BKGqH", p.astype(v.dtype), v[j], preferred_element_type=jnp.float32
                )
                return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

            return _visit(visit, qidxi, pick(kidx, j), spec)(carry)

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

    none = jnp.zeros((nq, 0), jnp.int32)  # stands in for an absent per-tile input
    _, (o, lse) = _scan_tiles(
        lambda c, xs: query_tile(
            c, (xs[0], xs[1], *(None if a is None else x for a, x in zip((qseg, qidx), xs[2:])))
        ),
        None,
        (q, none if qseg is None else qseg, none if qidx is None else qidx),
        nq,
        static,
    )
    return o, lse


def flash_backward(q, k, v, qseg, kseg, qidx, kidx, o, lse, do, spec: _Spec):
    """FlashAttention-2 backward: per key tile, loop over the query tiles that see it,
    recomputing p = exp(s - lse); dk, dv accumulate in the loop, dq in a [nq, ...] carry.

    o and lse are the whole attention's (for a ring, the merged ones), so this also gives one
    key block's share of the gradients. Returns float32 (dq, dk, dv), tiled like q, k, v.
    """
    nq, bq = q.shape[0], q.shape[4]
    nk, bk = k.shape[0], k.shape[3]
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1)  # [nq, B, K, G, q]
    static = spec.unroll
    pick = lambda x, t: None if x is None else x[t]

    def key_tile(dq, xs):
        j, kj, vj, ksegj, kidxj = xs

        def step(i, carry, positional):
            def visit(carry):
                dq, dk, dv = carry
                qi, doi = q[i], do[i]
                mask = _tile_mask(
                    i, j, pick(qseg, i), ksegj, bq, bk, spec, positional, pick(qidx, i), kidxj
                )
                s = _scores(qi, kj, mask, spec.scale)
                p = jnp.exp(s - lse[i][..., None])  # [B, K, G, q, k]; masked, dead rows: 0
                dv = dv + jnp.einsum(
                    "BKGqk,BKGqH->BKkH", p.astype(do.dtype), doi,
                    preferred_element_type=jnp.float32,
                )  # fmt: skip
                dp = jnp.einsum("BKGqH,BKkH->BKGqk", doi, vj, preferred_element_type=jnp.float32)
                ds = (p * (dp - delta[i][..., None])).astype(q.dtype)
                dq = dq.at[i].add(
                    jnp.einsum("BKGqk,BKkH->BKGqH", ds, kj, preferred_element_type=jnp.float32)
                )
                dk = dk + jnp.einsum(
                    "BKGqk,BKGqH->BKkH", ds, qi, preferred_element_type=jnp.float32
                )
                return dq, dk, dv

            return _visit(visit, pick(qidx, i), kidxj, spec)(carry)

        zeros = jnp.zeros_like(kj, jnp.float32)  # [B, K, k, H]
        lo, mid = _bwd_query_range(j, bq, bk, nq, spec)
        carry = _fori(lo, mid, functools.partial(step, positional=True), (dq, zeros, zeros), static)
        dq, dk, dv = _fori(mid, nq, functools.partial(step, positional=False), carry, static)
        return dq, (dk * spec.scale, dv)

    none = jnp.zeros((nk, 0), jnp.int32)
    dq, (dk, dv) = _scan_tiles(
        lambda c, xs: key_tile(
            c, (*xs[:3], *(None if a is None else x for a, x in zip((kseg, kidx), xs[3:])))
        ),
        jnp.zeros_like(q, jnp.float32),
        (k, v, none if kseg is None else kseg, none if kidx is None else kidx),
        nk,
        static,
    )
    return dq * spec.scale, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, qseg, kseg, qidx, kidx, spec):
    return flash_forward(q, k, v, qseg, kseg, qidx, kidx, spec)[0]


def _flash_fwd(q, k, v, qseg, kseg, qidx, kidx, spec):
    o, lse = flash_forward(q, k, v, qseg, kseg, qidx, kidx, spec)
    return o, (q, k, v, qseg, kseg, qidx, kidx, o, lse)


def _flash_bwd(spec, res, do):
    q, k, v = res[:3]
    dq, dk, dv = flash_backward(*res, do, spec)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)

IDX_PAD = 2**30  # index of a padded key: after every query, so never visible


def _to_tiles(x, n, b, pad=0):
    """[B, T, ...] -> [n, B, ..., b, ...]: T padded with `pad` to n*b and split into tiles."""
    x = jnp.pad(x, [(0, 0), (0, n * b - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=pad)
    x = x.reshape(x.shape[0], n, b, *x.shape[2:])  # [B, n, b, ...]
    return jnp.moveaxis(x, 1, 0)  # [n, B, b, ...]


class Tiled(NamedTuple):
    """blockwise_attention's inputs cut into tiles (flash_forward's arguments but spec)."""

    q: jax.Array  # [nq, B, K, G, q, H]
    k: jax.Array  # [nk, B, K, k, H]
    v: jax.Array
    qseg: jax.Array | None  # [nq, B, q]
    kseg: jax.Array | None  # [nk, B, k]
    qidx: jax.Array | None  # [nq, q]
    kidx: jax.Array | None  # [nk, k]


def tile(q, k, v, *, causal=True, segment_ids=None, kv_segment_ids=None, q_index=None,
         k_index=None, block_q=None, block_k=None, skip_masked_blocks=True):  # fmt: skip
    """(Tiled, spec) of blockwise_attention's arguments (which it documents)."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if N % K:
        raise ValueError(f"query heads N={N} is not a multiple of kv heads K={K}")
    if segment_ids is not None and kv_segment_ids is None:
        if S != T:
            raise ValueError(f"segment_ids need S == T, got T={T}, S={S}")
        kv_segment_ids = segment_ids
    if (q_index is None) != (k_index is None) or (q_index is not None and not causal):
        raise ValueError("q_index and k_index go together, and only with causal=True")
    bq = min(block_q or DEFAULT_BLOCK, T)
    bk = min(block_k or DEFAULT_BLOCK, S)
    nq, nk = -(-T // bq), -(-S // bk)
    unroll = B * N * T * S * 4 <= UNROLL_BUDGET_BYTES and nq * nk <= UNROLL_TILES
    indexed = q_index is not None
    spec = _Spec(T, S, causal, skip_masked_blocks, 1.0 / math.sqrt(H), unroll, indexed)

    qt = _to_tiles(q.reshape(B, T, K, N // K, H), nq, bq)  # [nq, B, q, K, G, H]
    qt = qt.transpose(0, 1, 3, 4, 2, 5)  # [nq, B, K, G, q, H]
    kt = _to_tiles(k, nk, bk).transpose(0, 1, 3, 2, 4)  # [nk, B, K, k, H]
    vt = _to_tiles(v, nk, bk).transpose(0, 1, 3, 2, 4)
    qseg = kseg = qidx = kidx = None
    if segment_ids is not None:
        qseg = _to_tiles(segment_ids.astype(jnp.int32), nq, bq)  # [nq, B, q]
        kseg = _to_tiles(kv_segment_ids.astype(jnp.int32), nk, bk)  # [nk, B, k]
    if indexed:  # [T] -> [nq, q]; padded queries see nothing, padded keys are seen by none
        qidx = _to_tiles(q_index.astype(jnp.int32)[None], nq, bq, -1)[:, 0]
        kidx = _to_tiles(k_index.astype(jnp.int32)[None], nk, bk, IDX_PAD)[:, 0]
    return Tiled(qt, kt, vt, qseg, kseg, qidx, kidx), spec


def untile(o, B: int, T: int, N: int, H: int):
    """flash_forward's o [nq, B, K, G, q, H] -> [B, T, N, H]."""
    nq, K, G, bq = o.shape[0], o.shape[2], o.shape[3], o.shape[4]
    o = o.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, K, G, H)  # [B, T', K, G, H]
    return o.reshape(B, nq * bq, N, H)[:, :T]


def untile_kv(x, S: int):
    """A key-tiled [nk, B, K, k, H] array (flash_backward's dk, dv) -> [B, S, K, H]."""
    nk, B, K, bk, H = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(B, nk * bk, K, H)[:, :S]


def blockwise_attention(
    q, k, v, *, causal=True, segment_ids=None, block_q=None, block_k=None, skip_masked_blocks=True,
    kv_segment_ids=None, q_index=None, k_index=None,
):  # fmt: skip
    """Memory-efficient attention; memory O(T) and, when causal, about half the FLOPs.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H], N a multiple of K; bf16 or f32 (stats are f32).
      segment_ids: optional [B, T] ints (needs S == T unless kv_segment_ids [B, S] are given);
        a token sees only its own segment.
      block_q, block_k: tile rows (default DEFAULT_BLOCK, capped at T and S); any T works.
      skip_masked_blocks: False computes and masks the causal tiles above the diagonal too
        (for benchmarks and tests); the result is the same.
      q_index, k_index: optional [T] / [S] ints, each row's place in the whole sequence (a
        context-parallel shard): causal is then k_index <= q_index, and a tile with no such
        pair is skipped at run time.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    B, T, N, H = q.shape
    t, spec = tile(
        q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        q_index=q_index, k_index=k_index, block_q=block_q, block_k=block_k,
        skip_masked_blocks=skip_masked_blocks,
    )  # fmt: skip
    return untile(_flash(*t, spec), B, T, N, H)
