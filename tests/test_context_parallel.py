"""Sequence parallelism and context parallelism (parallel/context.py): every mesh's loss, every
gradient and 5 AdamW steps against the unsharded model; the communication from the HLO."""

import dataclasses
import functools
import math
import os
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_attention import TOL, make_inputs, np_attention
from test_attention import rel_err as attention_rel_err
from test_train import losses, run_train, small_cfg

from llama_jax.config import MeshConfig, RunConfig
from llama_jax.parallel import context
from llama_jax.parallel import sharding as shd
from llama_jax.train import step as ts
from llama_jax.train.optim import make_optimizer

U32 = 2.0**-24  # float32 unit roundoff
LAMBDA = 4.0  # confidence of the probabilistic rounding bound (below)


def grad_bound(mc, T: int) -> float:
    """Norm-wise relative distance allowed between two float32 evaluations of the loss or a
    gradient that differ only in how their sums are split and ordered (over devices, tiles,
    ring steps, microbatches).

    Derivation. An inner product of length n in float32 has, under the probabilistic model of
    rounding (Higham & Mary 2019, Thm 3.1), a relative error below lambda sqrt(n) u with
    probability >= 1 - 2 exp(-lambda^2 / 2) (lambda = 4: 0.9993). The loss and each gradient
    come from a chain of such reductions: per layer, forward norm (D), q/k/v (D), scores (H),
    softmax and PV (S = T), wo (N H = D), norm (D), w1/w3 (D), w2 (F); the backward runs the
    same reductions again (transposed); then the final norm (D) and the head (V, then D in
    its backward). Independent errors add in quadrature: lambda sqrt(sum n_i) u for one
    evaluation (a random-init network's layers are well conditioned: no amplification is
    assumed), and two evaluations differ by at most twice that.
    """
    D, H, F, V = mc.dim, mc.head_dim, mc.mlp_dim, mc.vocab_size
    per_layer = D + D + H + T + D + D + D + F
    n = 2 * mc.n_layers * per_layer + D + V + D
    return 2 * LAMBDA * math.sqrt(n) * U32


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def make_cfg(tiny_config, mesh=None, **model):
    """tiny_config's model (GQA: 4 heads over 2 kv heads) at T = 32, batch 8, blockwise tiles
    of 8 (so every context shard has several tiles), and the given mesh options."""
    m = {"attention_impl": "blockwise", "attn_block_q": 8, "attn_block_k": 8, **model}
    cfg = tiny_config(m, batch_size=8, seq_len=32)
    return RunConfig(model=cfg.model, train=cfg.train, mesh=MeshConfig(**(mesh or {})))


