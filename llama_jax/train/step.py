"""The sharded training step: train state, loss, gradient accumulation, AdamW update.

One jitted function runs unchanged on one CPU, simulated devices, a GPU or a multi-host
pod: the mesh and the logical axis rules (sharding.py) decide the layout, XLA inserts the
collectives. The remat policy is the model's (remat.REMAT_POLICIES, by name). Every
function takes the typed RunConfig (config.py) and reads the groups it needs.

What trains is adapters/trainable.py's: the state holds the trainable tree, and every step
function takes the frozen one as its last input, `{}` for full training (LoRA: the base).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax.adapters import trainable
from llama_jax.adapters.trainable import Trainable
from llama_jax.config import RunConfig
from llama_jax.model.llama import head_weight
from llama_jax.model.loss import head_loss
from llama_jax.parallel import context
from llama_jax.parallel import sharding as shd
from llama_jax.train.optim import make_optimizer, make_schedule

Batch = dict[str, jax.Array]  # inputs, targets: int32 [B, T]; optional loss_mask float32 [B, T]
BATCH_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (skipped ones included)
    params: Any  # float32 master weights, plain arrays (no partitioning boxes)
    opt_state: Any  # optax state of make_optimizer


def _init_boxed(seam: Trainable, tx: optax.GradientTransformation, rng, seq_len: int) -> TrainState:
    """The TrainState of the trainable tree, still wrapped in nn.Partitioned (carrying logical
    names); the frozen tree is not part of it (random_frozen, or released weights)."""
    params, _ = seam.split(seam.model.init(rng, jnp.zeros((1, seq_len), jnp.int32)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_frozen(cfg: RunConfig, mesh: Mesh):
    """The step's frozen input: (tree of ShapeDtypeStructs with shardings, shardings); ({}, {})
    when the whole model trains, {"params": base} under LoRA."""
    return trainable.of(cfg.model).abstract_frozen(mesh)


def random_frozen(cfg: RunConfig, mesh: Mesh):
    """The frozen tree of the random init of train.seed ({} for full training): a LoRA base
    without train.init_from (tests, demos)."""
    _, shardings = abstract_frozen(cfg, mesh)
    seam, seed, T = trainable.of(cfg.model), cfg.train.seed, cfg.train.seq_len

    def init():
        variables = seam.model.init(jax.random.key(seed), jnp.zeros((1, T), jnp.int32))
        return seam.split(nn.meta.unbox(variables))[1]

    return jax.jit(init, out_shardings=shardings)()


def _init_fn(cfg: RunConfig):
    seam, tx = trainable.of(cfg.model), make_optimizer(cfg.train)
    return functools.partial(_init_boxed, seam, tx, seq_len=cfg.train.seq_len)


def abstract_train_state(cfg: RunConfig, mesh: Mesh):
    """(state of ShapeDtypeStructs carrying their shardings, state_shardings); allocates nothing."""
    boxed = jax.eval_shape(_init_fn(cfg), jax.random.key(0))
    # Optimizer moments inherit their parameter's box, hence its logical names and sharding.
    shapes, shardings = shd.tree_shardings(boxed, mesh)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    return abstract, shardings


def create_train_state(cfg: RunConfig, mesh: Mesh, rng: jax.Array | None = None):
    """Initializes params (float32 master) and AdamW state sharded from the start.

    Everything is created inside one jit whose out_shardings are the final layout, so no
    device ever materializes the full model. Returns (state, state_shardings).
    """
    _, shardings = abstract_train_state(cfg, mesh)
    init = _init_fn(cfg)
    if rng is None:  # built inside the jit: no host array to place on a multi-host mesh
        seed = cfg.train.seed
        state = jax.jit(
            lambda: nn.meta.unbox(init(jax.random.key(seed))), out_shardings=shardings
        )()
    else:
        state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
    return state, shardings


def train_state_from_params(cfg: RunConfig, mesh: Mesh, params):
    """A step-0 train state around given params (e.g. released weights): the optimizer state
    is initialized on them, sharded like create_train_state's. Returns (state, shardings)."""
    _, shardings = abstract_train_state(cfg, mesh)
    tx = make_optimizer(cfg.train)

    def init(p):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

    return jax.jit(init, out_shardings=shardings)(params), shardings


def _with_mask(batch: Batch) -> Batch:
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    if unknown:
        raise ValueError(f"unknown batch key(s) {unknown}; valid: {list(BATCH_KEYS)}")
    batch = dict(batch)
    if "loss_mask" not in batch:
        batch["loss_mask"] = jnp.ones(batch["targets"].shape, jnp.float32)
    batch["loss_mask"] = batch["loss_mask"].astype(jnp.float32)
    return batch


def _loss_sum(seam: Trainable, cfg: RunConfig, mesh: Mesh, params, mb: Batch, frozen: dict):
    """(summed loss, tokens counted) of a batch, of the trainable params over the frozen tree.
    The LM head and the loss run fused (loss.py). On a mesh with context shards the rows
    are reordered zig-zag and attention runs context-parallel (parallel/context.py)."""
    variables = seam.join(params, frozen)
    mb = context.to_zigzag(mb, mesh.shape.get(context.AXIS, 1))
    with context.attention(mesh, cfg.mesh):
        x = seam.model.apply(
            variables, mb["inputs"], mb.get("positions"), mb.get("segment_ids"), hidden=True
        )  # [B, T, D]
    w = head_weight(variables["params"], cfg.model)  # [D, V]
    return head_loss(x, w, mb["targets"], mb["loss_mask"])


