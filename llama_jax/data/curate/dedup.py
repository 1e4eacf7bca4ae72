"""Deduplication as parallel stages, so a recipe runs as many tasks whatever its dedup.

Every document carries its place in the whole input (ORDER: the input file's index and the
line in it, set by the reader), so "the first copy is kept" means the same thing whatever the
number of tasks, and N tasks keep exactly what one does.

Exact and line dedup (hash -> shard -> find -> filter, the shape of datatrove's own dedup):
  1. HashSignatures (N tasks): per document, a 64-bit hash of each unit (a normalized line, or
     the whole text) with the document's order, written to the shard hash % S.
  2. FindDuplicates (S tasks): each shard sorts its records by (hash, order, unit); every
     record after the first of its hash is a duplicate, sent back to the task that read it.
     Each line costs one sort slot, whatever the input size; memory is the shard's records
     (20 bytes each), so S sets it, and the result is exact for any S.
  3. DropDuplicates (N tasks): removes the units its task was sent; a document left empty goes.
A 64-bit hash collides at about n^2 / 2^65 pairs: ~24 falsely removed lines in 3e10 (CCNet also
hashes lines to 64 bits).

Books (the paper: remove books with more than 90% content overlap, a book contained in a larger
one included): BookSketches (N tasks) writes each book's MinHash and a consistent sample of its
shingle hashes; FindOverlaps (1 task: books number in the hundreds of thousands) finds
candidates by containment (datasketch's LSH Ensemble), measures the overlap on the samples,
and removes, in input order, each book that overlaps one kept before it; DropBooks (N tasks).
"""

from __future__ import annotations

import glob
import hashlib
import os

import numpy as np
from datatrove.pipeline.base import PipelineStep

from llama_jax.data.curate.steps import Step, normalize_line, valid_utf8

ORDER = "curate_order"  # metadata: file index << 32 | line in the file
RECORD = np.dtype([("hash", "<u8"), ("order", "<u8"), ("unit", "<u4")])
DUPLICATE = np.dtype([("order", "<u8"), ("unit", "<u4")])


class Ordered:
    """A datatrove reader adapter that adds ORDER to each document's metadata."""

    def __init__(self, files: list[str]):
        self.index = {f: i for i, f in enumerate(files)}

    def __call__(self, reader, data: dict, path: str, id_in_file: int) -> dict:
        doc = reader._default_adapter(data, path, id_in_file)
        doc["text"] = valid_utf8(doc["text"])  # the hash stages encode it first
        doc["metadata"][ORDER] = self.index[path] << 32 | int(id_in_file)
        return doc


def without_order(writer, document) -> dict:
    """A datatrove writer adapter: the document as written by default, less ORDER."""
    data = writer._default_adapter(document)
    data.get("metadata", {}).pop(ORDER, None)
    return data


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class Lines:
    """CCNet's unit: each line, normalized; a line whose form appeared earlier is removed."""

    name = "line_dedup"

    @staticmethod
    def hashes(text: str):
        for i, line in enumerate(text.split("\n")):
            if norm := normalize_line(line):
                yield i, _h64(norm)

    @staticmethod
    def drop(text: str, units: set[int]) -> str | None:
        lines = text.split("\n")
        return "\n".join(x for i, x in enumerate(lines) if i not in units).strip() or None


class Whole:
    """Exact dedup's unit: the whole text."""

    name = "exact_dedup"

    @staticmethod
    def hashes(text: str):
        yield 0, _h64(text)

    @staticmethod
    def drop(text: str, units: set[int]) -> str | None:
        return None if units else text


UNITS = {"line_dedup": Lines, "exact_dedup": Whole}


class HashSignatures(PipelineStep):
    """Stage 1: writes (hash, order, unit) records to work/sigs/<shard>/<rank>.bin; documents
    pass through unchanged."""

    type = "llama_jax"

    def __init__(self, unit: str, work: str, shards: int):
        self.name = f"{unit}_signatures"  # (before __init__, which names the stats)
        super().__init__()
        self.unit, self.work, self.shards = unit, work, shards

    def run(self, data, rank: int = 0, world_size: int = 1):
        hashes = UNITS[self.unit].hashes
        outs = []
        for s in range(self.shards):  # "wb": a rerun of this task starts its files afresh
            os.makedirs(f"{self.work}/sigs/{s:05d}", exist_ok=True)
            outs.append(open(f"{self.work}/sigs/{s:05d}/{rank:05d}.bin", "wb"))
        rows: list[tuple] = []

        def flush():
            if rows:
                rec = np.array(rows, RECORD)
                shard = rec["hash"] % np.uint64(self.shards)
                for s in np.unique(shard):
                    rec[shard == s].tofile(outs[int(s)])
                rows.clear()

        try:
            for doc in data:
                order = doc.metadata[ORDER]
                rows += [(h, order, i) for i, h in hashes(doc.text)]
                if len(rows) >= 1 << 18:
                    flush()
                yield doc
            flush()
        finally:
            for f in outs:
                f.close()


