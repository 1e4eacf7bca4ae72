"""Corpus preparation: raw documents -> tokenized flat token arrays (tensorstore zarr) + metadata.

Inputs (files, directories or globs):
  .jsonl, .jsonl.gz  one JSON object per line; the document is its `text_field` (default "text")
  .parquet           one document per row of the `text_field` column
  anything else      plain UTF-8 text, ONE DOCUMENT PER FILE (.txt, .md, .py, ...); compressed or
                     container formats other than the above (.gz, .zip, .json, ...) are refused.
Invalid UTF-8 is replaced by U+FFFD and the replaced bytes are counted in the summary.

Output directory:
  train/, val/      zarr v3 arrays of shape [tokens], uint16 when the vocab fits else uint32: every
                    document's tokens followed by EOS, concatenated in input order
  tokenizer.model   a copy of the tokenizer the tokens were made with
  metadata.json     token/document counts per split, tokenizer sha256, vocab size, dtype, sources

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

import codecs
import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from glob import glob, has_magic

import numpy as np

from llama_jax.data.tokenizer import Tokenizer

FORMAT = "llama_jax.tokens/2"  # /2: each document is BOS + tokens + EOS, as LLaMA trained
SPLITS = ("train", "val")
REFUSED_EXTENSIONS = (".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".json", ".npy", ".arrow")
SHARD_BYTES = 32 << 20  # input bytes per work unit: small enough to spread over workers
ZARR_SHARD = 1 << 24  # tokens per zarr shard file (32 MiB at uint16)
ZARR_CHUNK = 1 << 13  # tokens per independently readable chunk inside a shard file


# ----------------------------------------------------------------------------- reading inputs


def _kind(path: str) -> str:
    p = path.lower()
    if p.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if p.endswith(".parquet"):
        return "parquet"
    if p.endswith(REFUSED_EXTENSIONS):
        raise ValueError(
            f"{path}: unsupported input format; use .jsonl, .jsonl.gz, .parquet or plain-text files"
        )
    return "text"


def expand_inputs(inputs: str | Sequence[str]) -> list[str]:
    """Files named by `inputs` (paths, globs incl. **, or directories searched recursively), in
    the given order with each pattern's matches sorted; raises if any pattern matches nothing."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no input given: pass files, directories or globs")
    files: list[str] = []
    for pattern in inputs:
        if os.path.isdir(pattern):
            matches = sorted(
                os.path.join(root, f)
                for root, dirs, names in os.walk(pattern)
                for f in names
                if not f.startswith(".")
            )
        elif has_magic(pattern):
            matches = sorted(p for p in glob(pattern, recursive=True) if os.path.isfile(p))
        else:
            matches = [pattern] if os.path.isfile(pattern) else []
        if not matches:
            raise FileNotFoundError(f"no input files match {pattern!r}")
        for m in matches:
            _kind(m)
        files.extend(matches)
    return list(dict.fromkeys(files))


_bad_bytes = [0]


def _count_and_replace(err: UnicodeDecodeError):
    _bad_bytes[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("llama_jax.count_replace", _count_and_replace)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """UTF-8 text with invalid bytes replaced by U+FFFD, and the number of bytes replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        _bad_bytes[0] = 0
        text = data.decode("utf-8", "llama_jax.count_replace")
        return text, _bad_bytes[0]


def _clean(text: str) -> tuple[str, int]:
    """Replaces lone surrogates (JSON "\\ud800" escapes) that UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        bad = sum(1 for c in text if "\ud800" <= c <= "\udfff")
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"), bad


def iter_documents(
    path: str, text_field: str = "text", piece: tuple | None = None
) -> Iterator[tuple[str, int]]:
    """Yields (document text, replaced bytes) of a file, or of one piece of it (see _plan)."""
    kind = _kind(path)
    if kind == "text":
        with open(path, "rb") as f:
            yield decode_utf8(f.read())
    elif kind == "jsonl":
        start, end, lineno = piece or (0, -1, 1)
        opener = gzip.open if path.lower().endswith(".gz") else open
        with opener(path, "rb") as f:
            f.seek(start)
            pos = start
            for line in f:
                if 0 <= end <= pos:
                    break
                pos += len(line)
                if line.strip():
                    yield _parse_jsonl_line(path, lineno, line, text_field)
                lineno += 1
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise ValueError(
                f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); "
                "pass --text-field"
            )
        first, last = piece[:2] if piece else (0, pf.num_row_groups)
        for rg in range(first, last):
            for value in pf.read_row_group(rg, columns=[text_field]).column(0).to_pylist():
                if value is None:
                    yield "", 0
                elif isinstance(value, bytes):
                    yield decode_utf8(value)
                else:
                    yield _clean(str(value))


