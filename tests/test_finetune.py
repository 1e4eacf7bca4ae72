"""Fine-tuning from released weights (train.init_from), checked against transformers itself."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llama_jax.config import load  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# finetune_tiny.py's model (tiny.py's: dim 128, 4 layers, 4 heads, 2 kv heads, FFN 352) on the
# test dataset's 512-piece vocabulary.
RUN = ["model.vocab_size=512", "train.batch_size=8", "train.seq_len=32", "train.steps=1",
       "train.eval_every=0", "checkpoint.every_steps=1"]  # fmt: skip


def tiny_hf(path, seed=0, tie=False):
    """A random transformers LlamaForCausalLM of finetune_tiny's shape (GQA), saved to path;
    tie: the LM head is the embedding table (tests/test_tied.py)."""
    cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        initializer_range=0.1,  # far from uniform attention, so a layout error would show
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"
    model.save_pretrained(path)
    return model


def hf_loss(model, batch) -> float:
    """transformers' mean next-token cross entropy on our batch, reduced in float64."""
    with torch.no_grad():
        logits = model(torch.tensor(np.asarray(batch["inputs"]), dtype=torch.long)).logits
    logp = torch.log_softmax(logits.double(), dim=-1)
    targets = torch.tensor(np.asarray(batch["targets"]), dtype=torch.long)
    return float(-logp.gather(-1, targets[..., None]).mean())


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hf", "meta", "ours"])
def test_first_batch_loss_is_transformers_loss(tmp_path, tiny_dataset, source):
    """launch.train from a transformers model (directly, or converted to Meta's layout or to
    ours): the logged loss of the first batch, before any update, is transformers' loss on
    that batch. Bound: float32 forward passes (eps 1.2e-7) over 4 layers with reductions of
    <= 512 terms differ by ~1e-6 relative from the float64-reduced reference; 1e-4 leaves room
    yet a wrong layout (a RoPE permutation, a transposed weight) moves the loss by > 1%."""
    from llama_jax.data.loader import Loader
    from llama_jax.trainer import loop as trainer
    from llama_jax.weights import convert

    model = tiny_hf(tmp_path / "hf")
    src = tmp_path / "hf"
    if source != "hf":
        src = tmp_path / source
        convert.convert("hf", source, str(tmp_path / "hf"), str(src))
    cfg = load(f"{ROOT}/configs/finetune_tiny.py",
               [*RUN, f"data.path={tiny_dataset[0]}", f"train.init_from={source}:{src}"])  # fmt: skip
    trainer.train(cfg, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        first = [r for r in map(json.loads, f) if "first_batch_loss" in r]
    assert len(first) == 1 and first[0]["step"] == 0, first
    loader = Loader(tiny_dataset[0], "train", batch_size=8, seq_len=32,
                    seed=cfg.train.data_order_seed, prefetch=0)  # fmt: skip
    want = hf_loss(model, loader.batch(0))
    np.testing.assert_allclose(first[0]["first_batch_loss"], want, rtol=1e-4)


def test_weights_of_another_shape_are_refused_naming_the_field(tmp_path, tiny_dataset):
    """A vocab given on the command line (2048) against weights with 512: one error naming the
    field and both values, before anything is built."""
    from llama_jax.trainer import loop as trainer

    tiny_hf(tmp_path / "hf")
    cfg = load(f"{ROOT}/configs/finetune_tiny.py", ["model.vocab_size=2048",
               f"data.path={tiny_dataset[0]}", f"train.init_from=hf:{tmp_path / 'hf'}"])  # fmt: skip
    with pytest.raises(ValueError, match=r"model.vocab_size=2048 in the config, but hf:.* has 512"):
        trainer.train(cfg, str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="no directory"):
        trainer.train(cfg.replace({"train.init_from": f"hf:{tmp_path / 'nowhere'}"}),
                      str(tmp_path / "run"))  # fmt: skip


def test_weights_of_any_shape_give_the_model_its_shape(tmp_path):
    """finetune_tiny (tiny.py's shape: dim 128, 4 layers, 4 heads, 2 kv heads) from weights of
    another shape (dim 64, 3 layers, 8 heads, multi-head, FFN 192, vocab 320): the run takes the
    weights' shape, as the README says; the same fields given on the command line are
    compared, and a disagreeing one is refused naming it."""
    from llama_jax.weights import init_from

    hf = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=192,
                                  num_hidden_layers=3, num_attention_heads=8,
                                  num_key_value_heads=8, max_position_embeddings=128)  # fmt: skip
    transformers.LlamaForCausalLM(hf).save_pretrained(tmp_path / "hf")
    spec = f"train.init_from=hf:{tmp_path / 'hf'}"
    run = init_from.apply_source(load(f"{ROOT}/configs/finetune_tiny.py", [spec]))
    m = run.model
    assert (m.dim, m.n_layers, m.n_heads, m.kv_heads, m.hidden_dim, m.vocab_size) == (
        64, 3, 8, 8, 192, 320)  # fmt: skip
    agree = load(f"{ROOT}/configs/finetune_tiny.py", [spec, "model.n_layers=3", "model.dim=64"])
    assert init_from.apply_source(agree).model.n_layers == 3
    pinned = load(f"{ROOT}/configs/finetune_tiny.py", [spec, "model.n_layers=4"])
    with pytest.raises(ValueError, match=r"model.n_layers=4 in the config, but hf:.* has 3"):
        init_from.apply_source(pinned)


def test_the_tokenizer_comes_from_the_weights_directory(tmp_path, tiny_dataset):
    """A source directory with tokenizer.model supplies data.tokenizer (unless the config names
    one), and the model's shape fields come from config.json."""
    import shutil

    from llama_jax.weights import init_from

    tiny_hf(tmp_path / "hf")
    cfg = load(f"{ROOT}/configs/finetune_tiny.py",
               ["model.vocab_size=512", f"train.init_from=hf:{tmp_path / 'hf'}"])  # fmt: skip
    assert init_from.apply_source(cfg).data.tokenizer == ""
    shutil.copy(tiny_dataset[1], tmp_path / "hf" / "tokenizer.model")
    run = init_from.apply_source(cfg)
    assert run.data.tokenizer == str(tmp_path / "hf" / "tokenizer.model")
    assert (run.model.dim, run.model.n_kv_heads, run.model.hidden_dim) == (128, 2, 352)
    mine = cfg.replace({"data.tokenizer": tiny_dataset[1]})
    assert init_from.apply_source(mine).data.tokenizer == tiny_dataset[1]