class FindDuplicates(PipelineStep):
    """Stage 2, one task per shard: every record after the first of its hash, sent to
    work/dups/<origin rank>/<shard>.bin sorted by (order, unit)."""

    type = "llama_jax"

    def __init__(self, unit: str, work: str):
        self.name = f"{unit}_find"
        super().__init__()
        self.work = work

    def run(self, data, rank: int = 0, world_size: int = 1):
        paths = sorted(glob.glob(f"{self.work}/sigs/{rank:05d}/*.bin"))
        parts = [np.fromfile(p, RECORD) for p in paths]
        origin = np.concatenate(
            [np.full(len(r), int(os.path.basename(p)[:5]), np.int64) for p, r in zip(paths, parts)]
            or [np.zeros(0, np.int64)]
        )
        rec = np.concatenate(parts or [np.zeros(0, RECORD)])
        idx = np.lexsort((rec["unit"], rec["order"], rec["hash"]))
        rec, origin = rec[idx], origin[idx]
        dup = np.zeros(len(rec), bool)
        dup[1:] = rec["hash"][1:] == rec["hash"][:-1]
        self.stat_update("units", value=len(rec))
        self.stat_update("duplicates", value=int(dup.sum()))
        for r in np.unique(origin[dup]):
            mine = rec[dup & (origin == r)]
            out = np.zeros(len(mine), DUPLICATE)
            out["order"], out["unit"] = mine["order"], mine["unit"]
            out.sort(order=["order", "unit"])
            os.makedirs(f"{self.work}/dups/{int(r):05d}", exist_ok=True)
            out.tofile(f"{self.work}/dups/{int(r):05d}/{rank:05d}.bin")
        return iter(())


class DropDuplicates(Step):
    """Stage 3: the units stage 2 found, removed from this task's documents (which come in
    increasing order, as stage 1 read them)."""

    def __init__(self, unit: str, work: str, **kw):
        self.name = unit
        super().__init__(**kw)
        self.unit, self.work = unit, work

    def run(self, data, rank: int = 0, world_size: int = 1):
        parts = [np.fromfile(p, DUPLICATE)
                 for p in sorted(glob.glob(f"{self.work}/dups/{rank:05d}/*.bin"))]  # fmt: skip
        self.dups = np.concatenate(parts or [np.zeros(0, DUPLICATE)])
        self.dups.sort(order=["order", "unit"])
        self.at, self.last = 0, -1
        yield from super().run(data, rank, world_size)

    def apply(self, doc):
        order = doc.metadata[ORDER]
        if order <= self.last:
            raise RuntimeError(f"{self.name}: documents out of input order at {doc.id}")
        self.last, units = order, set()
        while self.at < len(self.dups) and self.dups["order"][self.at] <= order:
            if self.dups["order"][self.at] == order:
                units.add(int(self.dups["unit"][self.at]))
            self.at += 1
        return UNITS[self.unit].drop(doc.text, units) if units else doc.text


# --------------------------------------------------------------------------------------- Books

SAMPLE = 1024  # shingle hashes a book's sample keeps, at least (when it has that many)


