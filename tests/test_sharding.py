"""Mesh construction, the logical rule table, and value-level parity of the sharded step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax.model.llama import BTD, BTNH, Llama
from llama_jax.parallel import sharding as shd
from llama_jax.train import step as ts

# ---- mesh -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes, want",
    [
        ((1, -1, 1), (1, 8, 1, 1)),
        ((2, -1, 2), (2, 2, 2, 1)),
        ((-1, 1, 4), (2, 1, 4, 1)),
        ((8, 1, 1), (8, 1, 1, 1)),
        ((1, 2, 2, -1), (1, 2, 2, 2)),
        ((1, 1, 2, 4), (1, 1, 2, 4)),
    ],
)
def test_make_mesh_sizes(sizes, want):
    mesh = shd.make_mesh(*sizes)
    assert mesh.axis_names == ("data", "fsdp", "context", "tensor")  # tensor innermost
    assert tuple(mesh.shape[a] for a in shd.MESH_AXES) == want
    assert mesh.devices.size == 8


@pytest.mark.parametrize(
    "sizes, match",
    [
        ((2, 2, 1), "multiply to 4, but there are 8"),
        ((-1, -1, 1), "at most one"),
        ((3, -1, 1), "does not divide"),
    ],
)
def test_make_mesh_errors(sizes, match):
    with pytest.raises(ValueError, match=match):
        shd.make_mesh(*sizes)


# ---- rules ------------------------------------------------------------------------------


def test_rules_weights_fsdp_and_tensor(mesh_of):
    spec = lambda *names: shd.logical_to_mesh_spec(names)
    assert spec("layers", "embed", "heads", "head_dim") == P(None, "fsdp", "tensor", None)
    assert spec("layers", "mlp", "embed") == P(None, "tensor", "fsdp")
    assert spec("vocab", "embed") == P("tensor", "fsdp")
    # Activations: batch takes fsdp first, so embed stays whole on each device; the sequence
    # is split over context, and with sequence parallelism the residual's over tensor too.
    assert spec(*BTD) == P(("data", "fsdp"), "context", None)
    assert spec(*BTNH) == P(("data", "fsdp"), "context", "tensor", None)
    sp = lambda *names: shd.logical_to_mesh_spec(names, shd.axis_rules(sequence_parallel=True))
    assert sp(*BTD) == P(("data", "fsdp"), ("context", "tensor"), None)
    assert sp(*BTNH) == spec(*BTNH)  # inside attention heads take tensor, as without SP
    assert shd.batch_sharding(mesh_of(2, 2, 2)).spec == P(("data", "fsdp"))


def test_indivisible_dims_are_replicated(mesh_of):
    mesh = mesh_of(1, 2, 4)
    specs = {"wk": P("layers", "embed", "kv_heads", "head_dim"), "b": P("batch")}
    shapes = {"wk": jax.ShapeDtypeStruct((2, 64, 2, 16), jnp.float32), "b": jnp.zeros(6)}
    out = shd.logical_to_sharding(specs, mesh, shapes=shapes)
    assert out["wk"].spec == P(None, "fsdp", None, None)  # 2 kv heads cannot split 4 ways
    assert out["b"].spec == P(("data", "fsdp"))  # 6 rows: (data=1) x (fsdp=2) divides
    out = shd.logical_to_sharding(specs, mesh_of(2, 2, 2), shapes=shapes)
    assert out["b"].spec == P("data")  # (data=2) x (fsdp=2) does not: fsdp is dropped


def test_every_param_has_logical_names(tiny_config):
    mc = tiny_config(seed=3).model
    boxed = jax.eval_shape(Llama(mc).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    known = {name for name, _ in shd.LOGICAL_AXIS_RULES}
    assert {n for x in leaves for n in x.names} <= known


# ---- FSDP really shards -----------------------------------------------------------------


def _batch_bytes_per_device(cfg, mesh, n_arrays):
    shape = (cfg.train.batch_size, cfg.train.seq_len)
    return n_arrays * np.prod(shd.batch_sharding(mesh).shard_shape(shape)) * 4


@pytest.mark.slow
def test_fsdp_shards_train_state(tiny_config, mesh_of):
    """compile_train_step (abstract shapes, as the memory inspector uses it) with fsdp=8."""
    cfg = tiny_config(seed=3)
    mesh = mesh_of(1, 8, 1)
    abstract, _ = ts.abstract_train_state(cfg, mesh)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    compiled = ts.compile_train_step(cfg, mesh)
    arg_bytes = compiled.memory_analysis().argument_size_in_bytes
    per_device = arg_bytes - _batch_bytes_per_device(cfg, mesh, 2)
    assert total / 8 <= per_device <= 1.10 * total / 8, (per_device, total)


# ---- value-level parity across meshes ---------------------------------------------------


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    B, T, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
    toks = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    mask = (rng.random((B, T)) < 0.8).astype(np.float32)  # ~20% of targets ignored
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": mask}


@pytest.fixture(scope="module")
def reference(tiny_config, mesh_of):
    """One step computed with no mesh at all: jax.grad of a loss written here, then AdamW's
    first step written out in float64 numpy (decay mask from the logical axes). Also the
    initial train state as create_train_state builds it sharded, brought to the host."""
    cfg = tiny_config(seed=3)
    t = cfg.train
    model = Llama(cfg.model)
    batch = _batch(cfg)
    tokens = jnp.zeros((1, t.seq_len), jnp.int32)
    boxed = jax.jit(model.init)(jax.random.key(t.seed), tokens)["params"]
    params = jax.tree.map(np.asarray, nn.meta.unbox(boxed))

    def loss_fn(p):
        logp = jax.nn.log_softmax(model.apply({"params": p}, batch["inputs"]), axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    grads = jax.tree.map(lambda g: np.asarray(g, np.float64), grads)
    gnorm = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(grads)))
    scale = min(1.0, t.clip_norm / gnorm)
    decays = jax.tree.map(
        lambda b: len([n for n in b.names if n != "layers"]) > 1,
        boxed,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )

    def adamw_first_step(p, g, decay):
        g = g * scale
        m, v = (1 - t.b1) * g, (1 - t.b2) * g * g
        mhat, vhat = m / (1 - t.b1), v / (1 - t.b2)
        u = mhat / (np.sqrt(vhat) + t.eps) + (t.weight_decay * p if decay else 0.0)
        return p - t.lr * u  # warmup_steps=0: step 0 runs at the peak rate

    new = jax.tree.map(adamw_first_step, jax.tree.map(np.float64, params), grads, decays)
    state, _ = ts.create_train_state(cfg, mesh_of(1, 2, 4))
    return {
        "cfg": cfg,
        "batch": batch,
        "params": params,
        "state": jax.tree.map(np.asarray, state),
        "loss": float(loss),
        "gnorm": gnorm,
        "new": new,
    }


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.slow
def test_create_train_state_is_layout_independent(reference):
    """Sharded init (partitionable RNG) gives the unsharded init's values; moments start at 0."""
    state = reference["state"]
    assert int(state.step) == 0
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference["params"])):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)  # jit vs jit: fusion ulps
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert len(moments) >= len(jax.tree.leaves(state.params)) and not any(m.any() for m in moments)


