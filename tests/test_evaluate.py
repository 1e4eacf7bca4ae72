"""Evaluation on a tiny model trained to know which animal says what."""

import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax.config import ModelConfig
from llama_jax.inference import evaluate as ev
from llama_jax.model.llama import Llama

pytestmark = pytest.mark.slow  # the `trained` fixture (a few hundred Adam steps) or a launch run

SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "owl": "hoot", "pig": "oink", "bee": "buzz"}
CFG = ModelConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=40,
    multiple_of=16,
    max_seq_len=64,
    dtype="float32",
    attention_impl="reference",
)


class CharTokenizer:
    """One id per character: the tests need no sentencepiece model."""

    alphabet = " abcdefghijklmnopqrstuvwxyz.:\nA"
    bos_id, eos_id, vocab_size = 1, 2, 40

    def encode(self, text, bos=False, eos=False):
        ids = [3 + self.alphabet.index(ch) for ch in text]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids):
        return "".join(self.alphabet[i - 3] for i in ids if i >= 3)


TOK = CharTokenizer()


def corpus(rng, n_sentences):
    animals = rng.choice(list(SOUNDS), n_sentences)
    return " ".join(f"the {a} says {SOUNDS[a]}." for a in animals)


@pytest.fixture(scope="module")
def trained():
    """A few hundred Adam steps on sentences where each animal is followed by its sound."""
    rng = np.random.default_rng(0)
    model = Llama(CFG)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    params = params["params"]
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            logits = model.apply({"params": p}, batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = opt.init(params)
    for _ in range(200):
        batch = [TOK.encode(corpus(rng, 8), bos=True)[: CFG.max_seq_len + 1] for _ in range(16)]
        params, opt_state, loss = step(params, opt_state, jnp.asarray(batch))
    assert float(loss) < 0.2, float(loss)  # about the entropy of which animal comes next
    return params


def task(planted=True):
    names = list(SOUNDS)
    choices = [" " + SOUNDS[a] for a in names]
    out = []
    for i, a in enumerate(names):
        label = i if planted else (i + 1) % len(names)
        out.append({"context": f"the {a} says", "choices": choices, "label": label})
    return out


def test_multiple_choice_picks_planted_answer(trained):
    scorer = ev.Scorer(trained, CFG, batch_size=8)
    norms = list(ev.NORMALIZATIONS)
    res = ev.multiple_choice(scorer, TOK, task(), normalizations=norms)
    assert res["examples"] == 6
    for n in ("none", "token", "char"):
        assert res[f"acc_{n}"] == 1.0, res
    # mislabeled answers: the model must disagree with every one of them
    wrong = ev.multiple_choice(scorer, TOK, task(planted=False), normalizations=["char"])
    assert wrong["acc_char"] == 0.0
    # 2-shot, with the separator the model was trained on
    few = ev.multiple_choice(scorer, TOK, task(), num_fewshot=2, separator=". ", seed=1)
    assert few["acc_char"] == 1.0 and few["num_fewshot"] == 2


@jax.jit
def _forward(params, tokens):
    return jax.nn.log_softmax(Llama(CFG).apply({"params": params}, tokens))


def direct_logprob(params, tokens):
    """log p(tokens[1:] | tokens[0]) by one plain forward pass (the oracle for Scorer); right
    padding to max_seq_len (invisible to causal attention) keeps it to one compilation."""
    padded = np.zeros((1, CFG.max_seq_len), np.int32)
    padded[0, : len(tokens) - 1] = tokens[:-1]
    logp = np.asarray(_forward(params, padded))[0]
    return float(sum(logp[t, tok] for t, tok in enumerate(tokens[1:])))


def test_scorer_against_direct_forward(trained):
    scorer = ev.Scorer(trained, CFG, batch_size=4, bucket=16)
    ctx, cont = TOK.encode("the cat says", bos=True), TOK.encode(" meow")
    (lp, greedy), (lp_wrong, greedy_wrong) = scorer.score(
        [(ctx + cont, len(cont)), (ctx + TOK.encode(" woof"), 5)]
    )
    assert greedy and not greedy_wrong and lp > lp_wrong
    whole = direct_logprob(trained, ctx + cont)
    prefix = direct_logprob(trained, ctx)
    np.testing.assert_allclose(lp, whole - prefix, rtol=1e-4)

    # rolling: a text longer than max_seq_len is scored in windows; the first window's part
    # equals one direct pass over it
    text = corpus(np.random.default_rng(1), 12)
    toks = TOK.encode(text, bos=True)
    assert len(toks) > 2 * CFG.max_seq_len
    total, n = scorer.rolling(toks)
    assert n == len(toks) - 1
    first = direct_logprob(trained, toks[: CFG.max_seq_len + 1])
    rest, _ = scorer.rolling(toks[CFG.max_seq_len :])
    np.testing.assert_allclose(total, first + rest, rtol=1e-4)


def test_rolling_windows_get_full_context():
    """Hand-worked windows for max_seq_len 4 and 11 tokens: predictions 1-4 from token 0,
    5-8 after tokens 4-7, and 9-10 after tokens 6-9 (a full 4 tokens of context; before the
    fix the last window saw token 8 alone). The reference scores each window by one plain
    forward pass over exactly that context, in float64 log-softmax."""
    cfg = ModelConfig(
        dim=32,
        n_layers=1,
        n_heads=2,
        vocab_size=16,
        multiple_of=16,
        max_seq_len=4,
        dtype="float32",
        attention_impl="reference",
        init_std=0.5,
    )
    model = Llama(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32)))["params"]
    toks = [int(t) for t in np.random.default_rng(3).integers(0, 16, 11)]

    def window_logp(context_start, first, last):  # log p(toks[first..last] | toks[context_start:])
        inputs = np.asarray([toks[context_start:last]], np.int32)
        logits = np.asarray(model.apply({"params": params}, inputs), np.float64)[0]
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        return sum(logp[t - 1 - context_start, toks[t]] for t in range(first, last + 1))

    want = window_logp(0, 1, 4) + window_logp(4, 5, 8) + window_logp(6, 9, 10)
    short = window_logp(0, 1, 4) + window_logp(4, 5, 8) + window_logp(8, 9, 10)
    got, n = ev.Scorer(params, cfg, batch_size=2, bucket=4).rolling(toks)
    assert n == 10
    # float32 forward passes of the same logits in other padded shapes: rounding ~1e-6
    # relative per log-prob, 10 terms; 1e-4 leaves room and is far below what context changes
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert abs(short - want) > 100 * 1e-4 * abs(want)  # the test can tell the old windows apart


