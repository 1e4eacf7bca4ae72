"""AdamW with the LLaMA paper's settings: warmup + cosine schedule, clipping, a decay mask."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

# Parameters with these leaf names are norm scales and biases: no weight decay. model.py
# names every RMSNorm/LayerNorm gain "scale" and every bias "bias"; the test checks that
# this picks exactly the parameters whose logical axes are one-dimensional per layer.
NO_DECAY_NAMES = ("scale", "bias")


def make_schedule(train_cfg) -> optax.Schedule:
    """Linear warmup from 0 to train.lr over warmup_steps, then cosine down to
    min_lr_ratio * lr at train.steps (held there afterwards)."""
    peak = float(train_cfg.lr)
    warmup = int(train_cfg.warmup_steps)
    total = int(train_cfg.steps)
    end = peak * float(train_cfg.min_lr_ratio)
    decay_steps = max(total - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup, 1)
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


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) then AdamW(schedule, b1, b2, eps, weight_decay, mask)."""
    return optax.chain(
        optax.clip_by_global_norm(float(train_cfg.clip_norm)),
        optax.adamw(
            learning_rate=make_schedule(train_cfg),
            b1=float(train_cfg.b1),
            b2=float(train_cfg.b2),
            eps=float(train_cfg.eps),
            weight_decay=float(train_cfg.weight_decay),
            mask=decay_mask,
        ),
    )
