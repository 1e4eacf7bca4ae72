"""The LLaMA decoder in Flax linen: pre-norm RMSNorm, rotary attention, SwiGLU, scanned blocks.

Dimension letters, used in einsum strings and shape comments throughout:
  B batch, T query length, S key length, D model dim, N query heads, K kv heads,
  G heads per kv group, H head dim, F ffn hidden, V vocab, L layers.

Parameters and activations carry logical axis names only; sharding.py maps them to a mesh.
Every linear layer of a block goes through one method, Projections.project, so a wrapper
outside the model can change them all by intercepting it (nn.intercept_methods).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llama_jax.config import ModelConfig
from llama_jax.model.attention import dot_product_attention
from llama_jax.model.ops import dense
from llama_jax.model.remat import remat_policy

# Logical layouts of activations, constrained at block boundaries. BTD is the residual
# stream between the blocks (and a block's output), which sequence parallelism splits along
# the sequence; inside attention and the MLP the sequence is "length".
BTD = ("batch", "residual_length", "embed")
BTNH = ("batch", "length", "heads", "head_dim")
BTKH = ("batch", "length", "kv_heads", "head_dim")
BTF = ("batch", "length", "mlp")
BTV = ("batch", "length", "vocab")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def embed_lookup(table, tokens, dtype):
    """table[tokens] in `dtype`: [V, D] float32 master table, [B, T] ints -> [B, T, D].

    The forward casts first and gathers the table over the FSDP axis (a lookup into a table
    split along embed forces XLA to rematerialize the whole table on every device), so the
    gather moves compute-dtype bytes. The backward sums each token's cotangents in float32:
    jnp.take's own transpose would scatter-add into a bf16 [V, D] buffer, where a frequent
    token's thousands of contributions round away (its gradient off by tens of percent).
    """
    table = nn.with_logical_constraint(table.astype(dtype), ("vocab", None))
    return jnp.take(table, tokens, axis=0)


def _embed_fwd(table, tokens, dtype):
    return embed_lookup(table, tokens, dtype), (table, tokens)


def _embed_bwd(dtype, res, g):
    table, tokens = res
    grad = jnp.zeros(table.shape, jnp.float32).at[tokens].add(g.astype(jnp.float32))
    return grad.astype(table.dtype), None


embed_lookup.defvjp(_embed_fwd, _embed_bwd)


def _param(module, name, shape, axes, cfg: ModelConfig, init=None):
    init = init or nn.initializers.normal(cfg.init_std)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.weight_dtype)


class Norm(nn.Module):
    """RMSNorm (LLaMA) or LayerNorm (ablation); statistics in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        scale = _param(self, "scale", (x.shape[-1],), ("embed",), c, nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        if c.norm == "layernorm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + c.norm_eps)
        y = y * scale.astype(jnp.float32)
        if c.norm == "layernorm":
            y = y + _param(self, "bias", (x.shape[-1],), ("embed",), c, nn.initializers.zeros)
        return y.astype(c.compute_dtype)


def rope(x, positions, theta: float):
    """Rotary embedding on interleaved pairs (x[2i], x[2i+1]), as the reference LLaMA code.

    x: [B, T, N, H]; positions: [B, T] ints.
    """
    H = x.shape[-1]
    freqs = 1.0 / (theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))  # [H/2]
    angles = positions[..., None].astype(jnp.float32) * freqs  # [B, T, H/2]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]  # [B, T, 1, H/2]
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], H // 2, 2)
    xe, xo = x32[..., 0], x32[..., 1]
    out = jnp.stack([xe * cos - xo * sin, xe * sin + xo * cos], axis=-1)  # [B, T, N, H/2, 2]
    return out.reshape(x.shape).astype(x.dtype)


