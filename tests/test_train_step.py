"""Schedule, decay mask, gradient accumulation, remat policies, skip-nonfinite, eval step."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import TrainConfig
from llama_jax.model.llama import Llama
from llama_jax.model.remat import REMAT_POLICIES
from llama_jax.train import step as ts
from llama_jax.train.optim import decay_mask, make_optimizer, make_schedule


def make_batch(cfg, seed=0, mask_rate=0.3):
    rng = np.random.default_rng(seed)
    B, T, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
    toks = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    mask = (rng.random((B, T)) >= mask_rate).astype(np.float32)
    mask[0] = 0.0  # one row fully masked: microbatches then count different token numbers
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": mask}


def random_state(cfg, mesh):
    """A train state from numpy randoms put on the mesh (skips compiling the RNG init)."""
    abstract, shardings = ts.abstract_train_state(cfg, mesh)
    rng = np.random.default_rng(0)

    def init(path, x):
        w = 0.02 * rng.standard_normal(x.shape)
        return (w + (path[-1].key == "scale")).astype(x.dtype)  # norm gains around 1

    params = jax.tree_util.tree_map_with_path(init, abstract.params)
    opt_state = make_optimizer(cfg.train).init(params)
    state = ts.TrainState(step=np.zeros((), np.int32), params=params, opt_state=opt_state)
    return jax.device_put(state, shardings), shardings


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


# ---- schedule and optimizer -------------------------------------------------------------


def test_schedule_hand_values():
    sched = make_schedule(TrainConfig(lr=3e-4, warmup_steps=2000, steps=12000, min_lr_ratio=0.1))
    # step: value, worked out by hand (cosine over the 10000 post-warmup steps to 3e-5). Warmup
    # step s uses lr (s + 1) / 2000: the first step updates (lr 0 there made it a no-op).
    want = {
        0: 1.5e-7,  # 3e-4 / 2000
        999: 1.5e-4,  # half way up the linear warmup: 3e-4 * 1000 / 2000
        1999: 3e-4,  # the last warmup step reaches the peak
        2000: 3e-4,  # peak: the cosine starts
        4500: 3e-5 + 2.7e-4 * 0.5 * (1 + math.cos(math.pi / 4)),  # quarter of the decay
        7000: 1.65e-4,  # mid-decay: 3e-5 + 2.7e-4 / 2
        12000: 3e-5,  # end: 10% of peak
        20000: 3e-5,  # held after the end
    }
    for step, value in want.items():
        assert float(sched(step)) == pytest.approx(value, rel=1e-6, abs=1e-12), step


def test_decay_mask_is_exactly_the_multi_axis_params(tiny_config):
    """Name-based mask == 'more than one logical axis besides layers' (norms are 1-D)."""
    c = tiny_config(model={"norm": "layernorm"})  # adds biases, which must be excluded too
    boxed = jax.eval_shape(
        Llama(c.model).init,
        jax.random.key(0),
        jnp.zeros((1, 4), jnp.int32),
    )["params"]
    is_box = lambda x: isinstance(x, nn.Partitioned)
    by_axes = jax.tree.map(
        lambda b: len([n for n in b.names if n != "layers"]) > 1, boxed, is_leaf=is_box
    )
    by_name = decay_mask(nn.meta.unbox(boxed))
    assert by_name == by_axes
    assert not by_name["layers"]["attention_norm"]["bias"] and by_name["output"]


# ---- gradient accumulation --------------------------------------------------------------


@pytest.mark.slow
def test_grad_accumulation_matches_one_big_batch(tiny_config, mesh_of):
    mesh = mesh_of(2, 2, 2)
    batch = make_batch(tiny_config())
    state, shardings = random_state(tiny_config(), mesh)
    copy = jax.tree.map(jnp.copy, state)  # each step donates its input state
    results = []
    for cfg, s in ((tiny_config(), state), (tiny_config(grad_accum_steps=4), copy)):
        s, metrics = ts.make_train_step(cfg, mesh, shardings)(s, batch, {})
        results.append((jax.tree.map(np.asarray, s.params), jax.tree.map(float, metrics)))
    (big_params, big), (acc_params, acc) = results
    assert rel_err(acc["loss"], big["loss"]) < 1e-5
    assert rel_err(acc["grad_norm"], big["grad_norm"]) < 1e-5
    assert acc["tokens"] == big["tokens"] == batch["loss_mask"].sum()
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(acc_params), jax.tree.leaves(big_params)
    ):
        assert rel_err(a, b) < 1e-5, jax.tree_util.keystr(path)


def test_grad_accumulation_rejects_uneven_split(tiny_config, mesh_of):
    # Now refused when the config is built, before anything is traced.
    with pytest.raises(ValueError, match="not divisible by train.grad_accum_steps=3"):
        tiny_config(grad_accum_steps=3)
    cfg = tiny_config(grad_accum_steps=4)  # 16 / 4 = 4 rows per microbatch, 8 devices
    mesh = mesh_of(8, 1, 1)
    state, shardings = ts.abstract_train_state(cfg, mesh)
    with pytest.raises(ValueError, match="4 rows does not split over the 8 data x fsdp"):
        ts.make_train_step(cfg, mesh, shardings).lower(state, ts.abstract_batch(cfg, mesh), {})


# ---- remat policies ---------------------------------------------------------------------


@pytest.mark.slow
def test_remat_policies_same_grads_and_memory_order(tiny_config, mesh_of):
    """Every policy computes the same gradient; temp memory full < save_linear < none."""
    cfg = tiny_config(model={"n_layers": 8, "max_seq_len": 128}, batch_size=4, seq_len=128)
    mesh = mesh_of(1, 1, 1)
    batch = make_batch(cfg)
    params = random_state(cfg, mesh)[0].params
    grads, temp = {}, {}
    for policy in sorted(REMAT_POLICIES):
        cfg = cfg.replace({"model.remat_policy": policy})
        _, shardings = ts.abstract_train_state(cfg, mesh)
        fn = jax.jit(ts.make_loss_and_grads(cfg, mesh, shardings.params))
        compiled = fn.lower(params, batch, {}).compile()
        temp[policy] = compiled.memory_analysis().temp_size_in_bytes
        grads[policy] = compiled(params, batch, {})[1]
    for policy, g in grads.items():
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(grads["none"])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=policy)
    assert temp["full"] < temp["save_linear"] < temp["none"], temp


def test_unknown_remat_policy_is_a_clear_error(tiny_config):
    with pytest.raises(ValueError, match="unknown remat policy.*valid.*save_linear"):
        tiny_config(model={"remat_policy": "save_everything_twice"})


# ---- the step end to end: training, eval, skipping non-finite steps ---------------------


@pytest.mark.slow
def test_step_trains_evaluates_and_skips_nonfinite(tiny_config, mesh_of):
    cfg = tiny_config(skip_nonfinite=True, lr=3e-3)
    mesh = mesh_of(1, 4, 2)
    state, shardings = ts.create_train_state(cfg, mesh)
    step = ts.make_train_step(cfg, mesh, shardings)
    evaluate = ts.make_eval_step(cfg, mesh, shardings)
    batch = make_batch(cfg)

    before = float(evaluate(state.params, batch, {})["loss"])
    losses = []
    for _ in range(5):  # memorize one batch
        state, m = step(state, batch, {})
        losses.append(float(m["loss"]))
        assert float(m["skipped"]) == 0
    assert losses[0] == pytest.approx(before, rel=1e-6)  # eval and train losses agree
    assert losses[-1] < losses[0] - 0.1, losses
    assert float(evaluate(state.params, batch, {})["loss"]) < losses[-1]

    kept = jax.tree.map(np.asarray, (state.params, state.opt_state))
    bad = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
    state, m = step(state, bad, {})
    assert float(m["skipped"]) == 1 and int(state.step) == 6
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves(kept)):
        np.testing.assert_array_equal(np.asarray(a), b)
