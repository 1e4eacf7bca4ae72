"""Several prepared datasets sampled in fixed proportions: data.mixture, the paper's Table 1.

data.mixture = "name=PATH@WEIGHT;name=PATH@WEIGHT;..." (weights are normalized). Global batch
`step` takes n_s rows from source s, where the rows drawn from sources 1..s through any step t
are round(c_s * t * B) (c_s the cumulative weight): every prefix of the run is within one row
of each weight per source, and any step's rows are computed directly, so resuming needs only
(seed, step). Source s's k-th row is window k of its own stream (loader.Loader.windows_of:
a keyed permutation per epoch), so each source counts its own epochs.
"""

from __future__ import annotations

import numpy as np

from llama_jax.data.loader import Loader


def parse(spec: str) -> dict[str, tuple[str, float]]:
    """ "wiki=/data/wiki@0.75;code=/data/code@0.25" -> {name: (path, weight normalized)}."""
    out = {}
    for item in filter(None, (x.strip() for x in spec.split(";"))):
        name, eq, rest = item.partition("=")
        path, at, weight = rest.rpartition("@")
        if not (eq and at and name and path):
            raise ValueError(f"data.mixture item {item!r}: expected name=PATH@WEIGHT")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(
                f"data.mixture item {item!r}: weight {weight!r} is not a number"
            ) from None
        if w <= 0 or name in out:
            raise ValueError(f"data.mixture item {item!r}: weights must be > 0, names unique")
        out[name] = (path, w)
    if not out:
        raise ValueError(f"data.mixture={spec!r} names no source")
    total = sum(w for _, w in out.values())
    return {n: (p, w / total) for n, (p, w) in out.items()}


def drawn(weights, rows: int) -> np.ndarray:
    """Rows drawn from each source in the first `rows` rows of the run."""
    cumulative = np.round(np.cumsum(weights) / np.sum(weights) * rows).astype(np.int64)
    cumulative[-1] = rows
    return np.diff(np.concatenate([[0], cumulative]))


class MixtureLoader(Loader):
    """Loader's interface (iteration, batch(step), prefetch, seek, close) over a mixture."""

    def __init__(self, sources: dict[str, tuple[str, float]], split: str = "train", *,
                 batch_size: int, seq_len: int, seed: int = 0, sharding=None, step: int = 0,
                 prefetch: int = 2, **kwargs):  # fmt: skip
        self.names = list(sources)
        self.weights = np.array([w for _, w in sources.values()])
        self.sources = [
            Loader(
                path,
                split,
                batch_size=1,
                seq_len=seq_len,
                seed=seed + i,
                prefetch=0,
                process_index=0,
                process_count=1,
                **kwargs,
            )  # fmt: skip
            for i, (path, _) in enumerate(sources.values())
        ]
        first = self.sources[0]
        if len({s.meta["tokenizer_sha256"] for s in self.sources}) > 1:
            raise ValueError("data.mixture: every source must be tokenized with one tokenizer")
        self.meta, self.dataset_dir, self.split = first.meta, first.dataset_dir, split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.num_windows = sum(s.num_windows for s in self.sources)
        self.sharding = sharding
        self.rows = _process_rows(sharding, batch_size, seq_len)  # this process's global rows
        self.step, self.prefetch, self._thread = step, prefetch, None
        self._start()

    def assignment(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, row number within that source) of each row of global batch `step`."""
        before = drawn(self.weights, step * self.batch_size)
        n = drawn(self.weights, (step + 1) * self.batch_size) - before
        source = np.repeat(np.arange(len(n)), n)
        k = np.concatenate([before[s] + np.arange(n[s]) for s in range(len(n))])
        return source, k

    def batch(self, step: int):
        source, k = self.assignment(step)
        source, k = source[slice(*self.rows)], k[slice(*self.rows)]
        parts = [self.sources[s].rows_of(self.sources[s].windows_of(k[source == s]))
                 for s in np.unique(source)]  # fmt: skip
        local = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        return self.to_global(local)

    def tokens_seen(self, step: int) -> dict[str, int]:
        """Tokens trained on from each source in steps [0, step)."""
        rows = drawn(self.weights, step * self.batch_size)
        return {n: int(r) * self.seq_len for n, r in zip(self.names, rows)}

    def planned_epochs(self, steps: int) -> dict[str, float]:
        """Epochs of each source that `steps` steps go through (Table 1's "epochs" column)."""
        rows = drawn(self.weights, steps * self.batch_size)
        return {n: r / s.num_windows for n, r, s in zip(self.names, rows, self.sources)}

    def close(self) -> None:
        super().close()
        for s in self.sources:
            s.close()


def _process_rows(sharding, batch_size: int, seq_len: int) -> tuple[int, int]:
    from llama_jax.data.loader import _rows_of_process, _rows_of_sharding

    if sharding is not None:
        return _rows_of_sharding(sharding, (batch_size, seq_len))
    return _rows_of_process(batch_size, None, None)
