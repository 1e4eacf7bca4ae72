"""LoRA: trained parameter count, a frozen base, adapter-only optimizer state, merged and PEFT
exports checked against the adapter model and against transformers + peft."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import ModelConfig, load
from llama_jax.model.llama import Llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = "q,k,v,o,w1,w2,w3"


@pytest.mark.parametrize("targets", ["q,v", ALL, "o,w2"])
def test_trained_parameter_count_is_the_formula(targets):
    """r x (fan-in + fan-out) of every adapted weight, per layer, written out by hand:
    q: D -> N*H, k and v: D -> K*H, o: N*H -> D, w1 and w3: D -> F, w2: F -> D."""
    D, N, K, H, F, L, r = 32, 4, 2, 8, 88, 3, 4
    cfg = ModelConfig(dim=D, n_layers=L, n_heads=N, n_kv_heads=K, vocab_size=64, multiple_of=8,
                      lora_rank=r, lora_targets=targets, dtype="float32")  # fmt: skip
    assert cfg.hidden_dim == F
    per = {"q": D + N * H, "k": D + K * H, "v": D + K * H, "o": N * H + D, "w1": D + F,
           "w2": F + D, "w3": D + F}  # fmt: skip
    want = L * r * sum(per[t] for t in targets.split(","))
    from llama_jax.adapters import lora

    variables = jax.eval_shape(
        lambda: lora.wrap(Llama(cfg), cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    )
    got = sum(math.prod(x.shape) for x in jax.tree.leaves(variables["lora"]))
    assert got == want
    assert lora.count(cfg) == want


def test_lora_wraps_any_model_from_outside():
    """LoRA knows no Llama: around a toy module whose linear layers go through project(), it
    declares A and B in that module's "lora" collection (logical axes from the spec's letters)
    and adds (alpha/r) x A B to the target's output, against float64 numpy; the projection
    that is not a target is left alone (without the adapters the toy's output is x W2 + x W1)."""
    import flax.linen as nn

    from llama_jax.adapters import lora
    from llama_jax.model.llama import Projections

    class Toy(Projections):
        @nn.compact
        def __call__(self, x):  # [B, T, F] -> [B, T, D]
            w2 = self.param("w2", nn.initializers.normal(1.0), (8, 4))  # [F, D]
            w1 = self.param("w1", nn.initializers.normal(1.0), (8, 4))  # [F, D]
            return self.project("w2", "BTF,FD->BTD", x, w2) + self.project(
                "w1", "BTF,FD->BTD", x, w1
            )

    wrapped = lora.LoRA(Toy(), rank=2, alpha=6.0, targets=("w2",))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 8)), jnp.float32)
    boxed = wrapped.init(jax.random.key(0), x)
    assert set(boxed) == {"params", "lora"} and set(boxed["lora"]) == {"w2_a", "w2_b"}
    assert boxed["lora"]["w2_a"].names == ("mlp", None)
    assert boxed["lora"]["w2_b"].names == (None, "embed")
    variables = nn.meta.unbox(boxed)
    variables["lora"]["w2_b"] = jnp.asarray(
        np.random.default_rng(1).normal(size=(2, 4)), jnp.float32
    )
    p, ad = (
        jax.tree.map(lambda t: np.asarray(t, np.float64), variables[c]) for c in ("params", "lora")
    )
    xd = np.asarray(x, np.float64)
    want = xd @ p["w2"] + xd @ p["w1"] + 3.0 * (xd @ ad["w2_a"]) @ ad["w2_b"]
    np.testing.assert_allclose(wrapped.apply(variables, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        Toy().apply({"params": variables["params"]}, x),
        xd @ p["w2"] + xd @ p["w1"],
        rtol=1e-5,
        atol=1e-5,
    )


def _bytes(tree) -> int:
    """Per-device bytes of a tree of arrays or ShapeDtypeStructs with shardings."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


@pytest.mark.slow
def test_base_is_frozen_and_optimizer_state_is_adapter_sized():
    """Three LoRA steps: the base params are bit-identical, the adapters moved, every optimizer
    moment has an adapter's shape, and the compiled step's arguments are the base, the
    adapters with their AdamW moments and the batch, per device, to the byte (a fully trained
    model would add three more copies of the base)."""
    from llama_jax.parallel.sharding import make_mesh
    from llama_jax.train import step as ts

    cfg = load(f"{ROOT}/configs/tiny.py", ["model.lora_rank=4", f"model.lora_targets={ALL}",
               "train.batch_size=8", "train.seq_len=32", "train.lr=1e-2", "train.warmup_steps=1"])  # fmt: skip
    mesh = make_mesh(1, -1, 1)
    state, shardings = ts.create_train_state(cfg, mesh)
    base = ts.random_frozen(cfg, mesh)
    before = jax.tree.map(np.asarray, base)
    step = ts.make_train_step(cfg, mesh, shardings)
    rng = np.random.default_rng(0)
    batch = {
        k: jnp.asarray(rng.integers(0, 2048, (8, 32)), jnp.int32) for k in ("inputs", "targets")
    }
    for _ in range(3):
        state, _ = step(state, batch, base)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), before)
    bs = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state.params)
          if str(p[-1]).endswith("_b']")]  # fmt: skip
    assert bs and all(np.abs(b).max() > 0 for b in bs)  # B started at zero
    adapter_shapes = {x.shape for x in jax.tree.leaves(state.params)}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert moments and {x.shape for x in moments} <= adapter_shapes
    compiled = ts.compile_train_step(cfg, mesh)
    abstract_state = ts.abstract_train_state(cfg, mesh)[0]
    want = _bytes(abstract_state) + _bytes(ts.abstract_frozen(cfg, mesh)[0])
    want += _bytes(ts.abstract_batch(cfg, mesh))
    assert compiled.memory_analysis().argument_size_in_bytes == want
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree) if x.ndim)  # noqa: E731
    assert size(state.opt_state) == 2 * size(state.params)  # AdamW's mu and nu, nothing else


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_dataset):
    """finetune_tiny with LoRA on all targets from a transformers model, trained hard enough
    (lr 1e-2) that the adapters change the logits well beyond the bounds below."""
    from test_finetune import tiny_hf

    from llama_jax.trainer import loop as trainer

    root = tmp_path_factory.mktemp("lora")
    model = tiny_hf(root / "hf", seed=3)
    cfg = load(f"{ROOT}/configs/finetune_tiny.py", [
        "model.vocab_size=512", "model.lora_rank=4", f"model.lora_targets={ALL}",
        "train.batch_size=8", "train.seq_len=32", "train.steps=20", "train.lr=1e-2",
        "train.eval_every=0", f"data.path={tiny_dataset[0]}", f"train.init_from=hf:{root / 'hf'}",
        "checkpoint.every_steps=20"])  # fmt: skip
    trainer.train(cfg, str(root / "run"))
    return root, model, cfg


def _adapter_logits(root, cfg, toks):
    """The adapter model's logits: the checkpoint's adapters over the reloaded base."""
    from llama_jax.adapters import lora
    from llama_jax.checkpoint.manager import Checkpointer
    from llama_jax.parallel.sharding import make_mesh
    from llama_jax.train import step as ts
    from llama_jax.weights import init_from

    run = init_from.apply_source(cfg)
    mesh = make_mesh(1, -1, 1)
    ckpt = Checkpointer(str(root / "run" / "checkpoints"), read_only=True)
    state, _ = ckpt.restore(ts.abstract_train_state(run, mesh)[0])
    ckpt.close()
    base = init_from.load_params(run, ts.abstract_frozen(run, mesh)[1]["params"])
    variables = {"params": base, "lora": state.params}
    plain = Llama(lora.plain(run.model)).apply({"params": base}, toks)
    adapted = lora.wrap(Llama(run.model), run.model).apply(variables, toks)
    return np.asarray(adapted), np.asarray(plain)


@pytest.mark.slow
def test_merged_export_gives_the_adapter_models_logits(lora_run, capsys):
    """launch.export --merge-lora: plain params whose logits are the adapter model's. Bound:
    x(W + sAB) vs xW + s(xA)B in float32 reassociate sums of <= 352 terms: ~1e-6 relative;
    1e-5, while the adapters move the logits by far more (checked)."""
    from launch.export import main as export_main
    from llama_jax.weights.params_io import load_params

    root, _, cfg = lora_run
    export_main(["--workdir", str(root / "run"), "--output", str(root / "merged"), "--merge-lora"])
    params, mcfg = load_params(str(root / "merged"))
    assert mcfg.lora_rank == 0
    toks = jnp.asarray(np.random.default_rng(1).integers(0, 512, (2, 24)))
    adapted, plain = _adapter_logits(root, cfg, toks)
    merged = np.asarray(Llama(mcfg).apply({"params": params}, toks))
    scale = np.abs(adapted).max()
    assert np.abs(adapted - plain).max() > 1e-2 * scale  # the adapters matter
    np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=1e-5 * scale)
    with pytest.raises(SystemExit):  # a LoRA run's --output needs --merge-lora
        export_main(["--workdir", str(root / "run"), "--output", str(root / "x")])
    assert "holds LoRA adapters" in capsys.readouterr().err


@pytest.mark.slow
def test_peft_export_loads_with_peft_and_gives_the_same_logits(lora_run):
    """launch.export --peft DIR: peft.PeftModel.from_pretrained on the transformers base gives
    the adapter model's logits. Bound: float32 on both sides, as the conversion tests: 1e-4
    relative to the largest logit, while a wrong q/k row order or a transposed A moves the
    logits by the adapters' whole effect (> 1e-2, checked above)."""
    peft = pytest.importorskip("peft")
    import torch

    from launch.export import main as export_main

    root, model, cfg = lora_run
    export_main(["--workdir", str(root / "run"), "--peft", str(root / "peft")])
    assert json.loads((root / "peft" / "adapter_config.json").read_text())["r"] == 4
    toks = np.random.default_rng(2).integers(0, 512, (2, 24))
    wrapped = peft.PeftModel.from_pretrained(model, str(root / "peft")).eval()
    with torch.no_grad():
        theirs = wrapped(torch.from_numpy(toks)).logits.numpy()
    ours, _ = _adapter_logits(root, cfg, jnp.asarray(toks))
    assert np.abs(theirs - ours).max() <= 1e-4 * np.abs(ours).max()
    # adapter_config.json names the base by its directory, so peft finds it alone
    base = json.loads((root / "peft" / "adapter_config.json").read_text())
    assert base["base_model_name_or_path"] == str(root / "hf")
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(root / "peft")).eval()
    with torch.no_grad():
        theirs = auto(torch.from_numpy(toks)).logits.numpy()
    assert np.abs(theirs - ours).max() <= 1e-4 * np.abs(ours).max()
    export_main(["--workdir", str(root / "run"), "--peft", str(root / "named"),
                 "--peft-base", "meta-llama/Llama-2-7b-hf"])  # fmt: skip
    named = json.loads((root / "named" / "adapter_config.json").read_text())
    assert named["base_model_name_or_path"] == "meta-llama/Llama-2-7b-hf"


