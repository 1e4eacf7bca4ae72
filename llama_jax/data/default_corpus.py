"""The built-in corpus: the Python standard library's .py sources, so training needs no download.

Every machine that runs this code has them. Files are taken in sorted relative-path order
(site-packages excluded), each file one document, until MAX_BYTES of text: ~16 MB gives
~6M tokens at vocab 2048, enough for the tiny config, and builds in well under a minute on
two cores. The result is cached per (vocab size, Python minor version) since another Python
ships other sources.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import sysconfig
import tempfile
import time

from llama_jax.data.format import FORMAT
from llama_jax.data.prepare import prepare
from llama_jax.data.tokenizer import train_tokenizer

MAX_BYTES = 16 << 20
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files(max_bytes: int = MAX_BYTES) -> list[str]:
    """The standard library's .py files in a deterministic order, up to max_bytes in total."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in EXCLUDED_DIRS]
        found += [os.path.join(d, n) for n in names if n.endswith(".py")]
    found.sort(key=lambda p: os.path.relpath(p, root).replace(os.sep, "/"))
    files, total = [], 0
    for path in found:
        size = os.path.getsize(path)
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library at {root}")
    return files


def default_cache_dir() -> str:
    return os.environ.get("LLAMA_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llama_jax"
    )


def default_dataset_dir(
    vocab_size: int, cache_dir: str | None = None, max_bytes: int = MAX_BYTES
) -> str:
    """Where ensure_default_dataset keeps (or will keep) this corpus."""
    fmt = FORMAT.rsplit("/", 1)[-1]  # a new dataset format builds a new cache entry
    name = f"default_corpus_v{vocab_size}_py{sys.version_info[0]}{sys.version_info[1]}_f{fmt}"
    if max_bytes != MAX_BYTES:
        name += f"_{max_bytes}"
    return os.path.join(cache_dir or default_cache_dir(), name)


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive inter-process lock (flock); the build also renames atomically, so a
    platform without fcntl is still safe, merely redundant in its work."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_default_dataset(
    vocab_size: int = 2048,
    cache_dir: str | None = None,
    *,
    max_bytes: int = MAX_BYTES,
    verbose: bool = True,
) -> tuple[str, str]:
    """Builds (once) and returns (dataset_dir, tokenizer_model_path) of the default corpus.

    Safe to call from several processes at once: one builds under a file lock, in a temp dir
    renamed into place; the others wait and reuse it.
    """
    final = default_dataset_dir(vocab_size, cache_dir, max_bytes)
    cache_dir, name = os.path.split(final)
    tokenizer = os.path.join(final, "tokenizer.model")
    if os.path.exists(os.path.join(final, "metadata.json")):
        return final, tokenizer
    os.makedirs(cache_dir, exist_ok=True)
    with _file_lock(os.path.join(cache_dir, name + ".lock")):
        if os.path.exists(os.path.join(final, "metadata.json")):  # another process built it
            return final, tokenizer
        t0 = time.time()
        if verbose:
            print(
                f"building the default corpus (Python stdlib sources) into {final} ...", flush=True
            )
        files = stdlib_files(max_bytes)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tokenizer-", dir=cache_dir)
        try:
            model = train_tokenizer(files, vocab_size, tmp)
            # Small shards so that the worker processes share the work.
            prepare(
                files,
                model,
                final,
                val_fraction=0.01,
                shard_bytes=2 << 20,
                progress=verbose,
                verbose=verbose,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if verbose:
            print(f"default corpus ready in {time.time() - t0:.1f}s", flush=True)
    return final, tokenizer


def resolve_dataset(path: str, tokenizer: str, vocab_size: int) -> tuple[str, str]:
    """(dataset_dir, tokenizer_path) of a run: the prepared dataset at `path` (data.path) with
    its own tokenizer.model unless `tokenizer` (data.tokenizer) names another, or, with no
    path, the built-in default corpus at `vocab_size`."""
    if path:
        if not os.path.exists(os.path.join(path, "metadata.json")):
            raise FileNotFoundError(
                f"data.path={path!r} is not a prepared dataset (no metadata.json)"
            )
        tokenizer = tokenizer or os.path.join(path, "tokenizer.model")
        if not os.path.exists(tokenizer):
            raise FileNotFoundError(f"tokenizer not found: {tokenizer!r}; set data.tokenizer")
        return path, tokenizer
    if tokenizer:
        raise ValueError(
            "data.tokenizer is set but data.path is not: the built-in default corpus has its "
            "own tokenizer; prepare a dataset with yours (launch.prepare_data)"
        )
    return ensure_default_dataset(vocab_size=vocab_size)
