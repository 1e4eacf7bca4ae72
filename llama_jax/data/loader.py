"""Deterministic, resumable, per-process loading of packed training windows.

The split's flat token stream (every document BOS + tokens + EOS, concatenated; see format.py)
is cut into windows of seq_len + 1 tokens with stride seq_len: window w covers tokens
[w*T, w*T + T + 1), so consecutive windows share one token and every token after the first is
a target exactly once per epoch. inputs = window[:-1], targets = window[1:]. Windows cross
document boundaries (LLaMA packs without masking across documents): the target after a
document's EOS is the next one's BOS.

Order: the global stream of window slots g = 0, 1, 2, ... maps slot g to epoch g // W and
window feistel_permute(g % W, W, key(seed, epoch)): a keyed bijection of [0, W) evaluated per
index, so no permutation of the whole dataset is ever built and any step is computed
directly. Global batch `step` holds slots [step*B, (step+1)*B); a batch may straddle two
epochs, so every window is used exactly once per epoch with nothing dropped. The loader's
state is therefore just (seed, step).

Each process computes only the rows of the global batch that live on its devices (derived
from the sharding, or process_index/process_count without one), reads those windows, and
jax.make_array_from_process_local_data assembles the global array. A background thread
prepares `prefetch` batches ahead.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref

import numpy as np

from llama_jax.data.format import open_split, read_metadata
from llama_jax.data.instruct import positions_and_mask
from llama_jax.data.tokenizer import check_vocab

_M64 = (1 << 64) - 1
IN_MEMORY_BYTES = 1 << 30  # splits up to this size are read into host memory once


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finalizer of x ^ key, vectorized (uint64 arithmetic wraps mod 2**64)."""
    x = x ^ key
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_key(seed: int, epoch: int) -> int:
    return _splitmix64(_splitmix64(seed & _M64) ^ (epoch & _M64))


