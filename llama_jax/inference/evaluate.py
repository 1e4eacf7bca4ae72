"""Evaluation: perplexity and bits per byte, zero-shot multiple choice, an lm-eval-harness adapter.

Everything rests on one jitted primitive, Scorer.score: the summed log-probability of the last
n tokens of a token sequence (and whether greedy decoding would have produced them).

Tokenizers are duck-typed: encode(text, bos=False, eos=False) -> ids, decode(ids) -> str,
bos_id, eos_id (llama_jax.data.tokenizer.Tokenizer is one).
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.data.format import open_split
from llama_jax.inference import generate as gen
from llama_jax.model.llama import Llama

# ---------------------------------------------------------------------------------------------
# The primitive.


@functools.lru_cache(maxsize=8)
def _score_fn(cfg: ModelConfig):
    model = Llama(cfg)

    @jax.jit
    def score(params, inputs, targets, mask):
        logits = model.apply({"params": params}, inputs)  # [B, T, V]
        logp = jax.nn.log_softmax(logits, axis=-1)
        token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
        greedy = jnp.argmax(logits, axis=-1) == targets
        return jnp.sum(token_logp * mask, axis=-1), jnp.all(greedy | (mask == 0), axis=-1)

    return score


class Scorer:
    """Batched, jitted log-likelihoods under a model.

    Rows are sorted by length and right-padded to a multiple of `bucket` (at most
    cfg.max_seq_len), batches are padded to batch_size, so a few shapes cover a whole task.
    """

    def __init__(self, params, cfg: ModelConfig, batch_size: int = 8, bucket: int = 64):
        self.params, self.cfg, self.batch_size, self.bucket = params, cfg, batch_size, bucket
        self._fn = _score_fn(cfg)

    @property
    def max_len(self) -> int:
        """Longest token sequence scored in one pass (inputs are one token shorter)."""
        return self.cfg.max_seq_len + 1

    def score(self, rows: Sequence[tuple[Sequence[int], int]]) -> list[tuple[float, bool]]:
        """rows: (tokens, n) pairs -> (log p(last n tokens | the ones before), all greedy).

        A row longer than max_len loses its oldest tokens (context), as lm-eval does.
        """
        rows = [(list(t)[-self.max_len :], n) for t, n in rows]
        for t, n in rows:
            if not 0 < n < len(t):
                raise ValueError(f"need 0 < n < len(tokens) (a context token), got n={n}, {len(t)}")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            longest = len(rows[idx[0]][0]) - 1
            T = min(-(-longest // self.bucket) * self.bucket, self.cfg.max_seq_len)
            inputs = np.zeros((self.batch_size, T), np.int32)
            targets = np.zeros((self.batch_size, T), np.int32)
            mask = np.zeros((self.batch_size, T), np.float32)
            for r, i in enumerate(idx):
                toks, n = rows[i]
                L = len(toks) - 1
                inputs[r, :L], targets[r, :L] = toks[:-1], toks[1:]
                mask[r, L - n : L] = 1.0
            logp, greedy = self._fn(self.params, inputs, targets, mask)
            logp, greedy = np.asarray(logp), np.asarray(greedy)
            for r, i in enumerate(idx):
                out[i] = (float(logp[r]), bool(greedy[r]))
        return out

    def rolling(self, tokens: Sequence[int]) -> tuple[float, int]:
        """Log-likelihood of tokens[1:] given tokens[0] (e.g. BOS), each token predicted once,
        in disjoint runs of max_seq_len predictions; returns (sum log p, tokens predicted).

        As lm-eval's rolling loglikelihood: every window sees a full max_seq_len of context
        where the text has it, so the last, shorter run of predictions is scored after the
        max_seq_len tokens before its end, not after the one token before its start.
        """
        return self.rolling_many([tokens])[0]

    def rolling_many(self, docs: Sequence[Sequence[int]]) -> list[tuple[float, int]]:
        L = self.cfg.max_seq_len
        rows, owner = [], []
        for d, toks in enumerate(docs):
            for start in range(1, len(toks), L):  # predicts toks[start:end]
                end = min(start + L, len(toks))
                rows.append((list(toks[max(0, end - L - 1) : end]), end - start))
                owner.append(d)
        sums = [0.0] * len(docs)
        for d, (lp, _) in zip(owner, self.score(rows)):
            sums[d] += lp
        return [(s, max(len(t) - 1, 0)) for s, t in zip(sums, docs)]


# ---------------------------------------------------------------------------------------------
# Perplexity and bits per byte.


def perplexity_report(nll_nats: float, tokens: int, n_bytes: int | None) -> dict:
    out = {
        "tokens": tokens,
        "nll_per_token": nll_nats / tokens,
        "perplexity": math.exp(nll_nats / tokens),
    }
    if n_bytes:
        out |= {"bytes": n_bytes, "bits_per_byte": nll_nats / math.log(2) / n_bytes}
    return out


def perplexity_texts(scorer: Scorer, tokenizer, texts: Sequence[str]) -> dict:
    """Each text scored on its own, from BOS, every token (and the EOS) predicted once."""
    docs = [tokenizer.encode(t, bos=True, eos=True) for t in texts]
    results = scorer.rolling_many(docs)
    nll = -sum(lp for lp, _ in results)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return perplexity_report(nll, sum(n for _, n in results), n_bytes)


def perplexity_tokens(scorer: Scorer, tokens: np.ndarray, tokenizer=None) -> dict:
    """A flat token stream (a prepared split: each document BOS + tokens + EOS), scored in
    disjoint windows of max_seq_len predictions, as the training loss sees it.

    Bits per byte needs the text: with a tokenizer, each document (the tokens between EOSs)
    is decoded and its UTF-8 bytes counted; EOS counts as zero bytes.
    """
    tokens = np.asarray(tokens).astype(np.int64)
    lp, n = scorer.rolling(tokens.tolist())
    n_bytes = None
    if tokenizer is not None:
        body = tokens[1:]  # the predicted tokens
        cuts = np.flatnonzero(body == tokenizer.eos_id)
        pieces = np.split(body, cuts)  # each piece but the first starts with an EOS
        n_bytes = sum(
            len(tokenizer.decode(p[p != tokenizer.eos_id].tolist()).encode("utf-8")) for p in pieces
        )
    return perplexity_report(-lp, n, n_bytes)


def perplexity_dataset(
    scorer: Scorer,
    dataset_dir: str,
    split: str = "val",
    tokenizer=None,
    max_tokens: int | None = None,
) -> dict:
    """perplexity_tokens on a split written by launch.prepare_data."""

    store = open_split(dataset_dir, split)
    n = store.shape[0] if max_tokens is None else min(store.shape[0], max_tokens)
    return {"split": split, **perplexity_tokens(scorer, store[:n].read().result(), tokenizer)}


# ---------------------------------------------------------------------------------------------
# Multiple choice.

# How a candidate's log-likelihood is normalized before the argmax. The paper uses "char" (Gao
# et al. 2021) for most tasks and "unconditional" (Brown et al. 2020: log p(choice | context)
# - log p(choice | "Answer:")) for OpenBookQA and BoolQ.
NORMALIZATIONS = ("none", "token", "char", "unconditional")
UNCONDITIONAL_CONTEXT = "Answer:"


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with BOS, continuation ids), split as lm-eval does: trailing spaces of the
    context move to the continuation, and the continuation's ids are what the whole string's
    encoding adds after the context's (sentencepiece merges across the boundary otherwise)."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, bos=True)
    ctx = tokenizer.encode(context, bos=True)
    return whole[: len(ctx)], whole[len(ctx) :]


def load_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fewshot_prefix(
    pool: Sequence[dict], k: int, rng: random.Random, exclude: int, separator: str = "\n\n"
) -> str:
    """k solved examples (context + correct choice), each followed by separator."""
    if k <= 0:
        return ""
    candidates = [i for i in range(len(pool)) if i != exclude]
    if len(candidates) < k:
        raise ValueError(f"{k}-shot needs {k} other examples; the task has {len(candidates)}")
    shots = rng.sample(candidates, k)
    return "".join(
        pool[i]["context"] + pool[i]["choices"][pool[i]["label"]] + separator for i in shots
    )


def multiple_choice(
    scorer: Scorer,
    tokenizer,
    examples: Sequence[dict],
    *,
    num_fewshot: int = 0,
    normalizations: Sequence[str] = ("none", "token", "char"),
    separator: str = "\n\n",
    seed: int = 0,
) -> dict:
    """Zero/few-shot multiple choice: {"context": str, "choices": [str], "label": int} each.

    A choice is appended verbatim to the context (so it carries its own leading space,
    " Paris"), scored by its log-likelihood, normalized, and the best one is the answer.
    Returns accuracy per normalization ("acc_char", ...) and the number of examples.
    """
    for norm in normalizations:
        if norm not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {norm!r}; valid: {list(NORMALIZATIONS)}")
    rng = random.Random(seed)
    rows, unconditional, where = [], [], []
    for e, ex in enumerate(examples):
        context = fewshot_prefix(examples, num_fewshot, rng, e, separator) + ex["context"]
        for c, choice in enumerate(ex["choices"]):
            ctx, cont = encode_pair(tokenizer, context, choice)
            rows.append((ctx + cont, len(cont)))
            if "unconditional" in normalizations:
                ctx, cont = encode_pair(tokenizer, UNCONDITIONAL_CONTEXT, choice)
                unconditional.append((ctx + cont, len(cont)))
            where.append((e, c))
    scores = [lp for lp, _ in scorer.score(rows)]
    uncond = [lp for lp, _ in scorer.score(unconditional)] if unconditional else []
    per_example: list[dict[str, list[float]]] = [{n: [] for n in normalizations} for _ in examples]
    for j, ((e, c), lp) in enumerate(zip(where, scores)):
        choice = examples[e]["choices"][c]
        normalized = {
            "none": lp,
            "token": lp / rows[j][1],
            "char": lp / max(len(choice), 1),
            "unconditional": lp - uncond[j] if uncond else None,
        }
        for n in normalizations:
            per_example[e][n].append(normalized[n])
    result: dict = {"examples": len(examples), "num_fewshot": num_fewshot}
    for n in normalizations:
        hits = [int(np.argmax(s[n]) == ex["label"]) for s, ex in zip(per_example, examples)]
        result[f"acc_{n}"] = float(np.mean(hits)) if hits else float("nan")
    return result


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness.

try:  # subclass the harness's LM when it is installed; otherwise the same methods, duck-typed
    from lm_eval.api.model import LM as _HarnessLM
except ImportError:  # pragma: no cover - depends on the environment
    _HarnessLM = object


class LMEvalAdapter(_HarnessLM):
    """The lm-eval-harness LM interface over our model: any harness task runs on it.

    Requests are objects with .args: (context, continuation) for loglikelihood, (string,) for
    loglikelihood_rolling, (context, gen_kwargs) for generate_until.
    """

    def __init__(
        self, params, cfg: ModelConfig, tokenizer, batch_size: int = 8, max_gen_toks: int = 256
    ):
        super().__init__()
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.scorer = Scorer(params, cfg, batch_size=batch_size)
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows = []
        for req in requests:
            context, continuation = req.args[:2]
            ctx, cont = encode_pair(self.tokenizer, context, continuation)
            rows.append((ctx + cont, len(cont)))
        return self.scorer.score(rows)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tokenizer.encode(req.args[0], bos=True) for req in requests]
        return [lp for lp, _ in self.scorer.rolling_many(docs)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for start in range(0, len(requests), self.batch_size):
            out += self._generate_batch(requests[start : start + self.batch_size])
        return out

    def _generate_batch(self, requests) -> list[str]:
        # one gen_kwargs per call of generate(); the harness sends one per task anyway
        kwargs = [dict(req.args[1] or {}) for req in requests]
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, kw in enumerate(kwargs):
            groups.setdefault(json.dumps(kw, sort_keys=True, default=str), []).append(i)
        for idx in groups.values():
            kw = kwargs[idx[0]]
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", True) else 0.0
            sampling = gen.Sampling(
                temperature, int(kw.get("top_k", 0) or 0), float(kw.get("top_p", 1.0) or 1.0)
            )
            keep = max(self.cfg.max_seq_len - max_new, 1)
            prompts = [self.tokenizer.encode(requests[i].args[0], bos=True)[-keep:] for i in idx]

            def stop(row, ids, until=until):
                return any(u in self.tokenizer.decode(ids) for u in until)

            new = gen.generate(
                self.params,
                self.cfg,
                prompts,
                max_new,
                sampling=sampling,
                eos_id=self.tokenizer.eos_id,
                stop=stop if until else None,
                seed=int(kw.get("seed", 0) or 0),
            )
            for i, ids in zip(idx, new):
                text = self.tokenizer.decode(ids)
                for u in until:
                    text = text.split(u)[0]
                results[i] = text
        return results
