"""Data section: default-corpus build, prepare_data tokens/s, Loader batches/s at the config's
batch shape (in-memory vs tensorstore reads, numpy vs a global jax.Array over all devices), and
curation MB/s per recipe on one core next to datatrove reading and writing the same bytes."""

from __future__ import annotations

import os
import tempfile
import time

from llama_jax.bench.common import load_config, time_fn
from llama_jax.data.curate.recipes import RECIPES, curate
from llama_jax.data.default_corpus import default_dataset_dir, ensure_default_dataset, stdlib_files
from llama_jax.data.format import read_metadata
from llama_jax.data.loader import Loader
from llama_jax.data.prepare import prepare


def add_args(parser) -> None:
    parser.add_argument("--data-path", default="", help="dataset to load; '' = the default corpus")
    parser.add_argument("--data-batches", type=int, default=300, help="loader batches timed")
    parser.add_argument("--data-prepare-mb", type=float, default=4.0, help="stdlib MB to prepare")
    parser.add_argument("--data-workers", type=int, default=0, help="prepare workers; 0 = all CPUs")
    parser.add_argument("--data-curate-mb", type=float, default=4.0,
                        help="stdlib MB each curation recipe cleans; 0 = no curation rows")  # fmt: skip


def _default_corpus_row(vocab: int) -> tuple[dict, str, str]:
    """Builds (or finds cached) the default corpus: its row, dataset dir and tokenizer."""

    cached = os.path.exists(os.path.join(default_dataset_dir(vocab), "metadata.json"))
    t0 = time.perf_counter()
    path, tok_path = ensure_default_dataset(vocab, verbose=False)
    build = time.perf_counter() - t0
    meta = read_metadata(path)
    row = {
        "what": "default corpus",
        "detail": f"{meta['text_bytes'] / 1e6:.1f} MB stdlib, {meta['documents']} docs"
        + (" (cached)" if cached else ""),
        "tokens": meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"],
        "seconds": None if cached else build,
    }
    return row, path, tok_path


def _prepare_row(args, tok_path: str) -> dict:
    """prepare_data throughput on a slice of the stdlib (includes worker start-up)."""

    files = stdlib_files(int(getattr(args, "data_prepare_mb", 4.0) * (1 << 20)))
    workers = getattr(args, "data_workers", 0) or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        meta = prepare(
            files,
            tok_path,
            os.path.join(tmp, "ds"),
            num_workers=workers,
            shard_bytes=1 << 20,
            progress=False,
            verbose=False,
        )
        dt = time.perf_counter() - t0
    tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    return {
        "what": "prepare_data",
        "detail": f"{meta['text_bytes'] / 1e6:.1f} MB, {workers} workers",
        "tokens": tokens,
        "seconds": dt,
        "tokens/s": tokens / dt,
    }


def _loader_row(path: str, cfg, n: int, in_memory: bool, sharding) -> dict:
    """Steady-state rate of Loader.next() with the prefetch thread, over n batches."""
    import jax
    import numpy as np

    B, T = cfg.train.batch_size, cfg.train.seq_len
    ld = Loader(
        path,
        "train",
        batch_size=B,
        seq_len=T,
        seed=0,
        sharding=sharding,
        prefetch=cfg.data.prefetch,
        in_memory=in_memory,
    )
    for _ in range(3):
        next(ld)
    t0 = time.perf_counter()
    for _ in range(n):
        b = next(ld)
    jax.block_until_ready(b)
    dt = time.perf_counter() - t0
    ld.close()
    assert np.asarray(b["inputs"]).shape == (B, T)
    return {
        "what": "loader",
        "detail": f"{B}x{T} {'in-memory' if in_memory else 'tensorstore'} -> "
        + ("numpy" if sharding is None else f"jax.Array/{jax.device_count()} devices"),
        "batches/s": n / dt,
        "tokens/s": n * B * T / dt,
    }


def _memcpy_limit_row() -> dict:
    """The physical limit: host memory bandwidth, as int32 tokens copied per second."""
    import numpy as np

    src = np.arange(16 << 20, dtype=np.int32)  # 64 MiB
    dst = np.empty_like(src)
    t = time_fn(lambda: np.copyto(dst, src), warmup=1, repeats=5)
    return {
        "what": "limit: memcpy",
        "detail": "host copy of 64 MiB int32 (median of 5)",
        "tokens/s": src.size / t["median"],
    }


def _curation_rows(mb: float) -> list[dict]:
    """MB/s of each curation recipe at 1 and 2 tasks (as many worker processes) on stdlib
    sources as JSONL pages in 4 files, and of a datatrove read + write of the same bytes (the
    floor every recipe pays). commoncrawl is left out: it needs reference and random pages."""
    import json

    try:
        from datatrove.executor.local import LocalPipelineExecutor
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.writers import JsonlWriter

    except ImportError:
        return [{"what": "curation", "detail": "pip install -e '.[curate]' for these rows"}]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "in"))
        size, files = 0, [open(os.path.join(tmp, "in", f"pages-{k}.jsonl"), "w") for k in range(4)]
        for i, path in enumerate(stdlib_files(int(mb * (1 << 20)))):
            text = open(path, encoding="utf-8", errors="replace").read()
            size += len(text.encode())
            files[i % 4].write(json.dumps({"text": text, "license": "mit", "answers": []}) + "\n")
        for f in files:
            f.close()
        t0 = time.perf_counter()
        LocalPipelineExecutor([JsonlReader(os.path.join(tmp, "in")), JsonlWriter(os.path.join(tmp, "raw"))],
                              tasks=1, workers=1, logging_dir=os.path.join(tmp, "raw_logs")).run()  # fmt: skip
        raw = time.perf_counter() - t0
        rows.append({"what": "curation", "detail": "raw: datatrove read + write",
                     "MB/s": size / 1e6 / raw})  # fmt: skip
        for recipe in [r for r in RECIPES if r != "commoncrawl"]:
            one = None
            for tasks in (1, 2):
                t0 = time.perf_counter()
                curate(recipe, os.path.join(tmp, "in"), os.path.join(tmp, f"{recipe}-{tasks}"),
                       tasks, tasks=tasks)  # fmt: skip
                dt = time.perf_counter() - t0
                one = one or dt
                rows.append({"what": "curation", "detail": f"{recipe}, {tasks} tasks",
                             "MB/s": size / 1e6 / dt, "vs_raw": raw / dt,
                             "scaling": one / dt})  # fmt: skip
    return rows


def measure(args) -> list[dict]:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    cfg = load_config(args)
    rows = []
    path = getattr(args, "data_path", "")
    tok_path = None
    if not path:
        row, path, tok_path = _default_corpus_row(cfg.model.vocab_size)
        rows.append(row)
    rows.append(_prepare_row(args, tok_path or os.path.join(path, "tokenizer.model")))
    shardings = [None]
    if cfg.train.batch_size % jax.device_count() == 0:
        mesh = jax.make_mesh((jax.device_count(),), ("data",))
        shardings.append(NamedSharding(mesh, P("data", None)))
    n = getattr(args, "data_batches", 300)
    for in_memory in (True, False):
        for sharding in shardings:
            rows.append(_loader_row(path, cfg, n, in_memory, sharding))
    if getattr(args, "data_curate_mb", 4.0) > 0:
        rows += _curation_rows(args.data_curate_mb)
    rows.append(_memcpy_limit_row())
    return rows
