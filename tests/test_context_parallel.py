"""Sequence parallelism and context parallelism (parallel/context.py): every mesh's loss, every
gradient and 5 AdamW steps against the unsharded model; the communication from the HLO."""

import functools
import math
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import TOL, make_inputs, np_attention
from test_attention import rel_err as attention_rel_err
from test_train import losses, run_train, small_cfg

from llama_jax.config import MeshConfig, RunConfig
from llama_jax.parallel import context
from llama_jax.parallel import sharding as shd
from llama_jax.train import step as ts

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


def make_batch(cfg, packed: bool, seed=0):
    rng = np.random.default_rng(seed)
    B, T, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
    toks = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    batch = {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "loss_mask": (rng.random((B, T)) < 0.8).astype(np.float32),
    }
    if packed:  # 1-4 documents a row, boundaries anywhere; positions restart per document
        seg = np.sort(rng.integers(0, 4, (B, T)), axis=1).astype(np.int32)
        starts = np.concatenate([np.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        idx = np.broadcast_to(np.arange(T), (B, T))
        first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
        batch["segment_ids"], batch["positions"] = seg, (idx - first).astype(np.int32)
    return batch


def mesh_for(sizes):
    """(data, fsdp, tensor, context) -> a mesh over the first prod(sizes) simulated devices."""
    return shd.make_mesh(*sizes, devices=jax.devices()[: math.prod(sizes)])


def run(cfg, sizes, batch, steps: int):
    """(loss, grads, params after `steps` AdamW steps on `batch`) on the mesh of `sizes`."""
    mesh = mesh_for(sizes)
    state, shardings = ts.create_train_state(cfg, mesh)
    grad_fn = jax.jit(ts.make_loss_and_grads(cfg, mesh, shardings.params))
    loss, grads, _ = grad_fn(state.params, batch, {})
    step = ts.make_train_step(cfg, mesh, shardings)
    for _ in range(steps):
        state, _ = step(state, batch, {})
    host = lambda t: jax.tree.map(np.asarray, t)
    return float(loss), host(grads), host(state.params)


@pytest.fixture(scope="module")
def unsharded(tiny_config):
    """The reference: one device, plain softmax attention (no tiles, no shards), per batch
    kind and model variant."""
    cache = {}

    def get(packed: bool, remat="save_linear"):
        key = (packed, remat)
        if key not in cache:
            cfg = make_cfg(tiny_config, attention_impl="reference", remat_policy=remat)
            cache[key] = run(cfg, (1, 1, 1, 1), make_batch(cfg, packed), STEPS)
        return cache[key]

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
    # After k steps of lr, a parameter differs from the reference by at most k lr times the
    # difference of the (clipped, normalized) AdamW updates. Where a gradient is far from zero
    # the update m / sqrt(v) inherits the gradient's relative error; AdamW's update of a
    # coordinate is at most ~1 in size, so with the per-step bound on the updates the
    # parameter's norm-wise error is at most k lr sqrt(size) bound / |p| (each step's error
    # added, no cancellation), plus the two evaluations' own rounding of p (2 u).
    k, lr = STEPS, cfg.train.lr
    for (path, p), p0 in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(params0)):
        name, err = jax.tree_util.keystr(path), rel_err(p, p0)
        allowed = k * lr * math.sqrt(p0.size) * bound / np.linalg.norm(p0) + 2 * U32
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
@pytest.mark.parametrize("packed", [False, True], ids=["gqa", "gqa-packed"])
@pytest.mark.parametrize("mesh", list(MESHES))
def test_mesh_matches_unsharded(tiny_config, unsharded, mesh, packed):
    sizes, options = MESHES[mesh]
    cfg = make_cfg(tiny_config, options)
    check_parity(run(cfg, sizes, make_batch(cfg, packed), STEPS), unsharded(packed), cfg)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "save_linear"])
@pytest.mark.parametrize("mesh", ["context8-ring", "fsdp2-context2-tensor2-sp-ring"])
def test_remat_and_accumulation_match_unsharded(tiny_config, unsharded, mesh, remat):
    """2-way gradient accumulation (each microbatch zig-zagged on its own) under a remat
    policy, packed documents: the one-device, one-batch reference's values."""
    sizes, options = MESHES[mesh]
    cfg = make_cfg(tiny_config, options, remat_policy=remat)
    cfg = RunConfig(model=cfg.model, train=cfg.train.replace(grad_accum_steps=2), mesh=cfg.mesh)
    check_parity(run(cfg, sizes, make_batch(cfg, True), STEPS), unsharded(True), cfg)


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
    got = run(cfg, sizes, make_batch(cfg, False), 1)
    want = unsharded(False)
    with pytest.raises(AssertionError):
        assert rel_err(got[0], want[0]) <= grad_bound(cfg.model, cfg.train.seq_len)


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
    run's exactly; and its checkpoint resumes onto context 4 (a re-shard) without a warning."""
    cp = ("mesh.fsdp=-1", "mesh.tensor=2", "mesh.context=2", "mesh.sequence_parallel=true")
    steps = ("train.steps=10", "train.eval_every=0", "checkpoint.every_steps=5")
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

    killed = tmp_path / "killed"
    env = {"LLAMA_JAX_SIGNAL_AT_STEP": "9:7"}
    r = run_train(killed, tiny_dataset, *cp, *steps, devices=8, env=env, check=False)
    assert r.returncode == -signal.SIGKILL
    run_train(killed, tiny_dataset, *cp, *steps, devices=8)
    got = losses(killed)
    assert [got[s] for s in range(1, 11)] == [cp_losses[s] for s in range(1, 11)]

    more = ("train.steps=12", "train.eval_every=0", "checkpoint.every_steps=5")
    r = run_train(killed, tiny_dataset, *cp[:3], "mesh.context=4", *more, devices=8)
    assert "resumed from" in r.stderr and "step 10" in r.stderr
    warned = [line for line in r.stderr.splitlines() if "warn" in line.lower()]
    assert warned == [], warned
    assert sorted(losses(killed)) == list(range(1, 13))
