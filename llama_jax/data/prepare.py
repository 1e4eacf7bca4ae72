"""Corpus preparation: raw documents -> a tokenized dataset (format.py: zarr token arrays where
every document is BOS + tokens + EOS, plus metadata.json).

Inputs are read by sources.py (.jsonl, .jsonl.gz, .parquet, or plain text one document per
file); invalid UTF-8 is replaced by U+FFFD and the replaced bytes are counted in the summary.

A document goes to "val" when the hash of its text falls below val_fraction, so the split is
stable under re-runs, reordering of inputs and worker counts, and duplicate documents never
straddle the split. (Should no document fall below val_fraction, as in a corpus of a few
documents, the one with the smallest hash is held out, so val is never silently empty.)

Work is cut into shards (groups of files, byte ranges of large .jsonl, row groups of large
.parquet) tokenized by worker processes; each finished shard is saved in <output>.partial/
with a completion marker, so a re-run after a crash only does the missing shards. The arrays
are assembled in a temp dir that is renamed to <output> as the last step.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from llama_jax.data.format import (
    FORMAT,
    SPLITS,
    read_metadata,
    token_dtype,
    write_json,
    write_split,
)
from llama_jax.data.sources import expand_inputs, iter_documents, pieces
from llama_jax.data.tokenizer import Tokenizer

SHARD_BYTES = 32 << 20  # input bytes per work unit: small enough to spread over workers
ENCODE_BATCH_BYTES = 4 << 20  # text encoded per call: bounds the memory held as Python int lists


# ----------------------------------------------------------------------------- driver


def prepare(
    inputs: str | Sequence[str],
    tokenizer_path: str,
    output_dir: str,
    val_fraction: float = 0.005,
    text_field: str = "text",
    num_workers: int | None = None,
    *,
    shard_bytes: int = SHARD_BYTES,
    progress: bool = True,
    verbose: bool = True,
) -> dict:
    """Tokenizes `inputs` into a dataset at output_dir (see the module docstring); returns its
    metadata. If output_dir already holds this exact job's result, returns that metadata."""
    t0 = time.time()
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    files = expand_inputs(inputs)
    sizes = [os.path.getsize(f) for f in files]
    if not any(sizes):
        raise ValueError(f"all {len(files)} input files are empty")
    tok = Tokenizer(tokenizer_path)
    job = {
        "format": FORMAT,
        "sources": [{"path": os.path.abspath(f), "bytes": s} for f, s in zip(files, sizes)],
        "tokenizer_sha256": tok.sha256,
        "val_fraction": val_fraction,
        "text_field": text_field,
        "shard_bytes": shard_bytes,
    }
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir):
        return _existing_result(output_dir, job)

    work = _work_dir(output_dir + ".partial", job)
    shards = _plan(files, shard_bytes)
    init = (tokenizer_path, text_field, val_fraction, token_dtype(tok.vocab_size), work)
    summaries = _tokenize_all(shards, init, num_workers, progress)
    if not any(s["documents"] for s in summaries):
        shutil.rmtree(work)
        raise ValueError(
            f"no documents: all {len(files)} input files are empty (or hold only empty texts)"
        )
    meta = _metadata(job, tok, tokenizer_path, summaries)
    parts = {
        sp: [os.path.join(work, "shards", f"{i:06d}.{sp}.npy") for i in range(len(shards))]
        for sp in SPLITS
    }
    if val_fraction > 0 and meta["splits"]["val"]["documents"] == 0 and meta["documents"] > 1:
        _hold_out_one(meta, summaries, parts)
    _assemble(output_dir, meta, parts, tokenizer_path, t0)
    shutil.rmtree(work, ignore_errors=True)
    if verbose:
        print(summary_line(meta, output_dir))
    return meta


def _existing_result(output_dir: str, job: dict) -> dict:
    """The metadata of output_dir if it holds this job's result; raises otherwise."""
    meta = (
        read_metadata(output_dir)
        if os.path.exists(os.path.join(output_dir, "metadata.json"))
        else {}
    )
    if all(meta.get(k) == v for k, v in job.items()):
        return meta
    raise FileExistsError(
        f"{output_dir} already exists and holds a different dataset; remove it first"
    )


