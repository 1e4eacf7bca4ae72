"""Data section: default-corpus build, prepare_data tokens/s, Loader batches/s at the config's
batch shape (in-memory vs tensorstore reads, numpy vs a global jax.Array over all devices), and
curation MB/s per recipe on one core next to datatrove reading and writing the same bytes."""

from __future__ import annotations

import glob
import os
import tempfile
import time

from llama_jax.bench.common import load_config, time_fn
from llama_jax.data.curate.dedup import FindOverlaps
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
    parser.add_argument("--data-curate-recipes", default=",".join(RECIPES),
                        help="the recipes timed, comma-separated")  # fmt: skip
    parser.add_argument("--data-books", default="2000,20000",
                        help="book sketch counts FindOverlaps is timed at (the projection's rate)")  # fmt: skip


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


# The paper's disk sizes (LLAMA_FACTS.md, Table 1): what the projection rows are sized to
PAPER_GB = {"commoncrawl": 3300, "c4": 783, "github": 328, "wikipedia": 83, "books": 85,
            "arxiv": 92, "stackexchange": 78}  # fmt: skip
CLUSTER = (64, 32)  # nodes x cores: the cluster the projection is for, one task per core
SERIAL = {"books": "find"}  # stages that are one task whatever --tasks (FindOverlaps)


def _stage_seconds(logs: str, t0: float) -> dict[str, float]:
    """Each stage's wall seconds, from its tasks' completion markers: the last marker of a
    stage minus the last of the stage before (the first from t0; stages run one after another)."""
    ends = {}
    for stage in os.listdir(logs):
        done = os.path.join(logs, stage, "completions")
        if os.path.isdir(done):
            ends[stage] = max(os.path.getmtime(os.path.join(done, f)) for f in os.listdir(done))
    out, prev = {}, t0
    for stage, end in sorted(ends.items(), key=lambda kv: kv[1]):
        out[stage], prev = end - prev, end
    return out


def _curation_rows(mb: float, books: tuple[int, ...] = (2_000, 20_000),
                   recipes: tuple[str, ...] = tuple(RECIPES)) -> list[dict]:  # fmt: skip
    """MB/s of each curation recipe at 1 and 2 tasks (as many worker processes) on stdlib
    sources as JSONL pages in 4 files, each stage's seconds, and of a datatrove read + write of
    the same bytes (the floor every recipe pays); then each recipe's projected hours for the
    paper's size on CLUSTER (see _projection_row). commoncrawl's classifier is trained on two of
    the input files as its reference and random pages (the cost, not the labels, is measured)."""
    import json
    import shutil

    try:
        from datatrove.executor.local import LocalPipelineExecutor
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.writers import JsonlWriter

    except ImportError:
        return [{"what": "curation", "detail": "pip install -e '.[curate]' for these rows"}]
    rows, projections = [], []
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "in"))
        size, files = 0, [open(os.path.join(tmp, "in", f"pages-{k}.jsonl"), "w") for k in range(4)]
        pages = stdlib_files(int(mb * (1 << 20)))
        for i, path in enumerate(pages):
            text = open(path, encoding="utf-8", errors="replace").read()
            size += len(text.encode())
            files[i % 4].write(json.dumps({"text": text, "license": "mit", "answers": []}) + "\n")
        for f in files:
            f.close()
        for name, k in (("reference", 0), ("random", 1)):
            shutil.copy(os.path.join(tmp, "in", f"pages-{k}.jsonl"), os.path.join(tmp, name))
        t0 = time.perf_counter()
        LocalPipelineExecutor([JsonlReader(os.path.join(tmp, "in")), JsonlWriter(os.path.join(tmp, "raw"))],
                              tasks=1, workers=1, logging_dir=os.path.join(tmp, "raw_logs")).run()  # fmt: skip
        raw = time.perf_counter() - t0
        rows.append({"what": "curation", "detail": "raw: datatrove read + write",
                     "MB/s": size / 1e6 / raw})  # fmt: skip
        for recipe in recipes:
            extra = {}
            if recipe == "commoncrawl":
                extra = {n: os.path.join(tmp, n) for n in ("reference", "random")}
            timed = {}
            for tasks in (1, 2):
                out = os.path.join(tmp, f"{recipe}-{tasks}")
                t0, wall0 = time.perf_counter(), time.time()
                curate(recipe, os.path.join(tmp, "in"), out, tasks, tasks=tasks, **extra)
                dt = time.perf_counter() - t0
                timed[tasks] = (dt, _stage_seconds(os.path.join(out, "logs"), wall0))
                rows.append({"what": "curation", "detail": f"{recipe}, {tasks} tasks",
                             "MB/s": size / 1e6 / dt, "vs_raw": raw / dt,
                             "scaling": timed[1][0] / dt,
                             "stages_s": " ".join(f"{k} {v:.2f}" for k, v in timed[tasks][1].items())})  # fmt: skip
            projections.append((recipe, timed))
    books = _book_overlap_rows(books)
    per_book = books[-1]["seconds"] / books[-1]["books"]
    return (
        rows + books + [_projection_row(r, size, t, per_book, len(pages)) for r, t in projections]
    )


