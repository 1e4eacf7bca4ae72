"""Several prepared datasets sampled in fixed proportions: data.mixture, the paper's Table 1.

data.mixture = "name=PATH@WEIGHT;name=PATH@WEIGHT;..." (weights are normalized). Through any
step n of a run of global batch B, source i has given c_i(n) rows, the floor or the ceiling of
its share n*B*w_i (so within one row of it, at every prefix), and never fewer than through step
n - 1: global batch n takes c_i(n + 1) - c_i(n) >= 0 rows from source i. c(n) is computed from
n directly, so resuming needs only (seed, step), in one of two ways:

- B*w_i >= 1 for every source (Table 1 from B = 50 on): c(n) is the largest-remainder
  apportionment of n*B rows. Each share grows by a row or more per step, so the floor or
  ceiling of one prefix is never above that of the next.
- a smaller batch: the weights must be ratios of integers p_i / P (3:1, Table 1's percentages:
  P = 200) with P <= PERIOD_LIMIT. Rows are scheduled one at a time, source i's m-th row no
  earlier than its upper quota allows and no later than its lower quota demands, earliest
  deadline first. After P rows every share is whole, so one period repeats forever: it is
  computed once, and c(n) looks the row count n*B up in it.

Largest remainders at every step of a small batch would not do: a source's count could drop by
one when a step's extra row moves elsewhere; so would rounding each cumulative weight's share
(at Table 1's weights, negative counts up to B = 21). Source s's k-th row is window k of its
own stream (loader.Loader.windows_of: a keyed permutation per epoch), so each source counts its
own epochs.
"""

from __future__ import annotations

import functools
import heapq
import math
from fractions import Fraction

import numpy as np

from llama_jax.data.loader import Loader, rows_of_process, rows_of_sharding

PERIOD_LIMIT = 1 << 20  # rows in the small-batch schedule's period (about 2 s to compute)


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


@functools.lru_cache(maxsize=64)
def exact_weights(weights: tuple[float, ...]) -> tuple[int, ...]:
    """Integers p_i in the weights' proportions: the ratio of integers each float is (1/3 for
    0.333...; Table 1's 0.045 is 9/200, not the binary float just above it), else the float's
    exact binary value."""
    fractions = []
    for w in weights:
        near = Fraction(w).limit_denominator(PERIOD_LIMIT)
        fractions.append(near if abs(float(near) - w) <= 4 * math.ulp(w) else Fraction(w))
    scale = math.lcm(*(f.denominator for f in fractions))
    p = [int(f * scale) for f in fractions]
    return tuple(x // math.gcd(*p) for x in p)


def drawn(weights, batch_size: int, steps: int) -> np.ndarray:
    """int64[sources]: rows drawn from each source in steps [0, steps) of global batch
    `batch_size` (see the module docstring)."""
    p = exact_weights(tuple(float(w) for w in weights))
    total, rows = sum(p), int(steps) * int(batch_size)
    if batch_size * min(p) >= total:
        return np.array(largest_remainder(p, rows), dtype=np.int64)
    if total > PERIOD_LIMIT:
        raise ValueError(
            f"data.mixture weights {[round(float(w), 6) for w in weights]} at batch_size="
            f"{batch_size}: below batch_size {-(-total // min(p))} the weights must be ratios "
            f"of integers summing to <= {PERIOD_LIMIT} (these sum to {total}); round them"
        )
    laps, row = divmod(rows, total)
    taken = _period(p)
    return np.array([laps * w + np.searchsorted(t, row) for w, t in zip(p, taken)])


def largest_remainder(p: tuple[int, ...], rows: int) -> list[int]:
    """Each source's floor(rows * w_i), one more for the largest remainders (ties: the first)."""
    total = sum(p)
    floors, remainders = zip(*(divmod(rows * w, total) for w in p))
    out = list(floors)
    for i in sorted(range(len(p)), key=lambda i: -remainders[i])[: rows - sum(floors)]:
        out[i] += 1
    return out


@functools.lru_cache(maxsize=8)
def _period(p: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """The rows of [0, P) that each source takes in one period of a quota schedule.

    Source i's m-th row (m = 1..p_i) may be row r only when m <= ceil((r + 1) * w_i), that is
    r >= floor((m - 1) / w_i), and must be by the first prefix whose floor(R * w_i) = m, row
    ceil(m / w_i) - 1. Some order meets all of these (Balinski and Young's quota method is
    one), so earliest deadline first does (Jackson's rule for unit jobs)."""
    total = sum(p)
    source = np.repeat(np.arange(len(p)), p)
    m = np.concatenate([np.arange(w) for w in p])  # m - 1
    release = m * total // np.repeat(p, p)
    deadline = -(-(m + 1) * total // np.repeat(p, p)) - 1
    order = np.lexsort((deadline, release))
    out, ready, j = np.empty(total, dtype=np.int64), [], 0
    for row in range(total):
        while j < total and release[order[j]] <= row:
            heapq.heappush(ready, (int(deadline[order[j]]), int(source[order[j]])))
            j += 1
        if not ready or ready[0][0] < row:  # cannot happen (see above); checked all the same
            raise AssertionError(f"data.mixture: no source within quota at row {row} for {p}")
        out[row] = heapq.heappop(ready)[1]
    return tuple(np.flatnonzero(out == i) for i in range(len(p)))


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
        drawn(self.weights, batch_size, step)  # refuses weights this batch cannot follow
        self.step, self.prefetch, self._thread = step, prefetch, None
        self._start()

    def assignment(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, row number within that source) of each row of global batch `step`."""
        before = drawn(self.weights, self.batch_size, step)
        n = drawn(self.weights, self.batch_size, step + 1) - before
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
        rows = drawn(self.weights, self.batch_size, step)
        return {n: int(r) * self.seq_len for n, r in zip(self.names, rows)}

    def planned_epochs(self, steps: int) -> dict[str, float]:
        """Epochs of each source that `steps` steps go through (Table 1's "epochs" column)."""
        rows = drawn(self.weights, self.batch_size, steps)
        return {n: r / s.num_windows for n, r, s in zip(self.names, rows, self.sources)}

    def close(self) -> None:
        super().close()
        for s in self.sources:
            s.close()


def _process_rows(sharding, batch_size: int, seq_len: int) -> tuple[int, int]:
    if sharding is not None:
        return rows_of_sharding(sharding, (batch_size, seq_len))
    return rows_of_process(batch_size, None, None)
