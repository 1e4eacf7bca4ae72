"""The hand-written backward passes of the lean step (loss.head_loss, ops.dense) against
independent references: float64 NumPy written here, and transformers' PyTorch LLaMA.

Bounds (float32, unit roundoff u = 2^-24 ~ 6e-8): an output element that sums K products
carries a rounding error of at most K*u times the sum of the |products| (the standard dot
product bound), so each element is checked against (K + 16)*u * (|a| @ |b|) computed here in
float64; the +16 covers the few elementwise roundings before the matmul (exp, subtract,
scale: each one ulp, relative). This bound cannot be loosened by an actual error: a wrong
transpose or a missing term moves an element by the size of the element itself.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.model import loss, ops

U32 = 2.0**-24


def _bound(k: int, a, b):
    """(k + 16) u * (|a| @ |b|): the float32 error bound of a length-k contraction."""
    return (k + 16) * U32 * (np.abs(a) @ np.abs(b))


def _reference_head_loss(x, w, targets, mask):
    """Loss, dx, dw in float64: softmax cross entropy of x @ w, summed under the mask."""
    logits = x @ w  # [M, V]
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1)) + logits.max(-1)
    picked = logits[np.arange(len(targets)), targets]
    g = p.copy()
    g[np.arange(len(targets)), targets] -= 1.0
    g *= mask[:, None]
    return np.sum((lse - picked) * mask), g @ w.T, x.T @ g, g


def test_head_loss_value_and_gradients_match_float64():
    B, T, D, V = 2, 24, 32, 96
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    w = (rng.normal(size=(D, V)) / np.sqrt(D) * 3).astype(np.float32)  # peaked softmax
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)

    def f(x, w):
        return loss.head_loss(x, w, targets, mask)[0]

    value, (dx, dw) = jax.value_and_grad(f, argnums=(0, 1))(x, w)
    M = B * T
    x2, t2, m2 = x.reshape(M, D).astype(np.float64), targets.reshape(M), mask.reshape(M)
    want, want_dx, want_dw, g = _reference_head_loss(x2, w.astype(np.float64), t2, m2)
    # the loss sums M terms of size ~log V, each through a logsumexp of V terms
    assert abs(float(value) - want) <= (M + V + 16) * U32 * np.sum(np.abs(want) + M)
    assert np.all(np.abs(np.asarray(dx).reshape(M, D) - want_dx) <= _bound(V, g, np.abs(w.T)))
    assert np.all(np.abs(np.asarray(dw) - want_dw) <= _bound(M, x2.T, g))
    assert np.any(want_dw != 0) and np.all(np.asarray(dx).reshape(M, D)[m2 == 0] == 0)


@pytest.mark.parametrize("spec", ["BTD,DNH->BTNH", "BTNH,NHD->BTD", "BTD,DF->BTF", "BTF,FD->BTD"])
def test_dense_gradients_match_float64(spec):
    """dense's value and both gradients, for every linear layer the model has."""
    sizes = {"B": 2, "T": 12, "D": 16, "N": 4, "H": 8, "F": 24}
    ins, out = spec.split("->")
    xs, ws = ins.split(",")
    rng = np.random.default_rng(1)
    x = rng.normal(size=[sizes[c] for c in xs]).astype(np.float32)
    w = rng.normal(size=[sizes[c] for c in ws]).astype(np.float32)
    g = rng.normal(size=[sizes[c] for c in out]).astype(np.float32)
    y, vjp = jax.vjp(lambda x, w: ops.dense(spec, x, w), x, w)
    dx, dw = vjp(jnp.asarray(g))
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    summed = "".join(c for c in xs if c in ws)  # contracted in the forward
    batch = "".join(c for c in xs if c not in ws)  # contracted in the weight gradient
    k_fwd = int(np.prod([sizes[c] for c in summed]))
    k_w = int(np.prod([sizes[c] for c in batch]))
    k_x = int(np.prod([sizes[c] for c in out if c not in xs]))
    abs_ = np.abs
    checks = [
        (y, np.einsum(spec, x64, w64), k_fwd * 1.0, np.einsum(spec, abs_(x64), abs_(w64))),
        (dx, np.einsum(f"{out},{ws}->{xs}", g64, w64), k_x, np.einsum(f"{out},{ws}->{xs}", abs_(g64), abs_(w64))),
        (dw, np.einsum(f"{xs},{out}->{ws}", x64, g64), k_w, np.einsum(f"{xs},{out}->{ws}", abs_(x64), abs_(g64))),
    ]  # fmt: skip
    for got, want, k, scale in checks:
        assert got.shape == want.shape
        assert np.all(np.abs(np.asarray(got, np.float64) - want) <= (k + 16) * U32 * scale)