def masked_attention(q, k, v, mask):
    """softmax(QK^T/sqrt(H))V under an explicit [B, T, S] boolean mask (GQA by head groups).

    Only the KV-cache decode path uses it: which cache slots a query sees (filled so far, not
    left padding) is neither the causal nor the segment mask dot_product_attention expresses.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * H**-0.5
    s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v)
    return o.reshape(B, T, N, H)


class Projections(nn.Module):
    """The base of the modules whose linear layers (x times a weight) go through project().

    project is the one seam for what wraps a model from outside: a method call that
    nn.intercept_methods sees with the weight's name, so an interceptor can add to (or
    replace) any projection, and declare variables in this module, without a line here.
    """

    def project(self, name: str, spec: str, x, w):
        """dense(spec, x, w) for the weight `name` (e.g. "wq"), w already in the compute dtype."""
        return dense(spec, x, w)


class Attention(Projections):
    cfg: ModelConfig
    decode: bool = False  # read and extend the "cache" collection (generation)

    @nn.compact
    def __call__(self, x, positions, segment_ids=None):
        c = self.cfg
        D, N, K, H, dt = c.dim, c.n_heads, c.kv_heads, c.head_dim, c.compute_dtype
        out_init = nn.initializers.normal(c.init_std / (2 * c.n_layers) ** 0.5)
        wq = _param(self, "wq", (D, N, H), ("embed", "heads", "head_dim"), c)
        wk = _param(self, "wk", (D, K, H), ("embed", "kv_heads", "head_dim"), c)
        wv = _param(self, "wv", (D, K, H), ("embed", "kv_heads", "head_dim"), c)
        wo = _param(self, "wo", (N, H, D), ("heads", "head_dim", "embed"), c, out_init)
        q = self.project("wq", "BTD,DNH->BTNH", x, wq.astype(dt))
        k = self.project("wk", "BTD,DKH->BTKH", x, wk.astype(dt))
        v = self.project("wv", "BTD,DKH->BTKH", x, wv.astype(dt))
        q, k, v = (
            checkpoint_name(q, "q_proj"),
            checkpoint_name(k, "k_proj"),
            checkpoint_name(v, "v_proj"),
        )
        if c.position == "rope":
            q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        q = nn.with_logical_constraint(q, BTNH)
        k = nn.with_logical_constraint(k, BTKH)
        v = nn.with_logical_constraint(v, BTKH)
        if self.decode:
            o = self._cached(q, k, v, segment_ids)
        else:
            o = self.attend(q, k, v, segment_ids)  # [B, T, N, H]
        o = checkpoint_name(nn.with_logical_constraint(o, BTNH), "attn_out")
        out = self.project("wo", "BTNH,NHD->BTD", o, wo.astype(dt))
        return checkpoint_name(nn.with_logical_constraint(out, BTD), "o_proj")

    def attend(self, q, k, v, segment_ids):
        """Causal attention of the sequence's queries [B, T, N, H] over its keys and values.

        The seam for a layout that splits the sequence over devices: parallel/context.py
        replaces this method from outside (nn.intercept_methods), so call it positionally.
        """
        c = self.cfg
        return dot_product_attention(
            q,
            k,
            v,
            impl=c.attention_impl,
            causal=True,
            segment_ids=segment_ids,
            block_q=c.attn_block_q,
            block_k=c.attn_block_k,
        )

    def _cached(self, q, k, v, segment_ids):
        """Writes this call's T keys/values at cache slots [index, index + T) and attends.

        Llama.init(..., decode=True) on [B, S] tokens creates a cache of S slots (and writes
        nothing). A query in slot t sees slots <= t of its own segment, so left padding
        (segment 0) is never attended by real tokens (segment 1).
        """
        B, T = k.shape[:2]
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        creating = not self.has_variable("cache", "k")
        ck = self.variable("cache", "k", jnp.zeros, k.shape, k.dtype)  # [B, S, K, H]
        cv = self.variable("cache", "v", jnp.zeros, v.shape, v.dtype)  # [B, S, K, H]
        cseg = self.variable("cache", "segment_ids", jnp.zeros, (B, T), jnp.int32)  # [B, S]
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if creating:
            return jnp.zeros_like(q)
        i = index.value
        # the cache is laid out (and sharded) like the k/v activations
        update = jax.lax.dynamic_update_slice
        ck.value = nn.with_logical_constraint(update(ck.value, k, (0, i, 0, 0)), BTKH)
        cv.value = nn.with_logical_constraint(update(cv.value, v, (0, i, 0, 0)), BTKH)
        cseg.value = update(cseg.value, segment_ids.astype(jnp.int32), (0, i))
        index.value = i + T
        S = ck.value.shape[1]
        slot = i + jnp.arange(T)  # [T] cache slot of each query
        mask = (jnp.arange(S)[None, :] <= slot[:, None])[None]  # [1, T, S]
        mask = mask & (cseg.value[:, None, :] == segment_ids[:, :, None])  # [B, T, S]
        return masked_attention(q, ck.value, cv.value, mask)


class MLP(Projections):
    """SwiGLU: w2(silu(w1 x) * w3 x); or a GELU MLP of equal parameter count (ablation)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        D, F, dt = c.dim, c.mlp_dim, c.compute_dtype
        out_init = nn.initializers.normal(c.init_std / (2 * c.n_layers) ** 0.5)
        w1 = _param(self, "w1", (D, F), ("embed", "mlp"), c)
        w2 = _param(self, "w2", (F, D), ("mlp", "embed"), c, out_init)
        gate = self.project("w1", "BTD,DF->BTF", x, w1.astype(dt))
        gate = checkpoint_name(gate, "mlp_gate")
        if c.mlp == "swiglu":
            w3 = _param(self, "w3", (D, F), ("embed", "mlp"), c)
            up = self.project("w3", "BTD,DF->BTF", x, w3.astype(dt))
            up = checkpoint_name(up, "mlp_up")
            h = nn.silu(gate) * up
        else:
            h = nn.gelu(gate)
        h = nn.with_logical_constraint(h, BTF)
        down = self.project("w2", "BTF,FD->BTD", h, w2.astype(dt))
        return checkpoint_name(nn.with_logical_constraint(down, BTD), "mlp_down")