U32 = 2.0**-24  # float32 unit roundoff
# How far a sharded step may be from the reference, in units of this machine's own float32
# reordering noise (see `noise`): sharding splits and regroups the same float32 sums (over
# devices, over tensor-parallel partial products), which is a reordering; the error of one
# reordering is a random variable, and `noise` is the largest of 4 draws, so allow a few times
# it: 10x. The error scales with the machine's float32 behaviour (CPU, XLA codegen, threads),
# and so does the bound; a fixed 1e-5 did not (w2's own reordering noise is ~5e-6 here).
NOISE_FACTOR = 10


@pytest.fixture(scope="module")
def noise(reference, mesh_of):
    """This machine's float32 reordering noise of the step: the unsharded step on the same
    batch with its rows permuted (the same sums, added in another order), 4 permutations;
    per quantity, the largest relative error against the reference."""
    cfg, batch = reference["cfg"], reference["batch"]
    mesh = mesh_of(1, 1, 1)
    _, shardings = ts.abstract_train_state(cfg, mesh)
    step = ts.make_train_step(cfg, mesh, shardings)
    out = {}
    for seed in range(4):
        perm = np.random.default_rng(seed).permutation(batch["targets"].shape[0])
        state = jax.device_put(reference["state"], shardings)
        state, metrics = step(state, {k: v[perm] for k, v in batch.items()}, {})
        errs = {"grad_norm": rel_err(metrics["grad_norm"], reference["gnorm"])}
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(state.params),
                                     jax.tree.leaves(reference["new"])):  # fmt: skip
            errs[jax.tree_util.keystr(path)] = rel_err(got, want)
        out = {k: max(v, out.get(k, 0.0)) for k, v in errs.items()}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_step_matches_unsharded_reference(reference, noise, sizes, mesh_of):
    """Same initial state and batch -> same loss and updated params on every mesh; and the
    compiled state arguments are sharded fsdp ways (tensor parallelism shards some more)."""
    cfg, batch = reference["cfg"], reference["batch"]
    mesh = mesh_of(*sizes)
    abstract, shardings = ts.abstract_train_state(cfg, mesh)
    state = jax.device_put(reference["state"], shardings)
    step = ts.make_train_step(cfg, mesh, shardings)

    compiled = step.lower(state, batch, {}).compile()  # the call below reuses this executable
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    arg_bytes = compiled.memory_analysis().argument_size_in_bytes
    per_device = arg_bytes - _batch_bytes_per_device(cfg, mesh, 3)
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
    assert total / (fsdp * tensor) <= per_device <= 1.10 * total / fsdp, (per_device, total)

    state, metrics = step(state, batch, {})
    assert int(state.step) == 1
    # The loss is a float32 sum of n = B x T masked token losses: any order of it is within
    # n u32 / (1 - n u32) relative of the exact sum (Higham's bound), ~3e-5 for n = 512; the
    # reference is one such order, so two orders differ by at most twice that.
    n = batch["targets"].size
    assert rel_err(metrics["loss"], reference["loss"]) <= 2 * n * U32 / (1 - n * U32)
    floor = 4 * U32  # rounding of the float32 result itself, where the noise measured ~0
    assert rel_err(metrics["grad_norm"], reference["gnorm"]) <= NOISE_FACTOR * max(
        noise["grad_norm"], floor
    )
    assert float(metrics["tokens"]) == batch["loss_mask"].sum()
    assert float(metrics["lr"]) == pytest.approx(cfg.train.lr)
    flat_got = jax.tree_util.tree_leaves_with_path(state.params)
    flat_want = jax.tree.leaves(reference["new"])
    for (path, got), want in zip(flat_got, flat_want):
        name, err = jax.tree_util.keystr(path), rel_err(got, want)
        bound = NOISE_FACTOR * max(noise[name], floor)
        assert err <= bound, (name, err, bound, noise[name])