@pytest.mark.slow
def test_merge_onto_a_bfloat16_base_keeps_the_whole_update(tmp_path, tiny_dataset, capsys):
    """A LoRA run over a bfloat16 base (configs/lora_7b.py's param_dtype): --merge-lora
    merges in float32 and stores float32, so the merged model's logits are the adapter
    model's within float32 error, and the log reports the merge error. Bound: as the float32
    merge test, 1e-5 of the largest logit; rounding W + sAB back to bfloat16 (spacing 2^-8 of
    |W|) moves the logits by ~1e-3 of their scale and fails it. --dtype bfloat16 still
    stores bfloat16 on purpose, with the loss reported as a warning."""
    from test_finetune import tiny_hf

    from launch.export import main as export_main
    from llama_jax.trainer import loop as trainer
    from llama_jax.weights.params_io import load_params

    tiny_hf(tmp_path / "hf", seed=4)
    cfg = load(f"{ROOT}/configs/finetune_tiny.py", [
        "model.vocab_size=512", "model.lora_rank=4", "model.lora_targets=q,v,w2",
        "model.param_dtype=bfloat16", "train.batch_size=8", "train.seq_len=32",
        "train.steps=10", "train.lr=1e-3", "train.eval_every=0", f"data.path={tiny_dataset[0]}",
        f"train.init_from=hf:{tmp_path / 'hf'}", "checkpoint.every_steps=10"])  # fmt: skip
    trainer.train(cfg, str(tmp_path / "run"))
    capsys.readouterr()
    export_main(["--workdir", str(tmp_path / "run"), "--output", str(tmp_path / "merged"),
                 "--merge-lora"])  # fmt: skip
    err = capsys.readouterr().err
    assert "merged the adapters into the base in float32, stored in float32" in err, err
    params, mcfg = load_params(str(tmp_path / "merged"))
    assert params["layers"]["attention"]["wq"].dtype == jnp.float32, mcfg
    toks = jnp.asarray(np.random.default_rng(5).integers(0, 512, (2, 24)))
    adapted, plain = _adapter_logits(tmp_path, cfg, toks)
    merged = np.asarray(Llama(mcfg).apply({"params": params}, toks))
    scale = np.abs(adapted).max()
    assert np.abs(adapted - plain).max() > 1e-3 * scale  # the adapters matter
    np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=1e-5 * scale)
    export_main(["--workdir", str(tmp_path / "run"), "--output", str(tmp_path / "bf16"),
                 "--merge-lora", "--dtype", "bfloat16"])  # fmt: skip
    err = capsys.readouterr().err
    assert "stored in bfloat16" in err and "an export in float32" in err, err
    assert load_params(str(tmp_path / "bf16"))[1].param_dtype == "bfloat16"


@pytest.mark.slow
def test_will_it_fit_counts_a_frozen_base_and_adapter_state():
    """launch.inspect --memory for LoRA: the compiled step's arguments are the frozen base, the
    adapters and their two AdamW moments (plus a few scalar counters); gradients are
    adapter-sized. So the state is base + 4 x adapters, not 16 bytes per parameter."""
    from llama_jax.parallel.sharding import make_mesh
    from llama_jax.train import memory

    cfg = load(f"{ROOT}/configs/tiny.py", ["model.lora_rank=8", f"model.lora_targets={ALL}",
               "train.batch_size=8", "train.seq_len=32", "model.param_dtype=bfloat16"])  # fmt: skip
    from llama_jax.train import step as ts

    mesh = make_mesh(1, -1, 1)
    row = memory.analyze(cfg, mesh, policies=["save_linear"])["policies"][0]
    adapters = _bytes(ts.abstract_train_state(cfg, mesh)[0].params)
    base = _bytes(ts.abstract_frozen(cfg, mesh)[0])
    assert row["gradients"] == adapters and row["params"] == base + adapters
    assert 0 <= row["state_total"] - row["analytic_state"] <= 64  # the moments' step counters
