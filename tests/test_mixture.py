"""data.mixture: sources sampled in proportion, deterministically and resumably."""

import json
import os

import numpy as np
import pytest

from configs.base import TABLE1
from llama_jax.data import mixture
from llama_jax.data.format import write_token_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source(path, lo, n_tokens, seed, width=100):
    """A token dataset whose tokens all lie in [lo, lo + width): a row's source shows in it."""
    rng = np.random.default_rng(seed)
    splits = {s: rng.integers(lo, lo + width, n) for s, n in (("train", n_tokens), ("val", 2000))}
    write_token_dataset(str(path), splits, vocab_size=512, tokenizer_sha256="same")
    return str(path)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    a = _source(root / "a", 0, 40_000, 0)  # 1249 windows of 32: about 1 epoch in 200 x 6 rows
    b = _source(root / "b", 200, 4_000, 1)  # 124 windows: many epochs at 2 rows per batch
    return {"a": (a, 0.75), "b": (b, 0.25)}


@pytest.fixture(scope="module")
def table1_sources(tmp_path_factory):
    """Table 1's seven sources at its weights, source s's tokens in [70 s, 70 s + 70)."""
    root = tmp_path_factory.mktemp("table1")
    return {name: (_source(root / name, 70 * s, 3_000, s, width=70), pct / 100)
            for s, (name, pct) in enumerate(TABLE1.items())}  # fmt: skip


def _check_prefixes(counts, batch_size, weights, bound):
    """counts: int[steps, sources] rows per step. Every step's counts are >= 0 and sum to the
    batch, and through every step n each source is within `bound` of n * B * w (float64)."""
    counts = np.asarray(counts)
    assert (counts >= 0).all(), np.argwhere(counts < 0)[:3]
    assert (counts.sum(axis=1) == batch_size).all()
    n = np.arange(1, len(counts) + 1)[:, None]
    err = np.abs(np.cumsum(counts, axis=0) - n * batch_size * np.asarray(weights)[None])
    assert err.max() < bound, (batch_size, np.unravel_index(err.argmax(), err.shape), err.max())


