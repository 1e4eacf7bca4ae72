"""Context parallelism: the sequence split over the mesh's "context" axis for the whole model.

Layout. With P context shards the T positions of a row are cut into 2P chunks and shard r
holds chunks r and 2P-1-r (zig-zag, or "dual chunk"): under the causal mask every shard then
has an early and a late chunk, so the work per shard is the same. `to_zigzag` reorders a
batch once, at the input of the step (tokens, targets, mask, the true positions that RoPE
reads, segment ids); the summed loss does not depend on the order. Every activation's
sequence dim is then split over "context" by the logical rules (sharding.py).

Attention is the one place that needs keys of other shards. `attention(mesh, mesh_cfg)` is an
interceptor (nn.intercept_methods) of the model's Attention.attend, which runs it inside
shard_map over "context" (the other axes stay automatic):
  all_gather  K/V (and their segment ids) gathered along the sequence per layer; the
              blockwise kernel runs the local queries against them with each row's place
              in the sequence (q_index/k_index), skipping fully masked tiles.
  ring        K/V blocks passed around the ring with ppermute (P-1 sends forward), each
              block through the blockwise kernel and the partial outputs merged by their
              log-sum-exp; the backward (its own VJP) passes the blocks around again with
              their dK/dV. No device holds more than two blocks of K/V at a time.
The model holds no mesh name: this module is the parallel layer's, applied from outside.
"""

from __future__ import annotations

import contextlib
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from llama_jax.config import MeshConfig
from llama_jax.model import blockwise
from llama_jax.model.blockwise import NEG_INF

