"""The reference classifier on sparse features against a dense float64 reference written here:
same features, same probabilities within float64 rounding."""

import math
import zlib
from collections import Counter

import numpy as np
import pytest

from llama_jax.data.curate import models as cm

U = 2.0**-53  # float64 unit roundoff


def _pages(n, seed, spam):
    rng = np.random.default_rng(seed)
    if spam:
        items = ["shoes", "watches", "phones", "bags", "pills", "loans"]
        return [f"Buy cheap {items[i]} now! Best price {items[i]}, click here. Deals deals {j}."
                for i, j in zip(rng.integers(0, 6, n), rng.integers(0, 99, n))]  # fmt: skip
    towns = ["Lyon", "Graz", "Turku", "Porto", "Ghent", "Brno", "Aarhus", "Split"]
    return [f"{towns[i]} is a city on a river. It has a university founded in {1400 + j} and a "
            f"cathedral. The old town was rebuilt after the fire of {1700 + k}, and its museum "
            f"of history holds {j * k} objects."
            for i, j, k in zip(rng.integers(0, 8, n), rng.integers(0, 300, n),
                               rng.integers(0, 200, n))]  # fmt: skip


def _features_ref(text, dims):
    """The original dict-of-counts features, in plain Python."""
    w = cm.words(text)
    grams = w + [f"{a} {b}" for a, b in zip(w, w[1:])]
    counts = Counter(zlib.crc32(g.encode()) % dims for g in grams)
    norm = math.sqrt(sum(v * v for v in counts.values())) or 1.0
    return {k: v / norm for k, v in counts.items()}


def _dense_fit(texts, y, dims, steps, lr, l2):
    x = np.zeros((len(texts), dims))
    for i, t in enumerate(texts):
        for k, v in _features_ref(t, dims).items():
            x[i, k] = v
    w, b = np.zeros(dims), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ w + b)))
        g = p - y
        w -= lr * (x.T @ g / len(y) + l2 * w)
        b -= lr * g.mean()
    return x, w, b


def _dense_prob(w, b, text, dims):
    z = sum(w[k] * v for k, v in _features_ref(text, dims).items()) + b
    return 1 / (1 + math.exp(-z))


@pytest.mark.parametrize("dims", [1 << 16, 1 << 8])  # 1<<8: many hash collisions per page
def test_sparse_classifier_matches_dense_float64(dims):
    ref, rnd = _pages(30, 0, False), _pages(30, 1, True)
    new = [*_pages(5, 7, False), *_pages(5, 8, True), "", "Just one line."]
    for t in [*ref, *new]:
        assert cm.features(t, dims) == _features_ref(t, dims)  # bit-identical features
    steps, lr, l2 = 200, 1.0, 1e-4
    clf = cm.ReferenceClassifier(dims=dims, steps=steps, lr=lr, l2=l2).fit(ref, rnd)
    y = np.r_[np.ones(len(ref)), np.zeros(len(rnd))]
    x, w, b = _dense_fit([*ref, *rnd], y, dims, steps, lr, l2)

    # The bound. Rows of X have unit 2-norm, so ||X||_2^2 <= ||X||_F^2 = n and the GD map
    # w -> w - lr (X^T (sigmoid(Xw + b) - y) / n + l2 w) has a symmetric Jacobian with
    # eigenvalues in [1 - lr (1/4 + l2), 1 - lr l2], inside [-1, 1] for lr <= 2 / (1/4 + l2):
    # it is non-expansive, so the two implementations' per-step rounding differences add up
    # over the steps rather than grow. Per step (m = most non-zeros in a row, n = rows,
    # W = a bound on ||w||_2 along the path): Xw is summed in another order, off by at most
    # m U W per row, hence sigmoid by m U W / 4, and X^T of that by m U W / 4 in 2-norm;
    # X^T g itself is summed in another order, off by U sum_i |x_ik| per column, at most U n
    # in 2-norm; the update's own arithmetic adds U (W + 1). w, b after fit: off by at most
    # steps * delta; z = x.w + b of a unit-norm page by that plus its own m U W; p by z / 4.
    m = max(len(_features_ref(t, dims)) for t in [*ref, *rnd, *new])
    n = len(y)
    big_w = 2 * np.linalg.norm(w) + 1  # ||w|| grows from 0 to its final value; 2x for margin
    delta = U * (m * big_w / 4 + n + big_w + 1)
    bound = (lr * steps * delta * 2 + m * U * big_w) / 4  # 2: both w and b carry delta
    assert 0 < bound < 1e-9  # the bound is tight enough to mean something

    got = np.array([clf.prob(t) for t in new])
    want = np.array([_dense_prob(w, b, t, dims) for t in new])
    assert np.max(np.abs(got - want)) <= bound, (np.max(np.abs(got - want)), bound)
    train = np.array([clf.prob(t) for t in [*ref, *rnd]])
    want_train = 1 / (1 + np.exp(-(x @ w + b)))
    assert np.max(np.abs(train - want_train)) <= bound
    np.testing.assert_array_equal(clf.probs(new), clf.probs(new))
    assert np.max(np.abs(clf.probs(new) - got)) <= 2 * m * U * big_w  # batch = one by one
    assert np.all(got[:5] > 0.5) and np.all(got[5:10] < 0.5)


def test_fit_is_deterministic_and_sparse():
    ref, rnd = _pages(20, 0, False), _pages(20, 1, True)
    a = cm.ReferenceClassifier().fit(ref, rnd)
    b = cm.ReferenceClassifier().fit(ref, rnd)
    np.testing.assert_array_equal(a.w, b.w)
    assert a.b == b.b
    x = a._matrix([*ref, *rnd])
    assert x.format == "csr" and x.shape == (40, 1 << 16) and x.nnz < 40 * 100
    np.testing.assert_allclose(np.sqrt(x.multiply(x).sum(axis=1)), 1.0, rtol=1e-15)


def test_refit_continues_from_the_weights_like_dense():
    """A second fit starts from the first's weights; columns the new pages never use only
    decay by L2, exactly as the dense update does to them."""
    dims, steps = 1 << 12, 20
    a_ref, a_rnd = _pages(10, 0, False), _pages(10, 1, True)
    b_ref, b_rnd = ["A town with a river and a bridge."] * 3, ["Buy now, click here."] * 3
    clf = cm.ReferenceClassifier(dims=dims, steps=steps).fit(a_ref, a_rnd)
    first = clf.w.copy()
    clf.fit(b_ref, b_rnd)
    _, w, b = _dense_fit([*a_ref, *a_rnd], np.r_[np.ones(10), np.zeros(10)], dims, steps, 1.0, 1e-4)
    x = np.zeros((6, dims))
    for i, t in enumerate([*b_ref, *b_rnd]):
        for k, v in _features_ref(t, dims).items():
            x[i, k] = v
    y = np.r_[np.ones(3), np.zeros(3)]
    for _ in range(steps):
        g = 1 / (1 + np.exp(-(x @ w + b))) - y
        w -= 1.0 * (x.T @ g / len(y) + 1e-4 * w)
        b -= 1.0 * g.mean()
    unused = ~x.any(axis=0)
    assert unused.sum() > 0 and np.any(w[unused] != 0)
    decayed = first[unused]
    for _ in range(steps):
        decayed -= 1.0 * (0.0 / len(y) + 1e-4 * decayed)
    np.testing.assert_array_equal(clf.w[unused], decayed)  # the same float ops: bit-equal
    assert np.max(np.abs(clf.w - w)) < 1e-13 and abs(clf.b - b) < 1e-13  # rounding only