# ----------------------------------------------------------------------------- whole step

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["blockwise", "reference"])
def test_step_gradients_match_transformers_float64(tmp_path, impl):
    """The gradient of the training loss (dense layers, blockwise or reference attention,
    the fused head and loss, the embedding's float32 scatter) equals transformers' float64
    autograd gradient of the same loss on the same weights, leaf by leaf.

    HF's gradients come back through our own HF reader: they are saved as if they were
    weights, and hf.read_hf applies the layout changes (transposes, the q/k row order),
    which are linear, so the gradient maps like the weight. Bound: a float32 gradient leaf
    passes through ~50 roundings and contractions of length <= B*T = 48 or V = 96; their
    errors have random signs, so the relative L2 error is ~ u * sqrt(50 * 96) ~ 4e-6;
    1e-4 is 25x that, and a wrong gradient is off by O(1)."""
    from llama_jax.config import RunConfig, TrainConfig
    from llama_jax.parallel import sharding as shd
    from llama_jax.train import step as ts
    from llama_jax.weights import hf
    from tests.test_convert import hf_model, tokens

    model = hf_model(2).double()
    toks = tokens(batch=8, length=7, seed=3)  # B*T = 48 predicted tokens
    inputs, targets = toks[:, :-1], toks[:, 1:]
    mask = (np.random.default_rng(4).random(targets.shape) < 0.8).astype(np.float32)
    logits = model(torch.from_numpy(inputs)).logits
    lp = torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(targets)[..., None])[..., 0]
    m = torch.from_numpy(mask).double()
    (-(lp * m).sum() / m.sum()).backward()
    model.save_pretrained(tmp_path / "weights")
    for p in model.parameters():
        p.data.copy_(p.grad)
    model.save_pretrained(tmp_path / "grads")

    overrides = {"dtype": "float32", "attention_impl": impl, "attn_block_q": 4}
    overrides["attn_block_k"] = 4  # several tiles, the causal skip included
    # read in float32: rounding the float64 reference adds at most u per element
    params, cfg = hf.read_hf(str(tmp_path / "weights"), np.float32, overrides)
    want, _ = hf.read_hf(str(tmp_path / "grads"), np.float32, overrides)
    run = RunConfig(model=cfg, train=TrainConfig(batch_size=8, seq_len=6))
    mesh = shd.make_mesh(8, 1, 1)  # the batch split over the 8 simulated devices
    _, shardings = ts.abstract_train_state(run, mesh)
    loss_and_grads = jax.jit(ts.make_loss_and_grads(run, mesh, shardings.params))
    batch = {"inputs": inputs, "targets": targets, "loss_mask": mask}
    _, grads, _ = loss_and_grads(jax.tree.map(jnp.asarray, params), batch, {})
    errors = {}
    for path, got in jax.tree_util.tree_leaves_with_path(grads):
        ref = want
        for k in path:
            ref = ref[k.key]
        ref = np.asarray(ref, np.float64)
        errors[jax.tree_util.keystr(path)] = float(
            np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref)
        )
    print(json.dumps(errors, indent=1))
    assert len(errors) == 12 and max(errors.values()) < 1e-4, errors
