"""Tied embeddings (model.tie_word_embeddings, as in LLaMA-3.2-1B/3B): the LM head is the
embedding table transposed. Checked against transformers' tied LlamaForCausalLM: logits through
the converters both ways, the first-batch loss of a run started from tied weights, and the
table's gradient, which sums the lookup's contribution and the head's."""

import copy
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open
from safetensors.torch import save_file
from test_convert import F32, hf_logits, hf_model, our_logits, tokens
from test_finetune import ROOT, RUN, hf_loss, tiny_hf

from llama_jax.config import ModelConfig, RunConfig, TrainConfig, load
from llama_jax.data.loader import Loader
from llama_jax.model import stats
from llama_jax.model.llama import Llama
from llama_jax.parallel import sharding as shd
from llama_jax.train import step as ts
from llama_jax.trainer import loop as trainer
from llama_jax.weights import convert, hf, init_from, meta
from llama_jax.weights.params_io import load_params, save_params

# Bound on max |our logits - transformers'| / max |transformers' logits|, both in float32.
# Rounding (u = 2^-24 = 6e-8 per operation) adds up like a random walk, ~sqrt(n) u over a
# length-n reduction, across ~20 stages in sequence (2 layers x 7 matmuls, the norms, softmax,
# the head) with n <= 176: sqrt(20 x 176) x 6e-8 = 3.6e-6 for each implementation. A factor 30
# for the gain along the path (softmax of scaled scores, the norms' 1/rms) gives 1e-4, the
# untied tests' bound (test_convert.py). A head that is not the table moves logits by O(1).
LOGIT_REL = 1e-4
# The same for our float32 table gradient against transformers' float64 one: the backward has
# ~40 stages, and the table's gradient reduces over the 48 tokens (lookup) and 48 rows (head):
# sqrt(40 x 176) x 6e-8 = 5e-6 relative to max |gradient|, times 20 for the gains.
GRAD_REL = 1e-4


def _small_tied() -> ModelConfig:
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16,
                       max_seq_len=64, rope_theta=500.0, init_std=0.15, tie_word_embeddings=True,
                       **F32)  # fmt: skip


def _stored_keys(path) -> set:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("lm_head", ["omitted", "stored"])
def test_hf_to_ours_tied_logits(tmp_path, lm_head):
    """transformers' save_pretrained omits the tied lm_head; other writers store an equal copy.
    Either way ours has no output matrix and gives transformers' logits."""
    model = hf_model(2, tie=True)  # GQA: 4 heads, 2 kv heads
    assert model.lm_head.weight is model.model.embed_tokens.weight
    if lm_head == "omitted":
        model.save_pretrained(tmp_path / "hf")
    else:
        model.config.save_pretrained(tmp_path / "hf")
        tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), {"format": "pt"})
    assert ("lm_head.weight" in _stored_keys(tmp_path / "hf")) == (lm_head == "stored")
    cfg = convert.convert("hf", "ours", str(tmp_path / "hf"), str(tmp_path / "ours"), overrides=F32)
    params, loaded = load_params(str(tmp_path / "ours"))
    assert cfg.tie_word_embeddings and loaded == cfg and "output" not in params
    toks = tokens()
    want = hf_logits(model, toks)
    err, scale = np.max(np.abs(our_logits(params, cfg, toks) - want)), np.max(np.abs(want))
    print(
        f"hf->ours tied ({lm_head} lm_head): max |dlogit| {err:.2e}, bound {LOGIT_REL * scale:.2e}"
    )
    assert err < LOGIT_REL * scale  # derivation at LOGIT_REL


@pytest.mark.slow
def test_ours_to_hf_and_meta_tied(tmp_path):
    """Ours -> HF: config.json says tied, no lm_head is stored, transformers ties the two and
    gives our logits. Ours -> Meta: output.weight = tok_embeddings (Meta's loader wants one);
    it reads back untied with the same weights, or tied again with the override."""
    cfg, toks = _small_tied(), tokens()
    params = nn.unbox(Llama(cfg).init(jax.random.PRNGKey(3), jnp.asarray(toks)))["params"]
    assert "output" not in params
    save_params(str(tmp_path / "ours"), params, cfg)
    convert.convert("ours", "hf", str(tmp_path / "ours"), str(tmp_path / "hf"))
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["tie_word_embeddings"] is True
    assert "lm_head.weight" not in _stored_keys(tmp_path / "hf")
    model = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager", dtype=torch.float32
    ).eval()
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    mine = our_logits(params, cfg, toks)
    err, scale = np.max(np.abs(hf_logits(model, toks) - mine)), np.max(np.abs(mine))
    print(f"ours->hf tied: max |dlogit| {err:.2e}, bound {LOGIT_REL * scale:.2e}")
    assert err < LOGIT_REL * scale  # derivation at LOGIT_REL

    convert.convert("ours", "meta", str(tmp_path / "ours"), str(tmp_path / "meta"), num_shards=2)
    tree, c = meta.read_meta(str(tmp_path / "meta"))
    assert not c.tie_word_embeddings
    np.testing.assert_array_equal(tree["output"], np.asarray(params["tok_embeddings"]).T)
    tree, c = meta.read_meta(str(tmp_path / "meta"), overrides={"tie_word_embeddings": True})
    assert c.tie_word_embeddings and jax.tree.structure(tree) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hf", "meta", "ours+lora"])