def make_batch(cfg, seed=0):
    """Random tokens, ~20% of targets masked; the first half of the rows one document each, the
    second half packed with 1-4 documents (boundaries anywhere, positions restart per
    document): both attention masks in one batch."""
    rng = np.random.default_rng(seed)
    B, T, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
    toks = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    seg = np.sort(rng.integers(0, 4, (B, T)), axis=1).astype(np.int32)
    seg[: B // 2] = 0
    starts = np.concatenate([np.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    idx = np.broadcast_to(np.arange(T), (B, T))
    first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "loss_mask": (rng.random((B, T)) < 0.8).astype(np.float32),
        "segment_ids": seg,
        "positions": (idx - first).astype(np.int32),
    }


def mesh_for(sizes):
    """(data, fsdp, tensor, context) -> a mesh over the first prod(sizes) simulated devices."""
    return shd.make_mesh(*sizes, devices=jax.devices()[: math.prod(sizes)])


def run(cfg, sizes, batch, steps: int):
    """(loss, grads, params after `steps` AdamW steps on `batch`) on the mesh of `sizes`, by the
    step's own gradient function (ts.make_loss_and_grads, jitted) and optimizer
    (make_optimizer): the model compiles once for both checks (make_train_step is these two
    in one jit; the end-to-end test below runs it on a context x tensor x SP mesh)."""
    mesh = mesh_for(sizes)
    state, shardings = ts.create_train_state(cfg, mesh)
    grad_fn = jax.jit(ts.make_loss_and_grads(cfg, mesh, shardings.params))
    tx = make_optimizer(cfg.train)

    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    loss, grads, _ = grad_fn(state.params, batch, {})
    params, opt_state, g = state.params, state.opt_state, grads
    for i in range(steps):
        if i:
            g = grad_fn(params, batch, {})[1]
        params, opt_state = update(params, opt_state, g)
    host = lambda t: jax.tree.map(np.asarray, t)
    return float(loss), host(grads), host(params)


@pytest.fixture(scope="module")
def unsharded(tiny_config):
    """The reference: one device, plain softmax attention (no tiles, no shards), per remat
    policy."""
    cache = {}

    def get(remat="save_linear"):
        if remat not in cache:
            cfg = make_cfg(tiny_config, attention_impl="reference", remat_policy=remat)
            cache[remat] = run(cfg, (1, 1, 1, 1), make_batch(cfg), STEPS)
        return cache[remat]

    return get


STEPS = 5


def check_parity(got, want, cfg):
    """Loss, every gradient, and the params after STEPS AdamW steps within grad_bound."""
    bound = grad_bound(cfg.model, cfg.train.seq_len)
    (loss, grads, params), (loss0, grads0, params0) = got, want
    assert rel_err(loss, loss0) <= bound, (loss, loss0, bound)
    flat = jax.tree_util.tree_leaves_with_path(grads)
    for (path, g), g0 in zip(flat, jax.tree.leaves(grads0)):
        name = jax.tree_util.keystr(path)
        assert rel_err(g, g0) <= bound, (name, rel_err(g, g0), bound)
    # After k steps of lr a parameter differs from the reference by at most k lr times the
    # difference of the AdamW updates u = m_hat / sqrt(v_hat) (weight decay's share is second
    # order). The gradient check above allows any element an absolute error up to
    # E = bound |g| (|g| the leaf's norm). u is invariant to scaling a coordinate's gradients,
    # so only their relative errors, at most E / |g_i|, change it: |du_i| <= 2 |u_i| E / |g_i|,
    # and a flipped sign at most 2 |u_i|; |u_i| <= 1.5 over the first steps (b1 = 0.9 below
    # sqrt(b2) = 0.97: by Cauchy-Schwarz m_hat / sqrt(v_hat) stays near 1). Using the first
    # step's reference gradient for every step, plus both sides' rounding of p (2 u).
    k, lr = STEPS, cfg.train.lr
    flat = jax.tree_util.tree_leaves_with_path(params)
    for (path, p), p0, g0 in zip(flat, jax.tree.leaves(params0), jax.tree.leaves(grads0)):
        g0 = np.abs(np.asarray(g0, np.float64))
        du = 3.0 * np.minimum(1.0, bound * np.linalg.norm(g0) / np.maximum(g0, 1e-30))
        allowed = k * lr * np.linalg.norm(du) / np.linalg.norm(p0) + 2 * U32
        name, err = jax.tree_util.keystr(path), rel_err(p, p0)
        assert err <= allowed, (name, err, allowed)


# (data, fsdp, tensor, context), mesh options: the five meshes.
MESHES = {
    "context8-ring": ((1, 1, 1, 8), dict(context=8, context_strategy="ring")),
    "data2-context4-allgather": ((2, 1, 1, 4), dict(data=2, context=4)),
    "fsdp2-context2-tensor2-sp-ring": (
        (1, 2, 2, 2),
        dict(fsdp=2, tensor=2, context=2, sequence_parallel=True, context_strategy="ring"),
    ),
    "tensor4-sp": ((1, 1, 4, 1), dict(fsdp=1, tensor=4, sequence_parallel=True)),
    "data2-fsdp2-tensor2-sp": (
        (2, 2, 2, 1),
        dict(data=2, fsdp=2, tensor=2, sequence_parallel=True),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(MESHES))
def test_mesh_matches_unsharded(tiny_config, unsharded, mesh):
    """GQA (4 heads over 2), single-document and packed rows, remat save_linear."""
    sizes, options = MESHES[mesh]
    cfg = make_cfg(tiny_config, options)
    check_parity(run(cfg, sizes, make_batch(cfg), STEPS), unsharded(), cfg)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["context8-ring", "fsdp2-context2-tensor2-sp-ring"])
def test_full_remat_and_accumulation_match_unsharded(tiny_config, unsharded, mesh):
    """Remat full and 2-way gradient accumulation (each microbatch zig-zagged on its own): the
    one-device, one-batch reference's values (save_linear: every test above)."""
    sizes, options = MESHES[mesh]
    cfg = make_cfg(tiny_config, options, remat_policy="full")
    train = dataclasses.replace(cfg.train, grad_accum_steps=2)
    cfg = RunConfig(model=cfg.model, train=train, mesh=cfg.mesh)
    check_parity(run(cfg, sizes, make_batch(cfg), STEPS), unsharded("full"), cfg)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
def test_a_broken_merge_fails_parity(tiny_config, unsharded, strategy, monkeypatch):
    """Planted bugs must fail check_parity: ring partial results added without their
    log-sum-exp weights; all_gather with each shard's queries indexed as if they were the
    first shard's (the causal mask of a contiguous split, not of the zig-zag layout)."""
    if strategy == "ring":
        monkeypatch.setattr(context, "_merge", lambda o, lse, o_s, lse_s: (o + o_s, lse))
    else:
        monkeypatch.setattr(context, "_shard_index", lambda T, n, r: jnp.arange(T))
    sizes, options = MESHES["context8-ring" if strategy == "ring" else "data2-context4-allgather"]
    cfg = make_cfg(tiny_config, options)
    with pytest.raises(AssertionError):
        check_parity(run(cfg, sizes, make_batch(cfg), STEPS), unsharded(), cfg)


def test_zigzag_layout():
    order = context.zigzag_order(16, 4)  # 8 chunks of 2: shard r holds chunks r and 7 - r
    assert order.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="multiple of 2 x mesh.context"):
        context.zigzag_order(12, 4)


def test_sequence_parallel_needs_tensor():
    with pytest.raises(ValueError, match="needs mesh.tensor > 1"):
        MeshConfig(sequence_parallel=True)
    with pytest.raises(ValueError, match="context strategy"):
        MeshConfig(context_strategy="ulysses")


# ---- the communication, read from the compiled HLO ---------------------------------------


def _partitioned_hlo(cfg, sizes, tmp_path, grad: bool) -> str:
    """The step's HLO right after XLA's SPMD partitioner (the train step with grad, else the
    eval step: the forward alone). Read there because the CPU pipeline never forms
    reduce-scatter: the partitioner writes it as all-reduce + dynamic-slice of the shard,
    which GPU XLA's ReduceScatterCreator then fuses into one reduce-scatter."""
    mesh = mesh_for(sizes)
    abstract, shardings = ts.abstract_train_state(cfg, mesh)
    batch = ts.abstract_batch(cfg, mesh, loss_mask=True)
    if grad:
        lowered = ts.make_train_step(cfg, mesh, shardings).lower(abstract, batch, {})
    else:
        lowered = ts.make_eval_step(cfg, mesh, shardings).lower(abstract.params, batch, {})
    dump = tmp_path / "hlo"
    lowered.compile({"xla_dump_to": str(dump), "xla_dump_hlo_pass_re": "spmd-partitioning"})
    (path,) = [p for p in dump.glob("*after_spmd-partitioning*") if "_fn" in p.name]
    return path.read_text()


def _collectives(hlo: str, op: str):
    """[(result shape, [opcodes of its users])] of every `op` instruction in HLO text."""
    instr = re.compile(r"\s*(?:ROOT )?(%\S+) = (\([^=]*?\)|\S+) ([\w-]+)\(")
    parsed = [(m, line) for line in hlo.splitlines() if (m := instr.match(line))]
    out = []
    for m, _ in parsed:
        if m.group(3) == op:
            used = re.compile(re.escape(m.group(1)) + r"[,)]")
            users = [u.group(3) for u, line in parsed if u is not m and used.search(line)]
            out.append((m.group(2), users))
    return out


def _elements(shape: str) -> int:
    return math.prod(int(d) for d in re.match(r"\w+\[([\d,]*)\]", shape).group(1).split(",") if d)


@pytest.mark.slow
def test_sequence_parallel_reduce_scatters_instead_of_all_reduce(tiny_config, tmp_path):
    """(tensor 4): the block's row-parallel outputs (wo, w2) are all-reduced in full [B, T, D]
    without SP; with SP each such reduction only feeds the slice of its own shard (a
    reduce-scatter), and the column-parallel blocks' inputs are all-gathered."""
    activation = 8 * 32 * 64  # B x T x D of make_cfg's batch
    cfg = make_cfg(tiny_config, dict(fsdp=1, tensor=4))
    plain = _collectives(_partitioned_hlo(cfg, (1, 1, 4, 1), tmp_path / "tp", False), "all-reduce")
    full = [users for shape, users in plain if _elements(shape) == activation]
    assert any(set(u) != {"dynamic-slice"} for u in full), plain  # the control: all-reduces
    cfg = make_cfg(tiny_config, MESHES["tensor4-sp"][1])
    hlo = _partitioned_hlo(cfg, (1, 1, 4, 1), tmp_path / "sp", False)
    sp = [
        users for shape, users in _collectives(hlo, "all-reduce") if _elements(shape) == activation
    ]
    assert len(sp) >= 2 and all(set(u) == {"dynamic-slice"} for u in sp), sp  # wo, w2
    gathers = [s for s, _ in _collectives(hlo, "all-gather") if _elements(s) == activation]
    assert len(gathers) >= 2, gathers  # attention's and the MLP's input (and the head's)


@pytest.mark.slow
def test_ring_sends_kv_blocks_and_gathers_nothing(tiny_config, tmp_path):
    """(context 8, ring), forward: per layer context - 1 = 7 sends each of K and V (one scanned
    layer body in the HLO), each a [B, T/8, K, H] block (tiled), and no all-gather at all."""
    cfg = make_cfg(tiny_config, MESHES["context8-ring"][1])
    hlo = _partitioned_hlo(cfg, (1, 1, 1, 8), tmp_path, False)
    sends = [s for s, _ in _collectives(hlo, "collective-permute")]
    B, T, K, H = 8, 32, cfg.model.kv_heads, cfg.model.head_dim
    assert len(sends) == 2 * 7 and all(_elements(s) == B * (T // 8) * K * H for s in sends), sends
    assert _collectives(hlo, "all-gather") == []


# ---- the attention alone, against float64 ------------------------------------------------


@pytest.mark.parametrize(
    "strategy, segments",
    [
        ("ring", True),
        pytest.param("ring", False, marks=pytest.mark.slow),
        pytest.param("all_gather", True, marks=pytest.mark.slow),
        pytest.param("all_gather", False, marks=pytest.mark.slow),
    ],
)
def test_context_attention_matches_float64(strategy, segments):
    """Zig-zag shards over context 4, GQA (4 heads over 2): outputs and dq, dk, dv against
    test_attention's float64 numpy attention on the natural order, within its float32
    tolerance (test_attention.TOL)."""
    B, T, N, K, H, P_ = 2, 32, 4, 2, 16, 4
    q, k, v, do, seg = make_inputs(B, T, T, N, K, H, "float32", segments)
    want = np_attention(q, k, v, do, segment_ids=seg)
    order = context.zigzag_order(T, P_)
    mesh = mesh_for((2, 1, 1, P_))
    z = lambda x: None if x is None else x[:, order]
    attn = functools.partial(context.context_attention, mesh=mesh, strategy=strategy, block=4)

    def fwd_bwd(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, z(seg)), q, k, v)
        return o, *vjp(do)

    got = jax.jit(fwd_bwd)(z(q), z(k), z(v), z(do))
    inverse = np.argsort(order)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        assert attention_rel_err(np.asarray(g)[:, inverse], w) <= TOL["float32"], name


# ---- end to end: launch.train ------------------------------------------------------------


@pytest.mark.slow
def test_train_context_tensor_sp_matches_data_parallel_and_resumes(tmp_path, tiny_dataset):
    """launch.train on 8 devices, (fsdp 2, tensor 2, context 2, SP) against (data 8): the same
    per-step losses; SIGKILLed at step 7, the resumed run's losses are the uninterrupted
    run's exactly; and the killed run resumes onto context 4 (a re-shard) without a warning."""
    cp = ("mesh.fsdp=-1", "mesh.tensor=2", "mesh.context=2", "mesh.sequence_parallel=true")
    # sync saves: the SIGKILL at step 7 must find step 5's checkpoint committed
    steps = ("train.steps=10", "train.eval_every=0", "checkpoint.every_steps=5",
             "checkpoint.async_save=false")  # fmt: skip
    run_train(tmp_path / "dp", tiny_dataset, "mesh.data=8", "mesh.fsdp=1", *steps, devices=8)
    run_train(tmp_path / "cp", tiny_dataset, *cp, *steps, devices=8)
    dp, cp_losses = losses(tmp_path / "dp"), losses(tmp_path / "cp")
    assert sorted(dp) == sorted(cp_losses) == list(range(1, 11))
    # Step s's loss is one float32 evaluation after s - 1 updates, each from gradients within
    # grad_bound of the other mesh's (test_mesh_matches_unsharded's derivation); over a few
    # steps at a small lr the differences add, not multiply: s x grad_bound.
    cfg = small_cfg(tiny_dataset)
    for s in dp:
        bound = s * grad_bound(cfg.model, cfg.train.seq_len)
        assert rel_err(cp_losses[s], dp[s]) <= bound, (s, cp_losses[s], dp[s], bound)

    killed, moved = tmp_path / "killed", tmp_path / "moved"
    env = {"LLAMA_JAX_SIGNAL_AT_STEP": "9:7"}
    r = run_train(killed, tiny_dataset, *cp, *steps, devices=8, env=env, check=False)
    assert r.returncode == -signal.SIGKILL
    shutil.copytree(killed, moved)
    r = run_train(killed, tiny_dataset, *cp, *steps, devices=8)
    assert f"resumed from {killed / 'checkpoints'} step 5" in r.stderr
    got = losses(killed)
    assert [got[s] for s in range(1, 11)] == [cp_losses[s] for s in range(1, 11)]

    # The same killed run resumed onto context 4: re-sharded on restore, no warning; the
    # other mesh's losses are within the bound above.
    r = run_train(moved, tiny_dataset, *cp[:3], "mesh.context=4", *steps, devices=8)
    assert f"resumed from {moved / 'checkpoints'} step 5" in r.stderr
    lines = r.stderr.splitlines()  # the kill's stale run.lock is taken over, with a warning
    warned = [x for x in lines if "warn" in x.lower() and "stale lock of dead pid" not in x]
    assert warned == [], warned
    got = losses(moved)
    assert sorted(got) == list(range(1, 11))
    for s in got:
        assert rel_err(got[s], cp_losses[s]) <= s * grad_bound(cfg.model, cfg.train.seq_len)


# ---- memory: memory_analysis() of the compiled step --------------------------------------


@pytest.mark.slow
def test_activations_shrink_with_tensor_under_sp_and_with_context():
    """tiny.py's shape at T = 1024, one sequence, save_linear, float32: per-device activations
    (XLA's temp bytes less the gradients) fall with tensor under SP below plain tensor
    parallelism's (SP splits the residual-layout activations that TP replicates), and with
    context at least as fast as analytic_activations' 1/context predicts for the token part
    (2x: the estimate's own tolerance in test_memory); each within 2x of the estimate."""
    from llama_jax.config import load
    from llama_jax.train import memory

    base = ["train.seq_len=1024", "model.max_seq_len=1024", "train.batch_size=1",
            "model.attn_block_q=64", "model.attn_block_k=64", "mesh.fsdp=1"]  # fmt: skip
    act, est = {}, {}
    for name, extra in {
        "1": [],
        "t4": ["mesh.tensor=4"],
        "t4-sp": ["mesh.tensor=4", "mesh.sequence_parallel=true"],
        "c4": ["mesh.context=4"],
    }.items():
        cfg = load(f"{os.path.dirname(__file__)}/../configs/tiny.py", [*base, *extra])
        mesh = mesh_for(cfg.mesh.sizes)
        (row,) = memory.analyze(cfg, mesh, ["save_linear"])["policies"]
        act[name], est[name] = row["activations"], row["analytic_activations"]
    assert act["t4-sp"] < act["t4"] < act["1"], act
    assert est["t4-sp"] < est["t4"] < est["1"], est
    assert act["c4"] < act["1"] / 2, act
    for name in act:
        assert 0.5 < est[name] / act[name] < 2.0, (name, est[name], act[name])


@pytest.mark.slow
def test_lora_composes_with_ring_and_sequence_parallelism(tiny_config):
    """LoRA (its interceptor) inside the context-parallel one: (tensor 2, context 4, ring, SP)
    gives the one-device LoRA loss and adapter gradients within grad_bound."""
    got = {}
    for sizes, options in [
        ((1, 1, 1, 1), dict(fsdp=1)),
        ((1, 1, 2, 4), dict(fsdp=1, tensor=2, context=4, context_strategy="ring",
                            sequence_parallel=True)),
    ]:  # fmt: skip
        cfg = make_cfg(tiny_config, options, lora_rank=4, lora_targets="q,v,w2")
        mesh = mesh_for(sizes)
        state, shardings = ts.create_train_state(cfg, mesh)
        frozen = ts.random_frozen(cfg, mesh)
        grad_fn = jax.jit(ts.make_loss_and_grads(cfg, mesh, shardings.params))
        loss, grads, _ = grad_fn(state.params, make_batch(cfg), frozen)
        got[sizes] = float(loss), jax.tree.map(np.asarray, grads)
    (loss0, grads0), (loss, grads) = got.values()
    bound = grad_bound(cfg.model, cfg.train.seq_len)
    assert rel_err(loss, loss0) <= bound
    # A starts random and B at zero, so A's gradients are exactly 0 on both sides
    for (path, g), g0 in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads0)):
        assert rel_err(g, g0) <= bound or (not g0.any() and not g.any()), jax.tree_util.keystr(path)