def test_parse():
    assert mixture.parse("x=/d/x@3; y=/d/y@1") == {"x": ("/d/x", 0.75), "y": ("/d/y", 0.25)}
    assert mixture.parse("x=s3://b/a@b@2") == {"x": ("s3://b/a@b", 1.0)}  # the last @ splits
    for bad, why in (("x=/d@0", "> 0"), ("x=/d", "name=PATH@WEIGHT"), ("x=/d@w", "not a number"),
                     ("", "no source"), ("x=/a@1;x=/b@1", "unique")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            mixture.parse(bad)


def test_rows_follow_the_weights_exactly_and_each_source_its_own_epochs(two_sources):
    """Over 200 batches of 8 the rows from a are 75% (within one row of 0.75 x rows at every
    prefix, so well within the 0.02 asked), and source b's rows run through whole epochs:
    every window once per epoch, in a new order each epoch."""
    loader = mixture.MixtureLoader(two_sources, batch_size=8, seq_len=32, seed=3, prefetch=0)
    from_a, windows_b = 0, []
    for step in range(200):
        rows = loader.batch(step)["inputs"]
        a = rows.max(axis=1) < 100
        from_a += int(a.sum())
        assert abs((from_a) - 0.75 * 8 * (step + 1)) <= 1
        source, k = loader.assignment(step)
        windows_b += list(loader.sources[1].windows_of(k[source == 1]))
    assert abs(from_a / 1600 - 0.75) < 0.02
    nb = loader.sources[1].num_windows
    epochs = [windows_b[i : i + nb] for i in range(0, len(windows_b) - nb + 1, nb)]
    assert len(epochs) >= 3
    assert all(sorted(e) == list(range(nb)) for e in epochs)
    assert epochs[0] != epochs[1]
    plan = loader.planned_epochs(200)
    assert plan["b"] == pytest.approx(400 / nb) and plan["a"] == pytest.approx(1200 / 1249)


def test_resume_at_step_k_gives_the_straight_runs_batches(two_sources):
    straight = mixture.MixtureLoader(two_sources, batch_size=8, seq_len=32, seed=1, prefetch=2)
    want = [next(straight) for _ in range(12)]
    straight.close()
    resumed = mixture.MixtureLoader(two_sources, batch_size=8, seq_len=32, seed=1, step=7)
    for k in range(7, 12):
        got = next(resumed)
        for key in want[k]:
            np.testing.assert_array_equal(got[key], want[k][key])
    resumed.close()


@pytest.mark.slow
def test_training_logs_tokens_and_validation_per_source(tmp_path, tiny_dataset, caplog):
    """A run on a two-source mixture (the test dataset twice, 3:1) logs each source's tokens
    seen and validation loss in metrics.jsonl, and the planned epochs at start-up; resuming
    with another mixture is refused (it changes the data order)."""
    import logging

    from llama_jax.config import load
    from llama_jax.trainer import loop as trainer

    spec = f"code={tiny_dataset[0]}@3;more={tiny_dataset[0]}@1"
    cfg = load(f"{ROOT}/configs/tiny.py", [
        "model.vocab_size=512", "model.dim=32", "model.n_layers=1", "model.max_seq_len=64",
        "train.seq_len=32", "train.batch_size=8", "train.steps=4", "train.eval_every=4",
        "train.eval_batches=1", "train.log_every=2", "train.samples=0", f"data.mixture={spec}",
        "checkpoint.every_steps=4"])  # fmt: skip
    with caplog.at_level(logging.INFO):
        trainer.train(cfg, str(tmp_path))
    assert any("mixture over 4 steps: code 75.0%" in r.getMessage() for r in caplog.records)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    last = rows[-1]
    assert last["step"] == 4
    assert last["tokens_seen/code"] == 24 * 32 and last["tokens_seen/more"] == 8 * 32
    assert {"val_loss/code", "val_loss/more"} <= set(last)
    assert last["val_loss"] == pytest.approx(
        0.75 * last["val_loss/code"] + 0.25 * last["val_loss/more"]
    )
    with pytest.raises(ValueError, match="data.mixture"):
        trainer.train(cfg.replace({"data.mixture": spec.replace("@1", "@2"),
                                   "train.steps": 6}), str(tmp_path))  # fmt: skip


TABLE1_WEIGHTS = np.array(list(TABLE1.values())) / 100  # the paper's percentages, sum 1


@pytest.mark.slow
def test_table1_every_batch_size_non_negative_and_within_a_row(table1_sources):
    """Table 1's weights at batch 1..64 over 200 steps: each step's rows per source come out
    >= 0 and sum to the batch; every prefix is within one row of each share. Strictly: a count
    is the floor or ceiling of its share (float64 n*B*w_i is within 1e-12 of the exact share,
    and a share of denominator 200 that is not whole is >= 1/200 from a whole number)."""
    for batch_size in range(1, 65):
        loader = mixture.MixtureLoader(table1_sources, batch_size=batch_size, seq_len=32,
                                       prefetch=0)  # fmt: skip
        counts = []
        for step in range(200):
            source, k = loader.assignment(step)
            counts.append(np.bincount(source, minlength=7))
            before = np.sum(counts[:-1], axis=0) if step else np.zeros(7, int)
            for s in range(7):  # each source's rows continue its own stream
                np.testing.assert_array_equal(k[source == s], before[s] + np.arange(counts[-1][s]))
        _check_prefixes(counts, batch_size, TABLE1_WEIGHTS, bound=1)


def test_random_weights_every_batch_size_non_negative_and_within_a_row():
    """2..7 sources at random weights as configs write them (integers, or decimals to 3
    places), batch 1..64, 200 steps: the same property as above, against float64 n*B*w_i."""
    rng = np.random.default_rng(0)
    for draw in range(12):
        k = int(rng.integers(2, 8))
        raw = rng.integers(1, 100, k) if draw % 2 else rng.integers(1, 1000, k) / 1000
        weights = raw / raw.sum()
        for batch_size in range(1, 65):
            cumulative = np.array([mixture.drawn(weights, batch_size, n) for n in range(201)])
            # a share that is not whole is >= 1/P from one (P <= 7 * 1000 here), while
            # float64 n*B*w_i is within 1e-12 of it: strictly under one row
            _check_prefixes(np.diff(cumulative, axis=0), batch_size, weights, bound=1)


def test_arbitrary_float_weights_need_a_batch_that_fills_each_share():
    """Weights with no short period (random floats) are followed exactly once every source's
    share of a batch is at least a row, and refused with the batch that works below that."""
    rng = np.random.default_rng(1)
    for _ in range(6):
        weights = rng.random(5) + 0.05
        weights /= weights.sum()
        enough = int(np.ceil(1 / weights.min()))
        for batch_size in (enough, enough + 1, 3 * enough):
            cumulative = np.array([mixture.drawn(weights, batch_size, n) for n in range(201)])
            # exact binary shares vs float64 n*B*w_i: a whole float64 share may hide an exact
            # one a few ulps off, so the ceiling can show as 1 + 1e-13
            _check_prefixes(np.diff(cumulative, axis=0), batch_size, weights, bound=1 + 1e-9)
        with pytest.raises(ValueError, match=f"below batch_size {enough} the weights must be"):
            mixture.drawn(weights, enough - 1, 3)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_small_batches_load_table1(table1_sources, batch_size):
    """The loader runs at batch 1 and 3: every row comes from the source assignment() names
    (its tokens' range), the counts follow Table 1 to a row, and a resumed run matches."""
    kw = {"batch_size": batch_size, "seq_len": 32, "seed": 2}
    loader = mixture.MixtureLoader(table1_sources, **kw)
    batches, counts = [next(loader) for _ in range(40)], []
    loader.close()
    for step, b in enumerate(batches):
        source, _ = loader.assignment(step)
        assert b["inputs"].shape == (batch_size, 32)
        np.testing.assert_array_equal(b["inputs"].min(axis=1) // 70, source)
        np.testing.assert_array_equal(b["inputs"].max(axis=1) // 70, source)
        counts.append(np.bincount(source, minlength=7))
    _check_prefixes(counts, batch_size, TABLE1_WEIGHTS, bound=1)
    resumed = mixture.MixtureLoader(table1_sources, step=25, prefetch=0, **kw)
    for step in range(25, 40):
        np.testing.assert_array_equal(next(resumed)["inputs"], batches[step]["inputs"])