AXIS = "context"
SEQUENCE_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def zigzag_order(T: int, shards: int) -> np.ndarray:
    """[T] original index of each position of the zig-zag layout; shard r's rows are
    order[r * T / shards : (r + 1) * T / shards], chunks r and 2 * shards - 1 - r."""
    if T % (2 * shards):
        raise ValueError(
            f"train.seq_len={T} must be a multiple of 2 x mesh.context = {2 * shards} "
            "(each context shard holds two equal chunks)"
        )
    chunks = np.arange(T).reshape(2 * shards, T // (2 * shards))
    return np.concatenate([chunks[i] for r in range(shards) for i in (r, 2 * shards - 1 - r)])


def to_zigzag(batch: dict, shards: int) -> dict:
    """The batch's [B, T] arrays in zig-zag order (positions added: the true 0..T-1)."""
    if shards == 1:
        return batch
    B, T = batch["targets"].shape
    order = zigzag_order(T, shards)
    batch = dict(batch)
    if batch.get("positions") is None:
        batch["positions"] = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return {
        k: (x[:, order] if k in SEQUENCE_KEYS and x is not None else x) for k, x in batch.items()
    }


def _shard_index(T_local: int, shards: int, r):
    """[T_local] original indices of shard r's rows (r may be traced)."""
    order = jnp.asarray(zigzag_order(T_local * shards, shards).reshape(shards, T_local))
    return order[r]


# ------------------------------------------------------------------------------ all_gather


def _all_gather_attention(q, k, v, seg, shards: int, block: int):
    """Inside shard_map: local queries against the gathered keys; autodiff of all_gather is
    the reduce-scatter of dK/dV."""
    T = q.shape[1]
    r = lax.axis_index(AXIS)
    gather = lambda x: lax.all_gather(x, AXIS, axis=1, tiled=True)
    k_index = jnp.asarray(zigzag_order(T * shards, shards))  # the gathered order
    return blockwise.blockwise_attention(
        q, gather(k), gather(v), segment_ids=seg,
        kv_segment_ids=None if seg is None else gather(seg),
        q_index=_shard_index(T, shards, r), k_index=k_index, block_q=block, block_k=block,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ ring


def _ring_perm(shards: int):
    return [(i, (i + 1) % shards) for i in range(shards)]  # shard i sends to i + 1


def _merge(o, lse, o_s, lse_s):
    """Two partial softmax results over disjoint key blocks -> the result over both: each
    weighted by exp(its lse - the joint lse). A row that saw no key has lse NEG_INF here."""
    lse_s = jnp.where(lse_s >= -NEG_INF / 2, NEG_INF, lse_s)  # the kernel's dead-row lse
    joint = jnp.logaddexp(lse, lse_s)
    w, w_s = jnp.exp(lse - joint), jnp.exp(lse_s - joint)
    return o * w[..., None] + o_s.astype(jnp.float32) * w_s[..., None], joint


def _ring_tiles(q, k, v, seg, shards, block):
    T = q.shape[1]
    r = lax.axis_index(AXIS)
    idx = _shard_index(T, shards, r)
    return blockwise.tile(
        q, k, v, segment_ids=seg, q_index=idx, k_index=idx, block_q=block, block_k=block
    )


def _key_index(t: blockwise.Tiled, T: int, shards: int, step: int):
    """Tiled key indices of the block a shard holds at ring step `step` (that of r - step)."""
    src = (lax.axis_index(AXIS) - step) % shards
    idx = _shard_index(T, shards, src)
    nk, bk = t.kidx.shape
    return jnp.pad(idx, (0, nk * bk - T), constant_values=blockwise.IDX_PAD).reshape(nk, bk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring_attention(q, k, v, seg, shards: int, block: int):
    return _ring_fwd(q, k, v, seg, shards, block)[0]


def _ring_fwd(q, k, v, seg, shards, block):
    B, T, N, H = q.shape
    t, spec = _ring_tiles(q, k, v, seg, shards, block)
    kt, vt, kseg = t.k, t.v, t.kseg
    o = jnp.zeros(t.q.shape, jnp.float32)
    lse = jnp.full(t.q.shape[:-1], NEG_INF, jnp.float32)
    for s in range(shards):
        kidx = _key_index(t, T, shards, s)
        o_s, lse_s = blockwise.flash_forward(t.q, kt, vt, t.qseg, kseg, t.qidx, kidx, spec)
        o, lse = _merge(o, lse, o_s, lse_s)
        if s < shards - 1:
            kt, vt, kseg = lax.ppermute((kt, vt, kseg), AXIS, _ring_perm(shards))
    dead = lse <= NEG_INF / 2
    lse = jnp.where(dead, -NEG_INF, lse)  # the kernel's convention: zeroes p in the backward
    o = jnp.where(dead[..., None], 0.0, o).astype(q.dtype)
    return blockwise.untile(o, B, T, N, H), (q, k, v, seg, o, lse)


def _ring_bwd(shards, block, res, do):
    q, k, v, seg, o, lse = res
    B, T, N, H = q.shape
    t, spec = _ring_tiles(q, k, v, seg, shards, block)
    dot = _ring_tiles(do, k, v, None, shards, block)[0].q  # do tiled like q
    kt, vt, kseg = t.k, t.v, t.kseg
    dq = jnp.zeros(t.q.shape, jnp.float32)
    dk = dv = jnp.zeros(t.k.shape, jnp.float32)
    for s in range(shards):
        kidx = _key_index(t, T, shards, s)
        grads = blockwise.flash_backward(t.q, kt, vt, t.qseg, kseg, t.qidx, kidx, o, lse, dot, spec)
        dq, dk, dv = dq + grads[0], dk + grads[1], dv + grads[2]
        if s < shards - 1:
            kt, vt, kseg = lax.ppermute((kt, vt, kseg), AXIS, _ring_perm(shards))
        # dK/dV travel with their block; the shards-th send brings them home
        dk, dv = lax.ppermute((dk, dv), AXIS, _ring_perm(shards))
    dq = blockwise.untile(dq, B, T, N, H)
    dk, dv = (blockwise.untile_kv(x, T) for x in (dk, dv))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring_attention.defvjp(_ring_fwd, _ring_bwd)

STRATEGIES = {  # fn(q, k, v, segment_ids or None, shards, block) inside shard_map
    "all_gather": _all_gather_attention,
    "ring": _ring_attention,
}


# ------------------------------------------------------------------------------ the seam


def context_attention(q, k, v, segment_ids, *, mesh: Mesh, strategy: str, block: int):
    """Causal attention of zig-zag-ordered [B, T, N, H] queries over keys/values split along T
    over mesh's context axis (segment_ids [B, T] or None), by `strategy`; `block` is the tile
    size (a divisor of a chunk, T / (2 context))."""
    shards = mesh.shape[AXIS]
    fn = STRATEGIES[strategy]
    seq = P(None, AXIS)
    if segment_ids is None:
        body = lambda q, k, v: fn(q, k, v, None, shards, block)
        args = (q, k, v)
    else:
        body = lambda q, k, v, seg: fn(q, k, v, seg, shards, block)
        args = (q, k, v, segment_ids)
    mapped = jax.shard_map(
        body, mesh=mesh, in_specs=(seq,) * len(args), out_specs=seq, axis_names={AXIS}
    )
    return mapped(*args)


def _attend(mesh: Mesh, strategy: str, module, q, k, v, segment_ids):
    """Attention.attend of `module` (its cfg: the tile sizes), context-parallel."""
    c, chunk = module.cfg, q.shape[1] // (2 * mesh.shape[AXIS])
    # Tiles no larger than a zig-zag chunk, so a tile never straddles two chunks and the
    # masked (later-chunk) tiles are skipped whole.
    block = math.gcd(chunk, min(c.attn_block_q, c.attn_block_k))
    return context_attention(q, k, v, segment_ids, mesh=mesh, strategy=strategy, block=block)


@contextlib.contextmanager
def attention(mesh: Mesh, cfg: MeshConfig):
    """Within it, every Attention.attend of a model call runs context-parallel over `mesh`'s
    context axis by cfg.context_strategy; a no-op on a mesh without context shards."""
    if mesh is None or mesh.shape.get(AXIS, 1) == 1:
        yield
        return

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "attend" or kwargs:
            return next_fun(*args, **kwargs)
        return _attend(mesh, cfg.context_strategy, context.module, *args)

    with nn.intercept_methods(interceptor):
        yield
