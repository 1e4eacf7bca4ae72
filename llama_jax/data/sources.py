"""Reading raw corpus files: which files an input names, and the documents each file holds.

Inputs (files, directories or globs):
  .jsonl, .jsonl.gz  one JSON object per line; the document is its `text_field` (default "text")
  .parquet           one document per row of the `text_field` column
  anything else      plain UTF-8 text, ONE DOCUMENT PER FILE (.txt, .md, .py, ...); compressed or
                     container formats other than the above (.gz, .zip, .json, ...) are refused.
Invalid UTF-8 is replaced by U+FFFD, and every document comes with the number of bytes replaced.

A large file can be read in pieces (byte ranges of an uncompressed .jsonl, row groups of a
.parquet; see `pieces`), so that several processes share it.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator, Sequence
from glob import glob, has_magic

REFUSED_EXTENSIONS = (".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".json", ".npy", ".arrow")


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


def _matches(pattern: str) -> list[str]:
    if os.path.isdir(pattern):
        return sorted(
            os.path.join(root, f)
            for root, dirs, names in os.walk(pattern)
            for f in names
            if not f.startswith(".")
        )
    if has_magic(pattern):
        return sorted(p for p in glob(pattern, recursive=True) if os.path.isfile(p))
    return [pattern] if os.path.isfile(pattern) else []


def expand_inputs(inputs: str | Sequence[str]) -> list[str]:
    """Files named by `inputs` (paths, globs incl. **, or directories searched recursively), in
    the given order with each pattern's matches sorted; raises if any pattern matches nothing."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no input given: pass files, directories or globs")
    files: list[str] = []
    for pattern in inputs:
        matches = _matches(pattern)
        if not matches:
            raise FileNotFoundError(f"no input files match {pattern!r}")
        for m in matches:
            _kind(m)
        files.extend(matches)
    return list(dict.fromkeys(files))


def decode_utf8(data: bytes) -> tuple[str, int]:
    """UTF-8 text with invalid bytes replaced by U+FFFD, and the number of bytes replaced.

    Each invalid sequence the decoder reports becomes one U+FFFD (errors="replace"), so the
    count of U+FFFD is not the count of bytes; decoding again with surrogateescape maps each
    invalid byte to its own lone surrogate, which encoding with errors="ignore" drops.
    """
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        escaped = data.decode("utf-8", "surrogateescape")
        bad = len(data) - len(escaped.encode("utf-8", "ignore"))
        return data.decode("utf-8", "replace"), bad


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
    """Yields (document text, replaced bytes) of a file, or of one piece of it (see `pieces`)."""
    kind = _kind(path)
    if kind == "jsonl":
        yield from _jsonl_documents(path, text_field, piece or (0, -1, 1))
    elif kind == "parquet":
        yield from _parquet_documents(path, text_field, piece)
    else:
        with open(path, "rb") as f:
            yield decode_utf8(f.read())


def _jsonl_documents(path: str, field: str, piece: tuple) -> Iterator[tuple[str, int]]:
    start, end, lineno = piece
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        f.seek(start)
        pos = start
        for line in f:
            if 0 <= end <= pos:
                break
            pos += len(line)
            if line.strip():
                yield _parse_jsonl_line(path, lineno, line, field)
            lineno += 1


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


def _parquet_documents(path: str, field: str, piece: tuple | None) -> Iterator[tuple[str, int]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise ValueError(
            f"{path}: no column {field!r} (columns: {pf.schema_arrow.names}); pass --text-field"
        )
    first, last = piece[:2] if piece else (0, pf.num_row_groups)
    for rg in range(first, last):
        for value in pf.read_row_group(rg, columns=[field]).column(0).to_pylist():
            if value is None:
                yield "", 0
            elif isinstance(value, bytes):
                yield decode_utf8(value)
            else:
                yield _clean(str(value))


def pieces(path: str, target_bytes: int) -> list[tuple[tuple | None, int]]:
    """(piece, input bytes) of a file cut into parts of about target_bytes for iter_documents:
    byte ranges of an uncompressed .jsonl, row groups of a larger .parquet, else the whole file
    (piece None)."""
    size = os.path.getsize(path)
    kind = _kind(path)
    if kind == "jsonl":
        return [
            (p, (p[1] if p[1] >= 0 else size) - p[0])
            for p in _jsonl_pieces(path, size, target_bytes)
        ]
    if kind == "parquet" and size > target_bytes:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        return [
            ((rg, rg + 1), meta.row_group(rg).total_byte_size) for rg in range(meta.num_row_groups)
        ]
    return [(None, size)]


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