def _parse_jsonl_line(path: str, lineno: int, line: bytes, field: str) -> tuple[str, int]:
    line, bad = decode_utf8(line)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or field not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}:{lineno}: no {field!r} field (found {keys}); pass --text-field")
    if not isinstance(obj[field], str):
        raise ValueError(
            f"{path}:{lineno}: field {field!r} is {type(obj[field]).__name__}, not a string"
        )
    text, bad2 = _clean(obj[field])
    return text, bad + bad2


# ----------------------------------------------------------------------------- work plan


def _jsonl_pieces(path: str, size: int, target: int) -> list[tuple]:
    """(start byte, end byte, first line number) ranges of ~target bytes, cut after newlines.
    One sequential pass counts lines so that errors can name file:line from any piece."""
    if path.lower().endswith(".gz") or size <= target:
        return [(0, -1, 1)]
    bounds = [(0, 1)]
    want, pos, line = target, 0, 1
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            while want < pos + len(block):
                i = block.find(b"\n", max(0, want - pos))
                if i < 0:
                    break
                bounds.append((pos + i + 1, line + block.count(b"\n", 0, i + 1)))
                want = pos + i + 1 + target
            line += block.count(b"\n")
            pos += len(block)
    bounds = [b for b in bounds if b[0] < size]
    ends = [b[0] for b in bounds[1:]] + [-1]
    return [(s, e, n) for (s, n), e in zip(bounds, ends)]


def _plan(files: list[str], shard_bytes: int) -> list[list[tuple]]:
    """Groups (path, piece, cost) units into shards of about shard_bytes, keeping input order."""
    units = []
    for path in files:
        size = os.path.getsize(path)
        kind = _kind(path)
        if kind == "jsonl":
            for p in _jsonl_pieces(path, size, shard_bytes):
                cost = (p[1] if p[1] >= 0 else size) - p[0]
                units.append((path, p, cost))
        elif kind == "parquet" and size > shard_bytes:
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            for rg in range(meta.num_row_groups):
                units.append((path, (rg, rg + 1), meta.row_group(rg).total_byte_size))
        else:
            units.append((path, None, size))
    shards, cur, cur_bytes = [], [], 0
    for unit in units:
        cur.append(unit[:2])
        cur_bytes += unit[2]
        if cur_bytes >= shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
    if cur:
        shards.append(cur)
    return shards


# ----------------------------------------------------------------------------- tokenizing workers

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


def _tokenize_shard(job: tuple[int, list]) -> dict:
    """Tokenizes one shard into <work>/shards/NNNNNN.{train,val}.npy; the .json marker is last."""
    index, units = job
    w = _worker
    eos = w["tok"].eos_id
    bos = [w["tok"].bos_id] if w["tok"].bos_id >= 0 else []  # inference prompts start with BOS
    tokens = {s: [] for s in SPLITS}
    summary = {
        "index": index,
        "documents": 0,
        "empty_documents": 0,
        "replaced_bytes": 0,
        "docs_with_replacements": 0,
        "bytes": 0,
    }
    summary.update({s: {"tokens": 0, "documents": 0} for s in SPLITS})
    texts, splits, text_bytes = [], [], 0
    # The train document with the smallest hash: the val split's fallback (see prepare()).
    first = summary["min_train"] = {"hash": 1 << 64, "offset": 0, "length": 0}
    train_tokens = 0

    def flush():
        nonlocal train_tokens
        for ids, (split, h) in zip(w["tok"].encode_batch(texts), splits):
            doc = bos + ids + [eos]
            tokens[split].append(np.asarray(doc, dtype=w["dtype"]))
            if split == "train":
                if h < first["hash"]:
                    first.update(hash=h, offset=train_tokens, length=len(doc))
                train_tokens += len(doc)
        texts.clear()
        splits.clear()

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
            texts.append(text)
            splits.append((split, h))
            summary["documents"] += 1
            summary[split]["documents"] += 1
            summary["bytes"] += len(data)
            text_bytes += len(data)
            if text_bytes > 4 << 20:  # bound the memory held as Python int lists
                flush()
                text_bytes = 0
    flush()
    base = os.path.join(w["work_dir"], "shards", f"{index:06d}")
    for split in SPLITS:
        arr = np.concatenate(tokens[split]) if tokens[split] else np.zeros(0, w["dtype"])
        summary[split]["tokens"] = int(arr.size)
        with open(f"{base}.{split}.npy.tmp", "wb") as f:
            np.save(f, arr)
        os.replace(f"{base}.{split}.npy.tmp", f"{base}.{split}.npy")
    _write_json(f"{base}.json", summary)
    return summary


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- token arrays


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _zarr_spec(path: str, size: int, dtype: str) -> dict:
    raw = [{"name": "bytes", "configuration": {"endian": "little"}}]
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": path},
        "metadata": {
            "shape": [size],
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [ZARR_SHARD]}},
            # Sharded so that a large dataset is few files, yet a window reads only ~16 KiB.
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": [ZARR_CHUNK],
                        "codecs": raw,
                        "index_codecs": raw + [{"name": "crc32c"}],
                    },
                }
            ],
        },
        "create": True,
    }


