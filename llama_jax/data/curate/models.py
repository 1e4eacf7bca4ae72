"""The two models CommonCrawl's curation trains for itself (no library does these as the paper
describes, and nothing may be downloaded): a word n-gram language model whose perplexity
ranks pages (CCNet's filter), and a linear classifier of reference pages (Wikipedia's cited
sources in the paper) against random pages, on hashed word n-gram features.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class NGramLM:
    """An interpolated (Jelinek-Mercer) word trigram model with add-one unigrams: small,
    deterministic, and enough to tell fluent text from boilerplate and gibberish."""

    def __init__(self, lambdas=(0.6, 0.3, 0.1)):
        self.lambdas = lambdas
        self.counts = [Counter(), Counter(), Counter()]  # unigrams, bigrams, trigrams
        self.context = [Counter(), Counter()]  # counts of 1- and 2-word contexts

    def fit(self, texts) -> NGramLM:
        for text in texts:
            w = ["<s>", "<s>", *words(text), "</s>"]
            for i in range(2, len(w)):
                self.counts[0][w[i]] += 1
                self.counts[1][(w[i - 1], w[i])] += 1
                self.counts[2][(w[i - 2], w[i - 1], w[i])] += 1
                self.context[0][w[i - 1]] += 1
                self.context[1][(w[i - 2], w[i - 1])] += 1
        self.total, self.vocab = sum(self.counts[0].values()), len(self.counts[0]) + 1
        return self

    def _prob(self, a: str, b: str, c: str) -> float:
        l3, l2, l1 = self.lambdas
        p1 = (self.counts[0][c] + 1) / (self.total + self.vocab)
        p2 = self.counts[1][(b, c)] / self.context[0][b] if self.context[0][b] else 0.0
        p3 = self.counts[2][(a, b, c)] / self.context[1][(a, b)] if self.context[1][(a, b)] else 0.0
        return l3 * p3 + l2 * p2 + l1 * p1

    def perplexity(self, text: str) -> float:
        w = ["<s>", "<s>", *words(text), "</s>"]
        logp = sum(math.log(self._prob(w[i - 2], w[i - 1], w[i])) for i in range(2, len(w)))
        return math.exp(-logp / (len(w) - 2))


def features(text: str, dims: int) -> dict[int, float]:
    """Hashed word unigrams and bigrams, counts scaled to unit length."""
    w = words(text)
    grams = w + [f"{a} {b}" for a, b in zip(w, w[1:])]
    counts = Counter(hash_gram(g) % dims for g in grams)
    norm = math.sqrt(sum(v * v for v in counts.values())) or 1.0
    return {k: v / norm for k, v in counts.items()}


def hash_gram(gram: str) -> int:
    """A stable hash (Python's hash() changes per process)."""
    import zlib

    return zlib.crc32(gram.encode())


class ReferenceClassifier:
    """Logistic regression on hashed n-grams, reference pages (1) against random pages (0),
    trained by full-batch gradient descent with L2 (deterministic)."""

    def __init__(self, dims: int = 1 << 16, steps: int = 200, lr: float = 1.0, l2: float = 1e-4):
        self.dims, self.steps, self.lr, self.l2 = dims, steps, lr, l2
        self.w, self.b = np.zeros(dims), 0.0

    def _matrix(self, texts) -> np.ndarray:
        x = np.zeros((len(texts), self.dims))
        for i, t in enumerate(texts):
            for k, v in features(t, self.dims).items():
                x[i, k] = v
        return x

    def fit(self, reference, random) -> ReferenceClassifier:
        x = self._matrix([*reference, *random])
        y = np.concatenate([np.ones(len(reference)), np.zeros(len(random))])
        for _ in range(self.steps):
            p = 1 / (1 + np.exp(-(x @ self.w + self.b)))
            g = p - y
            self.w -= self.lr * (x.T @ g / len(y) + self.l2 * self.w)
            self.b -= self.lr * g.mean()
        return self

    def prob(self, text: str) -> float:
        z = sum(self.w[k] * v for k, v in features(text, self.dims).items()) + self.b
        return 1 / (1 + math.exp(-z))