def test_first_batch_loss_from_tied_weights(tmp_path, tiny_dataset, source):
    """test_finetune's first-batch test on a tied model: launch.train from it (directly, via
    Meta's layout, which holds it untied, or via ours under LoRA, whose frozen base is the tied
    tree) logs transformers' loss on the first batch. Bound as there: float32 passes over 4
    layers with reductions of <= 512 terms err ~1e-6 relative; a head that is not the table
    moves the loss by far more than 1e-4."""
    fmt = source.split("+")[0]
    model = tiny_hf(tmp_path / "hf", tie=True)
    src = tmp_path / "hf"
    if fmt != "hf":
        src = tmp_path / fmt
        convert.convert("hf", fmt, str(tmp_path / "hf"), str(src))
    extra = ["model.lora_rank=4"] if "lora" in source else []
    cfg = load(f"{ROOT}/configs/finetune_tiny.py",
               [*RUN, f"data.path={tiny_dataset[0]}", f"train.init_from={fmt}:{src}", *extra])  # fmt: skip
    assert init_from.apply_source(cfg).model.tie_word_embeddings == (fmt != "meta")
    trainer.train(cfg, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        first = [r for r in map(json.loads, f) if "first_batch_loss" in r]
    assert len(first) == 1 and first[0]["step"] == 0, first
    loader = Loader(tiny_dataset[0], "train", batch_size=8, seq_len=32,
                    seed=cfg.train.data_order_seed, prefetch=0)  # fmt: skip
    want = hf_loss(model, loader.batch(0))
    print(f"{source} tied: first batch loss {first[0]['first_batch_loss']:.7f}, hf {want:.7f}")
    np.testing.assert_allclose(first[0]["first_batch_loss"], want, rtol=1e-4)


def _torch_loss_backward(model, inputs, targets):
    """Summed next-token cross entropy of a transformers model, backpropagated."""
    model.zero_grad()
    logits = model(torch.from_numpy(inputs)).logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).reshape(-1), reduction="sum"
    )
    loss.backward()


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [(1, 1, 1), (1, 2, 4)])
def test_tied_table_gradient_sums_lookup_and_head(tmp_path, sizes):
    """The training gradient of the tied table (train_step's, through the fused head loss, on a
    mesh of (data, fsdp, tensor) = sizes: the table split over vocab and embed) is transformers'
    float64 autograd gradient: the lookup's and the head's contributions summed. Either
    contribution alone is far outside the bound, so a tie that drops one shows."""
    model = hf_model(2, tie=True)
    model.save_pretrained(tmp_path / "hf")
    tree, cfg = hf.read_hf(str(tmp_path / "hf"), overrides=F32)
    toks = tokens(length=25)
    inputs, targets = toks[:, :-1], toks[:, 1:]  # 2 x 24 = 48 tokens
    run = RunConfig(model=cfg, train=TrainConfig(batch_size=2, seq_len=24))
    mesh = shd.make_mesh(*sizes, devices=jax.devices()[: math.prod(sizes)])
    shardings = ts.abstract_train_state(run, mesh)[1].params
    loss_and_grads = jax.jit(ts.make_loss_and_grads(run, mesh, shardings))
    with shd.model_context(mesh):  # as make_train_step's step does
        _, grads, n = loss_and_grads(
            jax.device_put(tree, shardings), {"inputs": inputs, "targets": targets}, {}
        )
    ours = np.asarray(grads["tok_embeddings"], np.float64) * float(n)  # of the summed loss

    tied = model.double()
    _torch_loss_backward(tied, inputs, targets)
    want = tied.model.embed_tokens.weight.grad.numpy()  # one tensor: both uses' sum
    untied = copy.deepcopy(tied)
    untied.lm_head.weight = torch.nn.Parameter(tied.lm_head.weight.detach().clone())
    _torch_loss_backward(untied, inputs, targets)
    lookup = untied.model.embed_tokens.weight.grad.numpy()
    head = untied.lm_head.weight.grad.numpy()
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(lookup + head, want, rtol=0, atol=1e-12 * scale)  # float64
    err = np.max(np.abs(ours - want))
    print(f"tied table gradient: max |d| {err:.2e}, bound {GRAD_REL * scale:.2e}, "
          f"lookup alone off by {np.max(np.abs(lookup - want)):.2e}, "
          f"head alone {np.max(np.abs(head - want)):.2e}")  # fmt: skip
    assert err < GRAD_REL * scale  # derivation at GRAD_REL
    for part in (lookup, head):
        assert np.max(np.abs(part - want)) > 100 * GRAD_REL * scale


def test_llama_3_2_1b_parameter_count():
    """The tied table counts once: LLaMA-3.2-1B's shape (Meta's params.json: dim 2048, 16 layers,
    32 heads, 8 kv heads, ffn_dim_multiplier 1.5, vocab 128256) has 1,235,814,400 parameters,
    its published 1.24B; untied it would hold 128256 x 2048 more. PaLM's FLOPs keep the table,
    the head's matmul."""
    cfg = ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                      multiple_of=256, ffn_dim_multiplier=1.5, tie_word_embeddings=True)  # fmt: skip
    D, F, V, KH = 2048, 8192, 128256, 8 * 64
    per_layer = 2 * D * D + 2 * D * KH + 3 * D * F + 2 * D  # wq wo, wk wv, w1 w2 w3, 2 norms
    assert cfg.hidden_dim == F
    n = stats.count_params(cfg)
    assert n == V * D + 16 * per_layer + D == 1_235_814_400
    assert stats.flops_per_token(cfg, 2048)["palm"] == 6 * n + 12 * 16 * D * 2048