def _work_dir(work: str, job: dict) -> str:
    """Creates (or reuses, when it holds the same job) the directory of finished shards."""
    if os.path.exists(os.path.join(work, "job.json")):
        with open(os.path.join(work, "job.json")) as f:
            if json.load(f) != job:  # a different job crashed here: its shards are not ours
                shutil.rmtree(work)
    os.makedirs(os.path.join(work, "shards"), exist_ok=True)
    write_json(os.path.join(work, "job.json"), job)
    return work


def _plan(files: list[str], shard_bytes: int) -> list[list[tuple]]:
    """Groups the files' (path, piece) units into shards of about shard_bytes, in input order."""
    shards, cur, cur_bytes = [], [], 0
    for path in files:
        for piece, cost in pieces(path, shard_bytes):
            cur.append((path, piece))
            cur_bytes += cost
            if cur_bytes >= shard_bytes:
                shards.append(cur)
                cur, cur_bytes = [], 0
    if cur:
        shards.append(cur)
    return shards


def _tokenize_all(shards: list, init: tuple, num_workers: int | None, progress: bool) -> list:
    """Summaries of all shards in order: finished ones read from their markers in the work dir
    (init[-1]), the others tokenized now, in worker processes when there are several."""
    markers = [os.path.join(init[-1], "shards", f"{i:06d}.json") for i in range(len(shards))]
    done = {}
    for i, marker in enumerate(markers):
        if os.path.exists(marker):
            with open(marker) as f:
                done[i] = json.load(f)
    todo = [(i, s) for i, s in enumerate(shards) if i not in done]
    workers = max(1, min(num_workers or os.cpu_count() or 1, len(todo)))
    from tqdm import tqdm

    bar = tqdm(
        total=len(shards), initial=len(done), unit="shard", desc="tokenizing", disable=not progress
    )
    pool = None
    if workers == 1:
        _init_worker(*init)
        results = map(_tokenize_shard, todo)
    else:
        # spawn, not fork: the parent may hold JAX/XLA threads that a forked child would inherit.
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, init)
        results = pool.imap_unordered(_tokenize_shard, todo)
    try:
        for summary in results:
            done[summary["index"]] = summary
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return [done[i] for i in range(len(shards))]


def _metadata(job: dict, tok: Tokenizer, tokenizer_path: str, summaries: list[dict]) -> dict:
    def total(key):
        return sum(s[key] for s in summaries)

    return dict(
        job,
        vocab_size=tok.vocab_size,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        dtype=token_dtype(tok.vocab_size),
        documents=total("documents"),
        empty_documents=total("empty_documents"),
        replaced_bytes=total("replaced_bytes"),
        docs_with_replacements=total("docs_with_replacements"),
        text_bytes=total("bytes"),
        splits={
            sp: {k: sum(s[sp][k] for s in summaries) for k in ("tokens", "documents")}
            for sp in SPLITS
        },
        tokenizer_source=os.path.abspath(tokenizer_path),
    )


def _hold_out_one(meta: dict, summaries: list[dict], parts: dict[str, list]) -> None:
    """A small corpus where no document hashed below val_fraction: rather than an empty val
    split, moves the one train document with the smallest hash (stable too) to val."""
    i = min(range(len(summaries)), key=lambda k: summaries[k]["min_train"]["hash"])
    cut = summaries[i]["min_train"]
    train = np.load(parts["train"][i])
    lo, hi = cut["offset"], cut["offset"] + cut["length"]
    parts["train"][i] = np.concatenate([train[:lo], train[hi:]])
    parts["val"] = [train[lo:hi]]
    for sp, sign in (("train", -1), ("val", 1)):
        meta["splits"][sp]["tokens"] += sign * cut["length"]
        meta["splits"][sp]["documents"] += sign
    meta["val_fallback"] = "no document hashed into val: held out the one with the smallest hash"


def _assemble(output_dir: str, meta: dict, parts: dict, tokenizer_path: str, t0: float) -> None:
    """Writes the dataset in a temp dir renamed to output_dir: it appears complete or not at all."""
    parent = os.path.dirname(output_dir)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    try:
        for split in SPLITS:
            write_split(
                os.path.join(tmp, split),
                parts[split],
                meta["splits"][split]["tokens"],
                meta["dtype"],
            )
        shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
        meta["seconds"] = round(time.time() - t0, 3)
        write_json(os.path.join(tmp, "metadata.json"), meta)
        os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def summary_line(meta: dict, output_dir: str = "") -> str:
    s = meta["splits"]
    line = (
        f"prepared {meta['documents']} documents ({meta['empty_documents']} empty skipped): "
        f"train {s['train']['tokens']:,} tokens / {s['train']['documents']} docs, "
        f"val {s['val']['tokens']:,} tokens / {s['val']['documents']} docs, {meta['dtype']}; "
        f"replaced {meta['replaced_bytes']} undecodable bytes "
        f"in {meta['docs_with_replacements']} documents"
    )
    if meta.get("val_fallback"):
        line += f"; note: {meta['val_fallback']}"
    elif s["val"]["tokens"] == 0 and meta["val_fraction"] > 0:
        line += "; WARNING: the val split is empty (a single document)"
    return line + (f" -> {output_dir}" if output_dir else "")