def _write_split(path: str, shard_files: list, size: int, dtype: str) -> None:
    """Concatenates .npy shards (paths or arrays) into one zarr array, a zarr shard at a time."""
    import tensorstore as ts

    arr = ts.open(_zarr_spec(path, size, dtype)).result()
    buf, held, offset = [], 0, 0
    for f in shard_files + [None]:
        if f is not None:
            a = np.load(f) if isinstance(f, str) else f
            buf.append(a)
            held += a.size
        while held >= ZARR_SHARD or (f is None and held):
            flat = np.concatenate(buf)
            n = min(ZARR_SHARD, flat.size)
            arr[offset : offset + n].write(flat[:n]).result()
            offset += n
            buf, held = [flat[n:]], flat.size - n
    assert offset == size, (offset, size)


def write_token_dataset(
    output_dir: str,
    splits: dict[str, np.ndarray],
    *,
    vocab_size: int,
    tokenizer_sha256: str = "",
    **meta,
) -> dict:
    """Writes already-tokenized splits as a dataset (synthetic data, tests); returns metadata."""
    dtype = token_dtype(vocab_size)
    tmp = tempfile.mkdtemp(
        prefix=f".{os.path.basename(output_dir)}.tmp-",
        dir=os.path.dirname(os.path.abspath(output_dir)),
    )
    for split, tokens in splits.items():
        np.save(os.path.join(tmp, f"{split}.npy"), np.asarray(tokens, dtype=dtype))
        _write_split(
            os.path.join(tmp, split), [os.path.join(tmp, f"{split}.npy")], len(tokens), dtype
        )
        os.remove(os.path.join(tmp, f"{split}.npy"))
    meta = dict(
        format=FORMAT,
        vocab_size=vocab_size,
        dtype=dtype,
        tokenizer_sha256=tokenizer_sha256,
        splits={s: {"tokens": len(t), "documents": 0} for s, t in splits.items()},
        **meta,
    )
    _write_json(os.path.join(tmp, "metadata.json"), meta)
    os.rename(tmp, output_dir)
    return meta


def read_metadata(dataset_dir: str) -> dict:
    """metadata.json of a prepared dataset: a local dir or any tensorstore kvstore URL (gs://...)."""
    if "://" in dataset_dir and not dataset_dir.startswith("file://"):
        import tensorstore as ts

        kv = ts.KvStore.open(dataset_dir.rstrip("/") + "/").result()
        result = kv.read("metadata.json").result()
        if result.state != "value":
            raise FileNotFoundError(f"no prepared dataset at {dataset_dir} (metadata.json missing)")
        return _check_format(dataset_dir, json.loads(bytes(result.value)))
    path = os.path.join(dataset_dir.removeprefix("file://"), "metadata.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no prepared dataset at {dataset_dir} (metadata.json missing); "
            "run python -m launch.prepare_data"
        )
    with open(path) as f:
        return _check_format(dataset_dir, json.load(f))


