"""AdamW with the LLaMA paper's settings: warmup + cosine schedule, clipping, a decay mask."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from llama_jax.config import TrainConfig

# Parameters with these leaf names are norm scales and biases: no weight decay. model/llama.py
# names every RMSNorm/LayerNorm gain "scale" and every bias "bias"; the test checks that
# this picks exactly the parameters whose logical axes are one-dimensional per layer.
NO_DECAY_NAMES = ("scale", "bias")


def make_schedule(train: TrainConfig) -> optax.Schedule:
    """Linear warmup to train.lr over warmup_steps, then cosine down to min_lr_ratio * lr at
    train.steps (held there afterwards). Step s of the warmup uses lr * (s + 1) / warmup_steps,
    as Megatron and nanoGPT do: the first update is a real one, not lr 0."""
    peak, warmup, total = train.lr, train.warmup_steps, train.steps
    end = peak * train.min_lr_ratio
    decay_steps = max(total - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1) / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def decay_mask(params):
    """True for the parameters weight decay applies to (everything but norms and biases)."""

    def decays(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return not (names and names[-1] in NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) then AdamW(schedule, b1, b2, eps, weight_decay, mask)."""
    return optax.chain(
        optax.clip_by_global_norm(train.clip_norm),
        optax.adamw(
            learning_rate=make_schedule(train),
            b1=train.b1,
            b2=train.b2,
            eps=train.eps,
            weight_decay=train.weight_decay,
            mask=decay_mask,
        ),
    )
