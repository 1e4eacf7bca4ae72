"""Next-token cross entropy fused with the LM head: head_loss.

head_loss takes the final hidden states and the output matrix and never lets autodiff see
the [B, T, V] logits. Autodiff of logits -> logsumexp -> one-hot pick writes the logits,
their exponentials, a [B, T, V] one-hot, and then the logits' cotangent twice (once in a
transposed layout for the weight gradient); at vocab 4096 each is 32 MiB per 2048 tokens.
head_loss's backward makes one pass: softmax minus the target's indicator, scaled by the
mask, straight into the two matmuls. Its numerics are autodiff's: logits, softmax and the
cotangent in float32, the backward matmuls in float32 as JAX's dot transpose does them.
The target is picked with a masked sum over the vocab rather than a gather, so vocab-sharded
logits stay local to each tensor rank.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.model.llama import BTV
from llama_jax.model.ops import weight_grad


def _picked(logits, targets):
    """logits[b, t, targets[b, t]] as a masked sum over V (no gather, no one-hot array)."""
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)


def _logits(x, w):
    logits = jnp.einsum("BTD,DV->BTV", x, w, preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, BTV)


@jax.custom_vjp
def _head_loss(x, w, targets, mask):
    return _head_loss_fwd(x, w, targets, mask)[0]


def _head_loss_fwd(x, w, targets, mask):
    logits = _logits(x, w)  # [B, T, V] float32
    logz = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    loss = jnp.sum((logz - _picked(logits, targets)) * mask)
    return loss, (x, w, targets, mask, logits, logz)


def _head_loss_bwd(res, ct):
    x, w, targets, mask, logits, logz = res
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    hit = (vocab == targets[..., None]).astype(jnp.float32)
    g = (jnp.exp(logits - logz[..., None]) - hit) * (mask * ct)[..., None]  # [B, T, V]
    g = nn.with_logical_constraint(g, BTV)
    dx = jnp.einsum("BTV,DV->BTD", g, w.astype(jnp.float32))
    dw = weight_grad("BTD,DV->BTV", x.astype(jnp.float32), g)
    return dx.astype(x.dtype), dw.astype(w.dtype), None, None


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)


def head_loss(x, w, targets, mask):
    """Summed next-token cross entropy of the logits x @ w, float32, with a one-pass
    backward (module docstring).

    x [B, T, D] final hidden states, w [D, V] the head (model.head_weight), targets
    [B, T] ints, mask [B, T] float32. Returns (summed loss, tokens counted), float32.
    """
    with jax.named_scope("loss"):
        return _head_loss(x, w, targets, mask.astype(jnp.float32)), jnp.sum(mask)
