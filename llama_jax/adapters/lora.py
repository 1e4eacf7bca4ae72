"""LoRA (Hu et al. 2021): a frozen base W plus a trained low-rank update, y = x W + (alpha/r) x A B.

LoRA wraps a model from outside, as gemma's gm.nn.LoRA does: LoRA(model, ...).init/apply run
the model under nn.intercept_methods, and the interceptor adds (alpha/r) x A B to every call
of the model's projection method (llama.Projections.project) whose weight is a target. The
model holds no LoRA code. model.lora_rank > 0 turns it on for model.lora_targets (any of
q,k,v,o,w1,w2,w3); `wrap` builds the wrapper from a ModelConfig.

The adapters live in their own variable collection, "lora", beside "params", declared in the
intercepted module (so their paths are the base weight's: layers/attention/q_a), with
logical axis names (the input's on A, the output's on B), so sharding.py's one rule table
shards them like their base weight under FSDP and tensor parallelism. A starts random, B at
zero: step 0 is the base model. Training differentiates and updates the "lora" collection
alone over the frozen base (adapters/trainable.py says so); checkpoints hold it (and the
config, whose train.init_from names the base).
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
WEIGHTS = {w: t for t, (_, w, _, _) in TARGETS.items()}  # the weight project() names -> target


def targets(cfg) -> tuple[str, ...]:
    """The adapted weights of a ModelConfig (none when lora_rank is 0)."""
    if not cfg.lora_rank:
        return ()
    return tuple(t for t in cfg.lora_targets.split(",") if t)


def sizes(cfg) -> dict[str, int]:
    return {"D": cfg.dim, "N": cfg.n_heads, "K": cfg.kv_heads, "H": cfg.head_dim, "F": cfg.mlp_dim}


def delta(module: nn.Module, target: str, spec: str, x, w, rank: int, alpha: float):
    """(alpha/r) x A B for the projection dense(spec, x, w) of `target` inside `module`
    (Attention or MLP), in w's dtype (the compute dtype); A and B are declared in `module`.

    The letters of A and B come from spec: W's letters that x shares are its inputs (D, or
    NH for the attention output), the others its outputs; their sizes are W's."""
    xs, ws = spec.split("->")[0].split(",")
    i, o = "".join(c for c in ws if c in xs), "".join(c for c in ws if c not in xs)
    n = dict(zip(ws, w.shape))
    a_shape, b_shape = (*[n[c] for c in i], rank), (rank, *[n[c] for c in o])
    fan_in = math.prod(a_shape[:-1])
    init_a = nn.initializers.normal(fan_in**-0.5)

    def make(name, init, shape, axes):
        boxed = nn.with_logical_partitioning(
            lambda: init(module.make_rng("params"), shape, jnp.float32), axes
        )
        return module.variable("lora", name, boxed).value

    a = make(f"{target}_a", init_a, a_shape, (*[AXES[c] for c in i], None))
    b = make(f"{target}_b", nn.initializers.zeros, b_shape, (None, *[AXES[c] for c in o]))
    dt = w.dtype  # the model cast W to its compute dtype; the update computes in it too
    xa = jnp.einsum(f"BT{i},{i}R->BTR", x, a.astype(dt))
    return jnp.einsum(f"BTR,R{o}->BT{o}", xa, b.astype(dt)) * (alpha / rank)


@dataclasses.dataclass(frozen=True)
class LoRA:
    """`model` (a flax Module whose linear layers call a project(name, spec, x, w) method)
    with LoRA on the weights of `targets`: init and apply are the model's, under the
    interceptor, so the variables gain the "lora" collection and the outputs its update."""

    model: nn.Module
    rank: int
    alpha: float
    targets: tuple[str, ...]

    def init(self, rngs, *args, **kwargs):
        with nn.intercept_methods(self._intercept):
            return self.model.init(rngs, *args, **kwargs)

    def apply(self, variables, *args, **kwargs):
        with nn.intercept_methods(self._intercept):
            return self.model.apply(variables, *args, **kwargs)

    def _intercept(self, next_fun, args, kwargs, context):
        """Every method call of every module passes here; only project() of a target changes.
        project runs inside its module's compact __call__, so delta may declare A and B there."""
        y = next_fun(*args, **kwargs)
        if context.method_name != "project" or WEIGHTS.get(args[0]) not in self.targets:
            return y
        name, spec, x, w = args
        return y + delta(context.module, WEIGHTS[name], spec, x, w, self.rank, self.alpha)


def wrap(model: nn.Module, cfg) -> LoRA:
    """LoRA(model) with a ModelConfig's lora_rank, lora_alpha and lora_targets."""
    return LoRA(model, cfg.lora_rank, cfg.lora_alpha, targets(cfg))


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


def merged(variables, cfg):
    """The plain params of a LoRA model's variables: its "lora" merged into its "params"."""
    return merge(variables["params"], variables["lora"], cfg)


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