def _check_format(dataset_dir: str, meta: dict) -> dict:
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{dataset_dir} holds dataset format {meta.get('format')!r}, this version reads "
            f"{FORMAT!r}: re-run python -m launch.prepare_data"
        )
    return meta


def open_split(dataset_dir: str, split: str):
    """The split's token array as an opened tensorstore.TensorStore."""
    import tensorstore as ts

    if "://" in dataset_dir and not dataset_dir.startswith("file://"):
        kvstore = dataset_dir.rstrip("/") + f"/{split}/"
    else:
        kvstore = {
            "driver": "file",
            "path": os.path.join(dataset_dir.removeprefix("file://"), split),
        }
    return ts.open({"driver": "zarr3", "kvstore": kvstore, "open": True}, read=True).result()


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
    dtype = token_dtype(tok.vocab_size)
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

    work = output_dir + ".partial"
    if os.path.exists(os.path.join(work, "job.json")):
        with open(os.path.join(work, "job.json")) as f:
            if json.load(f) != job:  # a different job crashed here: its shards are not ours
                shutil.rmtree(work)
    os.makedirs(os.path.join(work, "shards"), exist_ok=True)
    _write_json(os.path.join(work, "job.json"), job)

    shards = _plan(files, shard_bytes)
    done = {}
    for i in range(len(shards)):
        marker = os.path.join(work, "shards", f"{i:06d}.json")
        if os.path.exists(marker):
            with open(marker) as f:
                done[i] = json.load(f)
    todo = [(i, s) for i, s in enumerate(shards) if i not in done]
    init = (tokenizer_path, text_field, val_fraction, dtype, work)
    workers = max(1, min(num_workers or os.cpu_count() or 1, len(todo)))
    from tqdm import tqdm

    bar = tqdm(
        total=len(shards), initial=len(done), unit="shard", desc="tokenizing", disable=not progress
    )
    if workers == 1:
        _init_worker(*init)
        results = map(_tokenize_shard, todo)
        pool = None
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
    summaries = [done[i] for i in range(len(shards))]
    documents = sum(s["documents"] for s in summaries)
    if documents == 0:
        shutil.rmtree(work)
        raise ValueError(
            f"no documents: all {len(files)} input files are empty (or hold only empty texts)"
        )

    parent = os.path.dirname(output_dir)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    try:
        meta = dict(job)
        meta.update(
            vocab_size=tok.vocab_size,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            dtype=dtype,
            documents=documents,
            empty_documents=sum(s["empty_documents"] for s in summaries),
            replaced_bytes=sum(s["replaced_bytes"] for s in summaries),
            docs_with_replacements=sum(s["docs_with_replacements"] for s in summaries),
            text_bytes=sum(s["bytes"] for s in summaries),
            splits={
                sp: {k: sum(s[sp][k] for s in summaries) for k in ("tokens", "documents")}
                for sp in SPLITS
            },
            tokenizer_source=os.path.abspath(tokenizer_path),
        )
        parts = {
            sp: [os.path.join(work, "shards", f"{i:06d}.{sp}.npy") for i in range(len(shards))]
            for sp in SPLITS
        }
        if val_fraction > 0 and meta["splits"]["val"]["documents"] == 0 and documents > 1:
            # A small corpus where no document hashed below val_fraction: rather than an empty
            # val split, hold out the one train document with the smallest hash (stable too).
            i = min(range(len(shards)), key=lambda k: summaries[k]["min_train"]["hash"])
            cut = summaries[i]["min_train"]
            train = np.load(parts["train"][i])
            lo, hi = cut["offset"], cut["offset"] + cut["length"]
            parts["train"][i], parts["val"] = (
                np.concatenate([train[:lo], train[hi:]]),
                [train[lo:hi]],
            )
            for sp, sign in (("train", -1), ("val", 1)):
                meta["splits"][sp]["tokens"] += sign * cut["length"]
                meta["splits"][sp]["documents"] += sign
            meta["val_fallback"] = (
                "no document hashed into val: held out the one with the smallest hash"
            )
        for split in SPLITS:
            _write_split(
                os.path.join(tmp, split), parts[split], meta["splits"][split]["tokens"], dtype
            )
        shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
        meta["seconds"] = round(time.time() - t0, 3)
        _write_json(os.path.join(tmp, "metadata.json"), meta)
        os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    if verbose:
        print(summary_line(meta, output_dir))
    return meta


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
