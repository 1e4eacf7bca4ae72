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
    idx, val = feature_arrays(text, dims)
    return dict(zip(idx.tolist(), val.tolist()))


def feature_arrays(text: str, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """features() as sorted (indices, values) arrays: one CSR row."""
    import zlib

    w = words(text)
    grams = [*w, *map(" ".join, zip(w, w[1:]))]
    hashed = np.fromiter(map(zlib.crc32, map(str.encode, grams)), np.int64, len(grams))
    idx, counts = np.unique(hashed % dims, return_counts=True)
    val = counts.astype(np.float64)
    return idx, val / (math.sqrt(float(counts @ counts)) or 1.0)


def hash_gram(gram: str) -> int:
    """A stable hash (Python's hash() changes per process)."""
    import zlib

    return zlib.crc32(gram.encode())


class ReferenceClassifier:
    """Logistic regression on hashed n-grams, reference pages (1) against random pages (0),
    trained by full-batch gradient descent with L2 (deterministic). Pages are sparse CSR rows
    (a page has a few thousand non-zeros of the 1<<16 dims)."""

    def __init__(self, dims: int = 1 << 16, steps: int = 200, lr: float = 1.0, l2: float = 1e-4):
        self.dims, self.steps, self.lr, self.l2 = dims, steps, lr, l2
        self.w, self.b = np.zeros(dims), 0.0

    def _matrix(self, texts):
        """The pages' features as a scipy.sparse CSR matrix, len(texts) x dims, float64."""
        import scipy.sparse as sp

        rows = [feature_arrays(t, self.dims) for t in texts]
        indptr = np.zeros(len(rows) + 1, np.int64)
        np.cumsum([len(i) for i, _ in rows], out=indptr[1:])
        idx = np.concatenate([np.zeros(0, np.int64), *(i for i, _ in rows)])
        val = np.concatenate([np.zeros(0), *(v for _, v in rows)])
        return sp.csr_array((val, idx, indptr), shape=(len(rows), self.dims))

    def fit(self, reference, random) -> ReferenceClassifier:
        import scipy.sparse as sp

        x = self._matrix([*reference, *random])
        # GD on the columns some page uses: the others get no data gradient, only L2 decay
        cols, inv = np.unique(x.indices, return_inverse=True)
        x = sp.csr_array((x.data, inv, x.indptr), shape=(x.shape[0], len(cols)))
        xt = x.T.tocsr()  # X^T g as a row-major product too
        y = np.concatenate([np.ones(len(reference)), np.zeros(len(random))])
        w, rest = self.w[cols], np.ones(self.dims, bool)
        rest[cols] = False
        decay = self.w[rest] if self.w[rest].any() else None  # zero stays zero
        for _ in range(self.steps):
            p = 1 / (1 + np.exp(-(x @ w + self.b)))
            g = p - y
            w -= self.lr * (xt @ g / len(y) + self.l2 * w)
            self.b -= self.lr * g.mean()
            if decay is not None:
                decay -= self.lr * (self.l2 * decay)
        self.w[cols] = w
        if decay is not None:
            self.w[rest] = decay
        return self

    def prob(self, text: str) -> float:
        idx, val = feature_arrays(text, self.dims)
        return 1 / (1 + math.exp(-(float(val @ self.w[idx]) + self.b)))

    def probs(self, texts) -> np.ndarray:
        """prob() of many pages at once."""
        return 1 / (1 + np.exp(-(self._matrix(texts) @ self.w + self.b)))