def _split_microbatches(batch: Batch, n: int, mesh: Mesh) -> Batch:
    """[B, ...] -> [n, B/n, ...]; microbatch a takes rows a, a+n, a+2n, ...

    Strided rather than contiguous so every device keeps its own rows: each holds a block
    of the batch, and a block splits evenly across microbatches without any communication.
    """
    B = batch["targets"].shape[0]
    if B % n:
        raise ValueError(f"train.batch_size={B} is not divisible by train.grad_accum_steps={n}")
    shards = shd.batch_shards(mesh)
    if (B // n) % shards:
        raise ValueError(
            f"a microbatch of train.batch_size/grad_accum_steps={B // n} rows does not split "
            f"over the {shards} data x fsdp devices; make it a multiple of {shards}"
        )
    spec = NamedSharding(mesh, P(None, shd.BATCH_AXES))
    out = {}
    for k, x in batch.items():
        x = x.reshape(B // n, n, *x.shape[1:]).swapaxes(0, 1)  # [n, B/n, ...]
        out[k] = jax.lax.with_sharding_constraint(x, spec)
    return out


def make_loss_and_grads(cfg: RunConfig, mesh: Mesh, param_shardings):
    """fn(params, batch, frozen) -> (mean loss, grads, tokens), accumulating over microbatches.

    The loss of every microbatch is divided by the token count of the whole batch, so the
    accumulated gradient is exactly that of one big batch whatever the split.
    """
    seam, n_micro = trainable.of(cfg.model), cfg.train.grad_accum_steps

    def loss_fn(params, mb, total, frozen):
        return _loss_sum(seam, cfg, mesh, params, mb, frozen)[0] / total

    grad_fn = jax.value_and_grad(loss_fn)  # the trainable params only: frozen gets no gradient

    def loss_and_grads(params, batch, frozen: dict):
        batch = _with_mask(batch)
        tokens = jnp.sum(batch["loss_mask"])
        total = jnp.maximum(tokens, 1.0)
        if n_micro == 1:
            loss, grads = grad_fn(params, batch, total, frozen)
            return loss, grads, tokens

        def body(carry, mb):
            loss_acc, grad_acc = carry
            loss, grads = grad_fn(params, mb, total, frozen)
            grad_acc = jax.tree.map(jnp.add, grad_acc, grads)
            grad_acc = jax.lax.with_sharding_constraint(grad_acc, param_shardings)
            return (loss_acc + loss, grad_acc), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
        micro = _split_microbatches(batch, n_micro, mesh)
        (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
        return loss, grads, tokens

    return loss_and_grads


def make_train_step(cfg: RunConfig, mesh: Mesh, state_shardings):
    """Returns the jitted step_fn(state, batch, frozen) -> (new_state, metrics); the state is
    donated. frozen: the tree abstract_frozen describes ({} for full training).

    metrics: scalars loss (mean over counted tokens), grad_norm (before clipping), lr (the
    schedule at this step), tokens (counted tokens), skipped (1 if a non-finite step was
    skipped under train.skip_nonfinite).
    """
    tx, schedule = make_optimizer(cfg.train), make_schedule(cfg.train)
    loss_and_grads = make_loss_and_grads(cfg, mesh, state_shardings.params)
    skip_nonfinite = cfg.train.skip_nonfinite
    rules = shd.axis_rules(cfg.mesh.sequence_parallel)

    def step_fn(state: TrainState, batch: Batch, frozen: dict):
        with shd.model_context(mesh, rules):
            loss, grads, tokens = loss_and_grads(state.params, batch, frozen)
        with shd.model_context(mesh, rules), jax.named_scope("optimizer"):
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        skipped = jnp.zeros((), jnp.int32)
        if skip_nonfinite:
            # Keep params and moments; the optimizer's own step count (which drives the
            # schedule) also stays, so after k skips it trails state.step by k.
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            skipped = (~ok).astype(jnp.int32)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "tokens": tokens,
            "skipped": skipped,
        }
        return new_state, metrics

    frozen = abstract_frozen(cfg, mesh)[1]
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, shd.batch_sharding(mesh), frozen),
        out_shardings=(state_shardings, shd.replicated(mesh)),
        donate_argnums=(0,),
    )


def make_eval_step(cfg: RunConfig, mesh: Mesh, state_shardings):
    """Returns the jitted fn(params, batch, frozen) -> {"loss": mean, "loss_sum", "tokens"}."""
    seam, rules = trainable.of(cfg.model), shd.axis_rules(cfg.mesh.sequence_parallel)

    def eval_fn(params, batch, frozen: dict):
        batch = _with_mask(batch)
        with shd.model_context(mesh, rules):
            s, tokens = _loss_sum(seam, cfg, mesh, params, batch, frozen)
        return {"loss": s / jnp.maximum(tokens, 1.0), "loss_sum": s, "tokens": tokens}

    frozen = abstract_frozen(cfg, mesh)[1]
    return jax.jit(
        eval_fn,
        in_shardings=(state_shardings.params, shd.batch_sharding(mesh), frozen),
        out_shardings=shd.replicated(mesh),
    )


def abstract_batch(cfg: RunConfig, mesh: Mesh, *, loss_mask: bool = False) -> Batch:
    """ShapeDtypeStructs of one global batch [train.batch_size, train.seq_len], sharded."""
    shape, sharding = (cfg.train.batch_size, cfg.train.seq_len), shd.batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in ("inputs", "targets")
    }
    if loss_mask:
        batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    return batch


def compile_train_step(cfg: RunConfig, mesh: Mesh) -> jax.stages.Compiled:
    """Lowers and compiles the step against abstract shapes only: nothing is allocated, so
    memory_analysis() of a 65B config can be read on simulated CPU devices."""
    state, shardings = abstract_train_state(cfg, mesh)
    args = (state, abstract_batch(cfg, mesh), abstract_frozen(cfg, mesh)[0])
    return make_train_step(cfg, mesh, shardings).lower(*args).compile()