BOOKS = 270_000  # Books3's 196,640 books and Project Gutenberg's ~70,000, as FindOverlaps' N


def _book_overlap_rows(counts: tuple[int, ...]) -> list[dict]:
    """FindOverlaps (the books recipe's one-task stage) on N synthetic sketches, as BookSketches
    writes them: 128 random MinHash values and a 1,500-hash sample per book, 1% of the books
    planted copies of an earlier one (so the overlap check runs). Seconds per 1,000 books at two
    N shows whether the stage stays linear; the projection uses the larger N's rate."""
    import numpy as np

    rows = []
    for n in counts:
        rng = np.random.default_rng(n)
        minhash = rng.integers(0, 1 << 32, (n, 128), dtype=np.uint64)
        sample = rng.integers(0, 1 << 62, (n, 1500), dtype=np.uint64) * np.uint64(2)
        copies = rng.choice(np.arange(1, n), n // 100, replace=False)
        of = rng.integers(0, copies)  # each copy repeats an earlier book
        minhash[copies], sample[copies] = minhash[of], sample[of]
        with tempfile.TemporaryDirectory() as work:
            os.makedirs(os.path.join(work, "books"))
            np.savez(os.path.join(work, "books", "00000.npz"), order=np.arange(n, dtype=np.uint64),
                     size=np.full(n, 60_000), m=np.full(n, 2), minhash=minhash,
                     lengths=np.full(n, 1500), sample=sample.reshape(-1))  # fmt: skip
            step = FindOverlaps(work)
            t0 = time.perf_counter()
            step.run(iter(()))
            dt = time.perf_counter() - t0
            removed = sum(len(np.load(p)) for p in glob.glob(os.path.join(work, "books/removed/*")))
        rows.append({"what": "curation", "detail": f"books FindOverlaps, {n} sketches",
                     "books": n, "seconds": dt, "s_per_1k_books": dt / n * 1000,
                     "removed": removed, "planted": len(copies)})  # fmt: skip
    return rows


def _projection_row(recipe: str, size: int, timed: dict, per_book_s: float, docs: int) -> dict:
    """Hours for the paper's PAPER_GB[recipe] on CLUSTER, from this machine's runs at 1 and 2
    tasks. The parallel stages: their 1-task seconds per byte, spread over every core at the
    efficiency measured at 2 tasks (scaling / 2, capped at 1), assumed to hold at 2048 tasks
    (the tasks share nothing but the file system). A SERIAL stage runs on one core: for books,
    FindOverlaps' seconds per book times BOOKS, the larger of its rate on random sketches
    (_book_overlap_rows) and on this run's pages (docs of them; source files share much
    boilerplate, so many are candidates of each other: the pessimistic rate). Worker start-up,
    the same at any size, is counted at this size's share (an overestimate)."""
    (one, stages1), (two, _) = timed[1], timed[2]
    serial = stages1.get(SERIAL.get(recipe, ""), 0.0)
    cores = CLUSTER[0] * CLUSTER[1]
    efficiency = min(1.0, one / two / 2)
    scale = PAPER_GB[recipe] * 1e9 / size
    serial_hours = BOOKS * max(per_book_s, serial / docs) / 3600 if serial else 0.0
    hours = scale * (one - serial) / (cores * efficiency) / 3600 + serial_hours
    return {"what": "curation projection",
            "detail": f"{recipe}: {PAPER_GB[recipe]} GB on {CLUSTER[0]}x{CLUSTER[1]} cores",
            "efficiency": efficiency, "serial_s": serial, "serial_hours": serial_hours,
            "hours": hours}  # fmt: skip


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
        books = tuple(int(n) for n in str(getattr(args, "data_books", "2000,20000")).split(","))
        recipes = tuple(getattr(args, "data_curate_recipes", ",".join(RECIPES)).split(","))
        rows += _curation_rows(args.data_curate_mb, books, recipes)
    rows.append(_memcpy_limit_row())
    return rows
