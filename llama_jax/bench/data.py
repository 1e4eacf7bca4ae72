"""Data section: default-corpus build, prepare_data tokens/s and Loader batches/s at the config's
batch shape (in-memory vs tensorstore reads, numpy vs a global jax.Array over all devices)."""

from __future__ import annotations

import os
import tempfile
import time


def add_args(parser) -> None:
    parser.add_argument(
        "--data-path", default="", help="dataset to load; '' = the default corpus"
    )
    parser.add_argument(
        "--data-batches", type=int, default=300, help="loader batches timed"
    )
    parser.add_argument(
        "--data-prepare-mb", type=float, default=4.0, help="stdlib MB to prepare"
    )
    parser.add_argument(
        "--data-workers", type=int, default=0, help="prepare workers; 0 = all CPUs"
    )


def run(args) -> list[dict]:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from llama_jax.bench.common import load_config
    from llama_jax.data.default_corpus import (
        default_dataset_dir,
        ensure_default_dataset,
        stdlib_files,
    )
    from llama_jax.data.loader import Loader
    from llama_jax.data.prepare import prepare

    cfg = load_config(args)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    vocab = cfg.model.vocab_size
    rows = []

    path = getattr(args, "data_path", "")
    tok_path = None
    if not path:
        cached = os.path.exists(
            os.path.join(default_dataset_dir(vocab), "metadata.json")
        )
        t0 = time.perf_counter()
        path, tok_path = ensure_default_dataset(vocab, verbose=False)
        build = time.perf_counter() - t0
        from llama_jax.data.prepare import read_metadata

        meta = read_metadata(path)
        rows.append(
            {
                "what": "default corpus",
                "detail": f"{meta['text_bytes'] / 1e6:.1f} MB stdlib, {meta['documents']} docs"
                + (" (cached)" if cached else ""),
                "tokens": meta["splits"]["train"]["tokens"]
                + meta["splits"]["val"]["tokens"],
                "seconds": None if cached else build,
            }
        )
    tok_path = tok_path or os.path.join(path, "tokenizer.model")

    # prepare_data throughput on a slice of the stdlib (includes worker start-up).
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
    rows.append(
        {
            "what": "prepare_data",
            "detail": f"{meta['text_bytes'] / 1e6:.1f} MB, {workers} workers",
            "tokens": tokens,
            "seconds": dt,
            "tokens/s": tokens / dt,
        }
    )

    # Loader: steady-state rate of next() with the prefetch thread.
    n = getattr(args, "data_batches", 300)
    ndev = jax.device_count()
    shardings = [None]
    if B % ndev == 0:
        mesh = jax.make_mesh((ndev,), ("data",))
        shardings.append(NamedSharding(mesh, P("data", None)))
    for in_memory in (True, False):
        for sharding in shardings:
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
            rows.append(
                {
                    "what": "loader",
                    "detail": f"{B}x{T} {'in-memory' if in_memory else 'tensorstore'} -> "
                    + ("numpy" if sharding is None else f"jax.Array/{ndev} devices"),
                    "batches/s": n / dt,
                    "tokens/s": n * B * T / dt,
                }
            )
    # The physical limit: host memory bandwidth, as int32 tokens copied per second.
    from llama_jax.bench.common import time_fn

    src = np.arange(16 << 20, dtype=np.int32)  # 64 MiB
    dst = np.empty_like(src)
    t = time_fn(lambda: np.copyto(dst, src), warmup=1, repeats=5)
    rows.append(
        {
            "what": "limit: memcpy",
            "detail": "host copy of 64 MiB int32 (median of 5)",
            "tokens/s": src.size / t["median"],
        }
    )
    return rows