def shingles(text: str, n: int = 5) -> list[str]:
    """Word n-grams (the whole text if it has fewer than n words)."""
    words = text.split()
    return list({" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))})


def sample(hashes: np.ndarray) -> tuple[int, np.ndarray]:
    """(m, the sorted hashes divisible by m): m a power of two, so two books' samples restricted
    to the larger m are the same function of their shingle sets and estimate their overlap."""
    m = 1 << max(0, int(np.log2(max(1, len(hashes)) / SAMPLE)))
    return m, np.unique(hashes[hashes % np.uint64(m) == 0])


def overlap(a: tuple[int, np.ndarray], b: tuple[int, np.ndarray]) -> float:
    """|A & B| / min(|A|, |B|) estimated on the samples (exact below SAMPLE shingles)."""
    m = np.uint64(max(a[0], b[0]))
    x, y = a[1][a[1] % m == 0], b[1][b[1] % m == 0]
    if not len(x) or not len(y):
        return 0.0
    return len(np.intersect1d(x, y, assume_unique=True)) / min(len(x), len(y))


class BookSketches(PipelineStep):
    """Stage 1: each book's order, shingle count, MinHash and sample, to work/books/<rank>.npz."""

    type = "llama_jax"
    name = "book_sketches"

    def __init__(self, work: str, num_perm: int = 128):
        super().__init__()
        self.work, self.num_perm = work, num_perm

    def run(self, data, rank: int = 0, world_size: int = 1):
        from datasketch import MinHash

        orders, sizes, minhashes, ms, samples = [], [], [], [], []
        for doc in data:
            grams = shingles(doc.text)
            m = MinHash(num_perm=self.num_perm)
            m.update_batch([g.encode() for g in grams])
            step, kept = sample(np.array([_h64(g) for g in grams], np.uint64))
            orders.append(doc.metadata[ORDER])
            sizes.append(len(grams))
            minhashes.append(m.hashvalues)
            ms.append(step)
            samples.append(kept)
            yield doc
        os.makedirs(f"{self.work}/books", exist_ok=True)
        np.savez(f"{self.work}/books/{rank:05d}.npz", order=np.array(orders, np.uint64),
                 size=np.array(sizes, np.int64), m=np.array(ms, np.int64),
                 minhash=np.array(minhashes, np.uint64).reshape(-1, self.num_perm),
                 lengths=np.array([len(s) for s in samples], np.int64),
                 sample=np.concatenate(samples or [np.zeros(0, np.uint64)]))  # fmt: skip


class FindOverlaps(PipelineStep):
    """Stage 2 (one task): books overlapping an earlier kept one by more than `overlap`, sent
    to work/books/removed/<origin rank>.npy."""

    type = "llama_jax"
    name = "book_overlaps"

    def __init__(self, work: str, overlap: float = 0.9, candidates: float = 0.8,
                 num_perm: int = 128):  # fmt: skip
        super().__init__()
        self.work, self.overlap, self.candidates = work, overlap, candidates
        self.num_perm = num_perm

    def run(self, data, rank: int = 0, world_size: int = 1):
        from datasketch import LeanMinHash, MinHash, MinHashLSHEnsemble

        books = []  # (order, size, minhash, (m, sample), origin rank)
        for path in sorted(glob.glob(f"{self.work}/books/*.npz")):
            z, origin = np.load(path), int(os.path.basename(path)[:5])
            cuts = np.cumsum(z["lengths"])[:-1]
            for o, s, h, m, smp in zip(z["order"], z["size"], z["minhash"], z["m"],
                                       np.split(z["sample"], cuts)):  # fmt: skip
                books.append((int(o), int(s), h, (int(m), smp), origin))
        books.sort(key=lambda b: b[0])
        scheme = MinHash(num_perm=self.num_perm).scheme
        lean = [LeanMinHash(seed=1, hashvalues=b[2], scheme=scheme) for b in books]
        neighbours: dict[int, set[int]] = {i: set() for i in range(len(books))}
        if books:
            # containment of a query in an indexed book: finds each smaller-in-larger pair
            ens = MinHashLSHEnsemble(threshold=self.candidates, num_perm=self.num_perm)
            ens.index([(i, lean[i], b[1]) for i, b in enumerate(books)])
            for i, b in enumerate(books):
                for j in ens.query(lean[i], b[1]):
                    if j != i and overlap(b[3], books[j][3]) > self.overlap:
                        neighbours[i].add(j)
                        neighbours[j].add(i)
        kept: set[int] = set()
        removed: dict[int, list[int]] = {}
        for i, b in enumerate(books):  # in input order: the first of each group stays
            if neighbours[i] & kept:
                removed.setdefault(b[4], []).append(b[0])
            else:
                kept.add(i)
        os.makedirs(f"{self.work}/books/removed", exist_ok=True)
        for path in glob.glob(f"{self.work}/books/removed/*.npy"):
            os.remove(path)
        for origin, orders in removed.items():
            np.save(f"{self.work}/books/removed/{origin:05d}.npy", np.array(orders, np.uint64))
        self.stat_update("books", value=len(books))
        self.stat_update("removed", value=sum(map(len, removed.values())))
        return iter(())


class DropBooks(Step):
    """Stage 3: the books stage 2 found, removed."""

    name = "near_duplicate_books"

    def __init__(self, work: str, **kw):
        super().__init__(**kw)
        self.work = work

    def run(self, data, rank: int = 0, world_size: int = 1):
        path = f"{self.work}/books/removed/{rank:05d}.npy"
        self.removed = set(np.load(path).tolist()) if os.path.exists(path) else set()
        yield from super().run(data, rank, world_size)

    def apply(self, doc):
        return None if doc.metadata[ORDER] in self.removed else doc.text
