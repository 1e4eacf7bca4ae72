"""KV-cache decoding against greedy decoding by repeated full forward passes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import ModelConfig
from llama_jax.inference import generate as gen
from llama_jax.model.llama import Llama

CFG = ModelConfig(
    dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=64,
    multiple_of=16,
    max_seq_len=64,
    dtype="float32",
    attention_impl="reference",
    init_std=0.2,
)
PROMPTS = [[1, 5, 9], [1, 7, 3, 22, 41, 8, 13], [1, 2, 60, 33, 17, 4, 9, 11, 12, 30, 5, 6, 7]]
NEW = 10


@pytest.fixture(scope="module")
def params():
    """Random weights of the model's shapes (eval_shape: no init compilation)."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: Llama(CFG).init(jax.random.PRNGKey(0), tokens))["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: (CFG.init_std * rng.standard_normal(s.shape)).astype(np.float32),
        nn.unbox(shapes),
    )


def greedy_by_full_forward(params, prompt, n):
    """The oracle: no cache, no padding; one full forward per new token. Right padding to a
    fixed length keeps one compilation, and causality makes it invisible at position len-1."""
    L = len(prompt) + n
    forward = jax.jit(lambda p, t: Llama(CFG).apply({"params": p}, t))
    seq = list(prompt)
    for _ in range(n):
        toks = np.zeros((1, L), np.int32)
        toks[0, : len(seq)] = seq
        seq.append(int(np.argmax(forward(params, toks)[0, len(seq) - 1])))
    return seq[len(prompt) :]


@pytest.fixture(scope="module")
def want(params):
    return [greedy_by_full_forward(params, p, NEW) for p in PROMPTS]


@pytest.mark.slow
def test_kv_cache_greedy_matches_full_forward(params, want):
    assert len({tuple(w) for w in want}) == 3  # the rows differ, so a row mix-up would show
    streamed = []
    got = gen.generate(params, CFG, PROMPTS, NEW, on_token=lambda b, t: streamed.append((b, t)))
    assert got == want
    # streamed in step order, every row's tokens in order
    assert [t for b, t in streamed if b == 1] == want[1]
    assert [b for b, _ in streamed[:3]] == [0, 1, 2]

    # a row stops at EOS (not returned) while the others go on
    eos = want[0][4]
    cut = gen.generate(params, CFG, PROMPTS, NEW, eos_id=eos)
    for w, c in zip(want, cut):
        assert c == (w[: w.index(eos)] if eos in w else w)

    # top_k=1 sampling is greedy whatever the temperature
    top1 = gen.generate(params, CFG, PROMPTS, NEW, sampling=gen.Sampling(1.5, top_k=1), seed=3)
    assert top1 == want


def test_left_pad():
    tokens, positions, segs = gen.left_pad([[1, 2, 3], [4]], pad_id=0, bucket=4)
    np.testing.assert_array_equal(tokens, [[0, 1, 2, 3], [0, 0, 0, 4]])
    np.testing.assert_array_equal(positions, [[0, 0, 1, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(segs, [[0, 1, 1, 1], [0, 0, 0, 1]])


def test_sample_logits_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.PRNGKey(0)

    def freq(s):
        t = np.asarray(gen.sample_logits(logits, keys, s))
        return np.bincount(t, minlength=4) / len(t)

    np.testing.assert_allclose(freq(gen.Sampling(1.0)), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    top2 = freq(gen.Sampling(1.0, top_k=2))
    np.testing.assert_allclose(top2, [0.625, 0.375, 0, 0], atol=0.03)
    # top_p=0.7: 0.5 is short of it, 0.5 + 0.3 reaches it -> the first two tokens
    np.testing.assert_allclose(freq(gen.Sampling(1.0, top_p=0.7)), top2, atol=0.03)
    assert freq(gen.Sampling(0.0))[0] == 1.0
    # top_p 0 is greedy, and a p below the top token's mass keeps that token alone (before the
    # fix, p=0 kept no token, the index wrapped, and the whole distribution was sampled)
    assert freq(gen.Sampling(1.0, top_p=0.0))[0] == 1.0
    assert freq(gen.Sampling(1.0, top_p=1e-6))[0] == 1.0


@pytest.mark.slow
def test_sharded_cache_same_tokens(params, want):
    """On a mesh the cache is sharded like the k/v activations and the tokens do not change."""
    from llama_jax.parallel.sharding import make_mesh

    mesh = make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
    cache = gen.init_cache(CFG, 4, 32, mesh)
    assert cache["layers"]["attention"]["k"].sharding.spec[3] == "tensor"  # [L, B, S, K, H]
    got = gen.generate(params, CFG, PROMPTS, 4, mesh=mesh)
    assert got == [w[:4] for w in want]  # greedy's first 4 tokens


@pytest.mark.slow
def test_converted_float32_model_decodes_as_transformers(tmp_path, capsys, tiny_dataset):
    """Greedy decoding of a float32 Hugging Face model converted to ours computes in float32
    (the checkpoint's dtype, said on stderr), so 48 greedy tokens equal transformers' for
    each of 4 prompts. Bound: both sides compute float32 logits, which agree to ~1e-4 of the
    largest logit (the conversion tests' bound); every greedy pick below has a top-2 gap in
    transformers' logits above that (asserted first), so no pick can flip on any CPU. In
    bfloat16 (2^-8 relative) the picks depart within a few dozen tokens. --dtype bfloat16
    still casts the params and computes in bfloat16 when asked."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_finetune import tiny_hf

    from launch.generate import main as generate_main
    from llama_jax.weights import convert
    from llama_jax.weights.params_io import load_for_inference

    model = tiny_hf(tmp_path / "hf", seed=7)
    convert.convert("hf", "ours", str(tmp_path / "hf"), str(tmp_path / "ours"))
    params, cfg, line = load_for_inference(str(tmp_path / "ours"))
    assert (cfg.dtype, cfg.param_dtype) == ("float32", "float32"), line
    prompts = [[1, 17], [1, 300, 45, 9], [1, 77, 78, 79, 80, 81, 82], [1, 5, 500, 250, 125]]
    new = 48
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 eos_token_id=2, pad_token_id=0)  # fmt: skip
        theirs = out.sequences[0, len(prompt) :].tolist()
        theirs = theirs[: theirs.index(2)] if 2 in theirs else theirs  # ours stops before EOS
        logits = torch.stack(out.logits)[:, 0].double()  # [steps, V] float32 logits
        top2 = logits.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-4 * logits.abs().max(), prompt
        ours = gen.generate(params, cfg, [prompt], new, eos_id=2)[0]
        assert len(theirs) > 8 and ours == theirs, (prompt, ours, theirs)
    argv = ["--checkpoint", str(tmp_path / "ours"), "--tokenizer", tiny_dataset[1],
            "--prompt", "x", "--temperature", "0", "--max-new-tokens", "4"]  # fmt: skip
    capsys.readouterr()
    generate_main(argv)
    assert "computing in float32 (the checkpoint's" in capsys.readouterr().err
    generate_main([*argv, "--dtype", "bfloat16"])
    assert "computing in bfloat16 (as asked (--dtype)), params in bfloat16" in (
        capsys.readouterr().err
    )