# ----------------------------------------------------------------------------- tokenizing workers

# Per-process state of the tokenizing workers, so that each loads the tokenizer once rather than
# once per shard. Set only by _init_worker: the Pool initializer in each worker process, or
# called directly when prepare() tokenizes in its own process.
_worker: dict = {}


def _init_worker(
    tokenizer_path: str, text_field: str, val_fraction: float, dtype: str, work_dir: str
):
    _worker.update(
        tok=Tokenizer(tokenizer_path),
        text_field=text_field,
        threshold=int(val_fraction * 2.0**64),
        dtype=np.dtype(dtype),
        work_dir=work_dir,
    )


class _ShardTokens:
    """One shard's documents as BOS + tokens + EOS arrays per split, encoded in batches."""

    def __init__(self, tok: Tokenizer, dtype: np.dtype):
        self.tok, self.dtype = tok, dtype
        self.bos = [tok.bos_id] if tok.bos_id >= 0 else []  # inference prompts start with BOS
        self.tokens: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self.pending: list[tuple[str, str, int]] = []  # (text, split, hash), not yet encoded
        self.pending_bytes = 0
        self.train_tokens = 0
        # The train document with the smallest hash: the val split's fallback (_hold_out_one).
        self.min_train = {"hash": 1 << 64, "offset": 0, "length": 0}

    def add(self, text: str, nbytes: int, split: str, h: int) -> None:
        self.pending.append((text, split, h))
        self.pending_bytes += nbytes
        if self.pending_bytes > ENCODE_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        ids = self.tok.encode_batch([text for text, _, _ in self.pending])
        for doc_ids, (_, split, h) in zip(ids, self.pending):
            doc = self.bos + doc_ids + [self.tok.eos_id]
            self.tokens[split].append(np.asarray(doc, dtype=self.dtype))
            if split == "train":
                if h < self.min_train["hash"]:
                    self.min_train.update(hash=h, offset=self.train_tokens, length=len(doc))
                self.train_tokens += len(doc)
        self.pending, self.pending_bytes = [], 0

    def array(self, split: str) -> np.ndarray:
        parts = self.tokens[split]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)


def _tokenize_shard(job: tuple[int, list]) -> dict:
    """Tokenizes one shard into <work>/shards/NNNNNN.{train,val}.npy; the .json marker is last."""
    index, units = job
    w = _worker
    summary = {
        "index": index,
        "documents": 0,
        "empty_documents": 0,
        "replaced_bytes": 0,
        "docs_with_replacements": 0,
        "bytes": 0,
        **{s: {"tokens": 0, "documents": 0} for s in SPLITS},
    }
    shard = _ShardTokens(w["tok"], w["dtype"])
    for path, piece in units:
        for text, bad in iter_documents(path, w["text_field"], piece):
            summary["replaced_bytes"] += bad
            summary["docs_with_replacements"] += bad > 0
            if not text:
                summary["empty_documents"] += 1
                continue
            data = text.encode("utf-8")
            h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
            split = "val" if h < w["threshold"] else "train"
            shard.add(text, len(data), split, h)
            summary["documents"] += 1
            summary[split]["documents"] += 1
            summary["bytes"] += len(data)
    shard.flush()
    summary["min_train"] = shard.min_train
    base = os.path.join(w["work_dir"], "shards", f"{index:06d}")
    for split in SPLITS:
        arr = shard.array(split)
        summary[split]["tokens"] = int(arr.size)
        with open(f"{base}.{split}.npy.tmp", "wb") as f:
            np.save(f, arr)
        os.replace(f"{base}.{split}.npy.tmp", f"{base}.{split}.npy")
    write_json(f"{base}.json", summary)
    return summary
