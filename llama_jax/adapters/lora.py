"""LoRA (Hu et al. 2021): a frozen base W plus a trained low-rank update, y = x W + (alpha/r) x A B.

model.lora_rank > 0 turns it on for model.lora_targets (any of q,k,v,o,w1,w2,w3). The adapters
live in their own variable collection, "lora", beside "params", with logical axis names (the
input's on A, the output's on B), so sharding.py's one rule table shards them like their base
weight under FSDP and tensor parallelism. A starts random, B at zero: step 0 is the base model.
Training differentiates and updates the "lora" collection alone (train_step.py); checkpoints
hold it (and the config, whose train.init_from names the base).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# target -> (module, base weight, input letters, output letters): W maps x[..., in] to y[..., out]
TARGETS = {
    "q": ("attention", "wq", "D", "NH"),
    "k": ("attention", "wk", "D", "KH"),
    "v": ("attention", "wv", "D", "KH"),
    "o": ("attention", "wo", "NH", "D"),
    "w1": ("feed_forward", "w1", "D", "F"),
    "w2": ("feed_forward", "w2", "F", "D"),
    "w3": ("feed_forward", "w3", "D", "F"),
}
AXES = {"D": "embed", "N": "heads", "K": "kv_heads", "H": "head_dim", "F": "mlp"}


def targets(cfg) -> tuple[str, ...]:
    """The adapted weights of a ModelConfig (none when lora_rank is 0)."""
    if not cfg.lora_rank:
        return ()
    return tuple(t for t in cfg.lora_targets.split(",") if t)


def sizes(cfg) -> dict[str, int]:
    return {"D": cfg.dim, "N": cfg.n_heads, "K": cfg.kv_heads, "H": cfg.head_dim, "F": cfg.mlp_dim}


def delta(module: nn.Module, target: str, x, cfg):
    """(alpha/r) x A B for `target` inside `module` (Attention or MLP), in the compute dtype;
    0 when the target is not adapted."""
    if target not in targets(cfg):
        return 0
    _, _, i, o = TARGETS[target]
    n, r = sizes(cfg), cfg.lora_rank
    a_shape, b_shape = (*[n[c] for c in i], r), (r, *[n[c] for c in o])
    fan_in = math.prod(a_shape[:-1])
    init_a = nn.initializers.normal(fan_in**-0.5)

    def make(name, init, shape, axes):
        boxed = nn.with_logical_partitioning(
            lambda: init(module.make_rng("params"), shape, jnp.float32), axes
        )
        return module.variable("lora", name, boxed).value

    a = make(f"{target}_a", init_a, a_shape, (*[AXES[c] for c in i], None))
    b = make(f"{target}_b", nn.initializers.zeros, b_shape, (None, *[AXES[c] for c in o]))
    dt = cfg.compute_dtype
    xa = jnp.einsum(f"BT{i},{i}R->BTR", x, a.astype(dt))
    return jnp.einsum(f"BTR,R{o}->BT{o}", xa, b.astype(dt)) * (cfg.lora_alpha / r)


def count(cfg) -> int:
    """Trainable parameters: n_layers x sum over targets of r x (inputs + outputs) of W."""
    n = sizes(cfg)
    per_layer = sum(
        cfg.lora_rank
        * (math.prod(n[c] for c in TARGETS[t][2]) + math.prod(n[c] for c in TARGETS[t][3]))
        for t in targets(cfg)
    )
    return cfg.n_layers * per_layer


def plain(cfg):
    """The ModelConfig of merged params: the same model without adapters."""
    return dataclasses.replace(cfg, lora_rank=0)


def merge(params, adapters, cfg):
    """Plain params with W + (alpha/r) A B folded in, the adapted weights in float32 whatever
    W's dtype: rounding the sum back to a bfloat16 W would lose most of a small update (its
    spacing, 2^-8 of |W|, is about the size of what fine-tuning changes)."""
    params = jax.tree.map(lambda x: x, params)  # a copy of the containers, not the arrays
    layers = params["layers"]
    for t in targets(cfg):
        module, w, i, o = TARGETS[t]
        a, b = adapters["layers"][module][f"{t}_a"], adapters["layers"][module][f"{t}_b"]
        update = jnp.einsum(f"L{i}R,LR{o}->L{i}{o}", a, b, precision="highest")
        base = layers[module][w].astype(jnp.float32)
        layers[module] = {**layers[module], w: base + update * (cfg.lora_alpha / cfg.lora_rank)}
    return params


def merge_error(params, adapters, merged, cfg) -> float:
    """The largest error of merged weights against W + (alpha/r) A B computed in float64, as a
    fraction of the largest entry of the update: ~1e-7 for a float32 merge, what a cast of
    the merged weights (e.g. an export in bfloat16) loses of the adapters otherwise. One layer
    at a time on the host, so a 7B merge needs no float64 copy of a whole stacked weight."""
    worst, scale = 0.0, cfg.lora_alpha / cfg.lora_rank
    for t in targets(cfg):
        module, w, _, _ = TARGETS[t]
        a, b = (np.asarray(adapters["layers"][module][f"{t}_{x}"], np.float64) for x in "ab")
        for layer in range(cfg.n_layers):
            update = scale * np.tensordot(a[layer], b[layer], axes=1)  # [in..., out...]
            exact = np.asarray(params["layers"][module][w][layer]).astype(np.float64) + update
            got = np.asarray(merged["layers"][module][w][layer]).astype(np.float64)
            worst = max(worst, float(np.abs(got - exact).max() / max(np.abs(update).max(), 1e-30)))
    return worst