class Block(nn.Module):
    """One transformer layer; returns (x, None) so nn.scan can stack it."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        c = self.cfg
        attn, mlp = Attention(c, self.decode, name="attention"), MLP(c, name="feed_forward")
        attn_norm, ffn_norm = Norm(c, name="attention_norm"), Norm(c, name="ffn_norm")
        # x, the residual stream, stays in residual_dtype; sublayers compute in compute_dtype
        # and their outputs are added to it in residual_dtype.
        r, cd = c.residual, c.compute_dtype
        if c.norm_placement == "pre":
            x = x + attn(attn_norm(x), positions, segment_ids).astype(r)
            x = x + mlp(ffn_norm(x)).astype(r)
        else:
            x = attn_norm(x + attn(x.astype(cd), positions, segment_ids).astype(r)).astype(r)
            x = ffn_norm(x + mlp(x.astype(cd)).astype(r)).astype(r)
        return nn.with_logical_constraint(x, BTD), None


class Llama(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, decode=False, hidden=False):
        """tokens: [B, T] ints -> logits [B, T, V] float32.

        hidden=True returns the final normed hidden states [B, T, D] (compute dtype) instead,
        for loss.head_loss, which applies the output matrix itself.

        positions default to 0..T-1; segment_ids (optional, [B, T]) keep packed documents apart.
        decode=True reads and extends the KV cache (mutable "cache" collection; see
        Attention._cached and llama_jax.inference.generate); positions are then required.
        """
        c = self.cfg
        if decode and positions is None:
            raise ValueError("decode=True needs explicit positions (the cache offset per row)")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        emb = _param(self, "tok_embeddings", (c.vocab_size, c.dim), ("vocab", "embed"), c)
        x = embed_lookup(emb, tokens, c.compute_dtype).astype(c.residual)  # [B, T, D]
        if c.position == "learned":
            pos = _param(self, "pos_embeddings", (c.max_seq_len, c.dim), (None, "embed"), c)
            x = x + jnp.take(pos, positions, axis=0).astype(c.residual)
        x = nn.with_logical_constraint(x, BTD)

        block = Block
        policy = remat_policy(c.remat_policy)
        if c.remat_policy != "none" and not decode:  # no backward pass when decoding
            block = nn.remat(Block, policy=policy, prevent_cse=False)
        layers = nn.scan(
            block,
            variable_axes={True: 0},  # every collection: params, cache, any a wrapper adds
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=c.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, decode, name="layers")
        x, _ = layers(x, positions, segment_ids)

        x = Norm(c, name="norm")(x)
        if c.tie_word_embeddings:  # the head is the embedding table: one [V, D] matrix, no output
            spec, out = "BTD,VD->BTV", emb
        else:
            spec = "BTD,DV->BTV"
            out = _param(self, "output", (c.dim, c.vocab_size), ("embed", "vocab"), c)
        if hidden:
            return x
        # float32 accumulation and output: bf16 logits would round the loss and its gradient.
        logits = jnp.einsum(
            spec, x, out.astype(c.compute_dtype), preferred_element_type=jnp.float32
        )
        return nn.with_logical_constraint(logits, BTV).astype(jnp.float32)


def head_weight(params, cfg: ModelConfig):
    """The LM head's [D, V] matrix in compute dtype, for loss.head_loss: params' output, or
    the embedding table transposed when cfg.tie_word_embeddings (its gradient then sums the
    lookup's and the head's)."""
    if cfg.tie_word_embeddings:
        return params["tok_embeddings"].astype(cfg.compute_dtype).T  # [D, V]
    return params["output"].astype(cfg.compute_dtype)


def abstract_params(cfg: ModelConfig):
    """The parameter tree as ShapeDtypeStructs still boxed with their logical axis names
    (jax.eval_shape of init: nothing is allocated); sharding.tree_shardings maps it to a mesh."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), tokens))["params"]