def test_perplexity_and_bits_per_byte(trained, tmp_path):
    from llama_jax.data.format import write_token_dataset

    rng = np.random.default_rng(2)
    docs = [corpus(rng, 3) for _ in range(10)]
    stream = np.concatenate([TOK.encode(d, eos=True) for d in docs])
    write_token_dataset(str(tmp_path / "ds"), {"val": stream}, vocab_size=40)
    scorer = ev.Scorer(trained, CFG, batch_size=4)
    res = ev.perplexity_dataset(scorer, str(tmp_path / "ds"), "val", tokenizer=TOK)
    lp, n = scorer.rolling(stream.tolist())
    assert res["tokens"] == n == len(stream) - 1
    assert math.isclose(res["perplexity"], math.exp(-lp / n), rel_tol=1e-9)
    # one byte per character; EOS has none; the first character is context, not predicted
    assert res["bytes"] == sum(len(d) for d in docs) - 1
    assert math.isclose(res["bits_per_byte"], -lp / math.log(2) / res["bytes"], rel_tol=1e-9)
    assert res["perplexity"] < 2.0  # the trained model knows this text well
    texts = ev.perplexity_texts(scorer, TOK, docs[:3])
    assert texts["bytes"] == sum(len(d) for d in docs[:3])


def test_lm_eval_adapter_end_to_end(trained):
    lm = ev.LMEvalAdapter(trained, CFG, TOK, batch_size=4, max_gen_toks=8)
    req = lambda *args: types.SimpleNamespace(args=args)
    ll = lm.loglikelihood([req("the dog says", " woof"), req("the dog says", " moo")])
    assert ll[0][1] and not ll[1][1] and ll[0][0] > ll[1][0]
    (rolling,) = lm.loglikelihood_rolling([req("the pig says oink.")])
    toks = TOK.encode("the pig says oink.", bos=True)
    np.testing.assert_allclose(rolling, direct_logprob(trained, toks), rtol=1e-4)
    outs = lm.generate_until(
        [
            req("the cat says", {"until": ["."], "max_gen_toks": 8}),
            req("the bee says", {"until": ["."]}),
        ]
    )
    assert outs == [" meow", " buzz"]


def test_launch_generate_and_eval(tiny_dataset, tmp_path, capsys):
    """The command lines on a real sentencepiece tokenizer and a prepared dataset."""
    import json

    from launch.eval import main as eval_main
    from launch.generate import main as generate_main
    from llama_jax.weights.params_io import save_params

    data_dir, tok_path = tiny_dataset
    cfg = ModelConfig(
        dim=32,
        n_layers=2,
        n_heads=4,
        vocab_size=512,
        multiple_of=16,
        max_seq_len=64,
        dtype="float32",
        attention_impl="reference",
    )
    shapes = jax.eval_shape(lambda: Llama(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), int)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: 0.3 * rng.standard_normal(s.shape).astype(np.float32), nn.unbox(shapes)["params"]
    )
    save_params(str(tmp_path / "ckpt"), params, cfg)
    common = ["--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", tok_path]

    generate_main([*common, "--prompt", "def main(", "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert out.startswith("def main(") and len(out) > len("def main(\n")
    generate_main(
        [
            *common,
            "--prompt",
            "import os",
            "--prompt",
            "x = 1",
            "--temperature",
            "0",
            "--max-new-tokens",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert "--- 'import os'\nimport os" in out and "--- 'x = 1'\nx = 1" in out

    mc = tmp_path / "mc.jsonl"
    mc.write_text(
        "".join(
            json.dumps({"context": f"x = {i}", "choices": [" + 1", " - 2"], "label": i % 2}) + "\n"
            for i in range(4)
        )
    )
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "def f(x):\n    return x\n"}) + "\n")
    eval_main(
        [
            *common,
            "--task",
            data_dir,
            "--max-tokens",
            "300",
            "--task",
            str(mc),
            "--num-fewshot",
            "1",
            "--task",
            str(texts),
        ]
    )
    ppl, choice, text = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert ppl["split"] == "val" and ppl["tokens"] == 299 and ppl["bits_per_byte"] > 0
    assert choice["examples"] == 4 and 0 <= choice["acc_char"] <= 1
    assert text["bytes"] == len("def f(x):\n    return x\n") and text["perplexity"] > 1