def feistel_permute(index: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A keyed pseudo-random bijection of [0, n), applied elementwise to `index`.

    A balanced Feistel network permutes [0, 4**h) with 4**h >= n; cycle walking (re-applying
    it to values >= n until they land below n) restricts it to a bijection of [0, n).
    """
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    keys = [np.uint64(_splitmix64(key ^ r)) for r in range(rounds)]

    def encrypt(x):
        left, right = x >> shift, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & mask)
        return (left << shift) | right

    y = encrypt(np.asarray(index, dtype=np.uint64))
    while True:
        outside = y >= np.uint64(n)
        if not outside.any():
            return y.astype(np.int64)
        y[outside] = encrypt(y[outside])


def rows_of_sharding(sharding, shape: tuple[int, int]) -> tuple[int, int]:
    """The contiguous range of global-batch rows held by this process's devices."""
    spans = set()
    for idx in sharding.addressable_devices_indices_map(shape).values():
        rows, cols = idx[0], idx[1] if len(idx) > 1 else slice(None)
        if cols.indices(shape[1]) != (0, shape[1], 1):
            raise NotImplementedError(
                "the loader needs whole sequences per device (length not sharded)"
            )
        spans.add(rows.indices(shape[0])[:2])
    spans = sorted(spans)
    lo, hi = spans[0]
    for a, b in spans[1:]:
        if a > hi:
            raise NotImplementedError(
                f"this process's batch rows {spans} are not one contiguous range"
            )
        hi = max(hi, b)
    return lo, hi


def rows_of_process(
    batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int]:
    """This process's even slice of global-batch rows (default: jax's process index/count)."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes")
    per = batch_size // process_count
    return process_index * per, (process_index + 1) * per


_live: weakref.WeakSet = weakref.WeakSet()


def _close_all() -> None:
    """Stops prefetch threads at exit: a daemon thread killed inside a JAX call can abort."""
    for loader in list(_live):
        loader.close()


def _halt_and_join(halt: threading.Event, thread: threading.Thread) -> None:
    halt.set()
    if thread is not threading.current_thread():  # a collection may run on the thread itself
        thread.join()


class Loader:
    """Iterator of {"inputs": int32[B, T], "targets": int32[B, T]} batches (plus loss_mask,
    segment_ids, positions for packed data or document masking); see module docstring.

    Args:
      dataset_dir: a prepared dataset (launch.prepare_data), local or a tensorstore URL.
      split: "train" or "val".
      batch_size: global batch B in sequences; seq_len: T.
      seed: data-order seed. step: the first batch to produce (resume).
      sharding: where the batch goes (batch dim sharded); None gives numpy arrays holding
        this process's rows only.
      process_index, process_count: which even slice of rows this process reads when
        sharding is None (default: jax's).
      expected_vocab_size: model.vocab_size; raises if the dataset's tokenizer is larger.
      expected_tokenizer_sha: sha256 of the tokenizer in use; raises on a mismatch.
      in_memory: read the whole split into host memory (default: when <= 1 GiB) instead of
        reading each window from tensorstore.
      document_bos: data.document_masking for a token stream: the BOS id that starts each
        document; batches then carry segment_ids and positions (restarting at each document)
        and no target crosses into the next document.

    A packed dataset (instruction data, data/instruct.py) is read row by row instead, each
    row one window, with its loss_mask, segment_ids and positions.
    """

    def __init__(
        self,
        dataset_dir: str,
        split: str = "train",
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        sharding=None,
        step: int = 0,
        prefetch: int = 2,
        process_index: int | None = None,
        process_count: int | None = None,
        expected_vocab_size: int | None = None,
        expected_tokenizer_sha: str | None = None,
        in_memory: bool | None = None,
        document_bos: int | None = None,
    ):
        self.meta = meta = read_metadata(dataset_dir)
        if split not in meta["splits"]:
            raise ValueError(f"unknown split {split!r}; {dataset_dir} has {sorted(meta['splits'])}")
        if expected_vocab_size is not None:
            check_vocab(meta, expected_vocab_size)
        if expected_tokenizer_sha and expected_tokenizer_sha != meta["tokenizer_sha256"]:
            raise ValueError(
                f"{dataset_dir} was tokenized with a different tokenizer (sha256 "
                f"{meta['tokenizer_sha256'][:16]}...) than the one in use "
                f"({expected_tokenizer_sha[:16]}...); "
                f"re-run prepare_data with this tokenizer or use {dataset_dir}/tokenizer.model"
            )
        self.dataset_dir, self.split = dataset_dir, split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.num_tokens = int(meta["splits"][split]["tokens"])
        self.packed, self.document_bos = meta.get("packed"), document_bos
        self.stride, self.num_windows = self._windows()
        if self.num_windows < batch_size:
            raise ValueError(
                f"the {split!r} split of {dataset_dir} is smaller than one batch: "
                f"{self.num_tokens} tokens make {self.num_windows} windows of seq_len+1="
                f"{seq_len + 1} tokens, but batch_size={batch_size} needs {batch_size} windows "
                f"({batch_size * seq_len + 1} tokens)"
            )
        self.sharding = sharding
        if sharding is not None:
            self.rows = rows_of_sharding(sharding, (batch_size, seq_len))
        else:
            self.rows = rows_of_process(batch_size, process_index, process_count)
        self._store = open_split(dataset_dir, split)
        nbytes = self.num_tokens * self._store.dtype.numpy_dtype.itemsize
        if in_memory is None:
            in_memory = nbytes <= IN_MEMORY_BYTES
        self._tokens = self._store.read().result() if in_memory else None
        self._extra = {}  # a packed dataset's loss_mask and segment_ids beside the tokens
        for name in ("loss_mask", "segment_ids") if self.packed else ():
            store = open_split(dataset_dir, f"{split}.{name}")
            self._extra[name] = store.read().result() if in_memory else store
        self.step = step
        self.prefetch = prefetch
        self._thread = None
        self._start()

    def _windows(self) -> tuple[int, int]:
        """(stride, number of windows): overlapping windows of a token stream, or the rows of a
        packed dataset, which must be seq_len + 1 long."""
        T = self.seq_len
        if not self.packed:
            return T, max(0, (self.num_tokens - 1) // T)
        if self.packed["row_len"] != T + 1:
            raise ValueError(
                f"{self.dataset_dir} is packed in rows of {self.packed['row_len']} tokens: set "
                f"train.seq_len={self.packed['row_len'] - 1} (or prepare it for {T})"
            )
        return T + 1, self.num_tokens // (T + 1)

    # ------------------------------------------------------------------ random access

    @property
    def epoch(self) -> int:
        """The epoch of the next batch's first window."""
        return self.step * self.batch_size // self.num_windows

    def window_ids(self, step: int) -> np.ndarray:
        """Window indices of this process's rows of global batch `step`."""
        return self.windows_of(step * self.batch_size + np.arange(*self.rows, dtype=np.int64))

    def windows_of(self, slots: np.ndarray) -> np.ndarray:
        """Window indices of positions `slots` of this split's endless stream of epochs."""
        epochs, pos = np.divmod(slots, self.num_windows)
        out = np.empty_like(slots)
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = feistel_permute(pos[m], self.num_windows, epoch_key(self.seed, int(e)))
        return out

    def _read(self, windows: np.ndarray, source=None) -> np.ndarray:
        """[b, T+1] windows of the tokens (or of another array stored beside them)."""
        source = (
            (self._tokens if self._tokens is not None else self._store)
            if source is None
            else source
        )
        starts = windows * self.stride
        if isinstance(source, np.ndarray):
            return source[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int32)
        reads = [source[s : s + self.seq_len + 1].read() for s in starts]  # all in flight
        return np.stack([r.result() for r in reads]).astype(np.int32)

    def _segments(self, ids: np.ndarray, w: np.ndarray) -> dict:
        """loss_mask, segment_ids and positions of a packed dataset's rows, or of token windows
        under document masking (a segment starts at each BOS)."""

        if self.packed:
            seg, learn = (
                self._read(ids, self._extra["segment_ids"]),
                self._read(ids, self._extra["loss_mask"]),
            )
        else:
            seg, learn = 1 + np.cumsum(w == self.document_bos, axis=1), np.ones_like(w)
        positions, same = positions_and_mask(seg)
        return {
            "loss_mask": (learn[:, 1:] * same).astype(np.float32),
            "segment_ids": seg[:, :-1].astype(np.int32),
            "positions": positions,
        }

    def rows_of(self, ids: np.ndarray) -> dict:
        """The local batch arrays (inputs, targets, and loss_mask, segment_ids, positions for
        packed data or document masking) of windows `ids`."""
        w = self._read(ids)  # [b, T+1]
        local = {"inputs": w[:, :-1], "targets": w[:, 1:]}  # [b, T] each
        if self.packed or self.document_bos is not None:
            local.update(self._segments(ids, w))
        return local

    def batch(self, step: int):
        """Global batch `step` (this process's part of it), without changing the loader's state."""
        return self.to_global(self.rows_of(self.window_ids(step)))

    def to_global(self, local: dict):
        """This process's rows as global arrays on self.sharding (numpy without a sharding)."""
        if self.sharding is None:
            return local
        import jax

        shape = (self.batch_size, self.seq_len)
        return {
            k: jax.make_array_from_process_local_data(self.sharding, v, shape)
            for k, v in local.items()
        }

    def batches(self, count: int, start: int = 0) -> list:
        """Batches start..start+count-1, e.g. a fixed validation set; state is unchanged."""
        return [self.batch(s) for s in range(start, start + count)]

    epoch_batches = batches

    # ------------------------------------------------------------------ iteration

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            out = self.batch(self.step)
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._thread = None
                raise item
            step, out = item
            assert step == self.step, (step, self.step)
        self.step += 1
        return out

    def seek(self, step: int) -> None:
        """Continues from global batch `step` (drops prefetched batches)."""
        self._stop()
        self.step = step
        self._start()

    def _start(self) -> None:
        if self.prefetch <= 0:
            return
        if not _live:  # registered late so that it runs before JAX's own atexit teardown
            atexit.unregister(_close_all)
            atexit.register(_close_all)
        _live.add(self)
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._halt = threading.Event()
        # The thread holds only a weak reference, so an abandoned loader is collected and its
        # thread exits instead of spinning until interpreter shutdown.
        self._thread = threading.Thread(
            target=Loader._produce,
            args=(weakref.ref(self), self.step, self._queue, self._halt),
            name=f"loader-{self.split}",
            daemon=True,
        )
        self._thread.start()
        # Stops the thread when the loader is collected. Not a __del__: one run during
        # interpreter teardown finds module globals already None, while a finalizer holds what
        # it needs and never runs after atexit (where _close_all stops the threads).
        self._finalizer = weakref.finalize(self, _halt_and_join, self._halt, self._thread)
        self._finalizer.atexit = False

    @staticmethod
    def _produce(ref, step: int, q: queue.Queue, halt: threading.Event) -> None:
        while not halt.is_set():
            loader = ref()
            if loader is None:
                return
            try:
                item = (step, loader.batch(step))
            except BaseException as e:  # noqa: BLE001  (re-raised by next())
                item = e
            del loader
            while not halt.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            step += 1

    def _stop(self) -> None:
        if self._thread is not None:
            # detach, not call: a finalizer is a no-op once weakref's own atexit hook has run,
            # which may come before _close_all
            self._finalizer.detach()
            _halt_and_join(self._halt, self._thread)
            self._thread = None

    def close(self) -> None:
        self._stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (
            f"Loader({self.dataset_dir!r}, {self.split!r}, batch_size={self.batch_size}, "
            f"seq_len={self.seq_len}, seed={self.seed}, step={self.step}, "
            f"windows={self.num_windows})"
        )
