"""python -m launch.curate --recipe NAME --input GLOB --output DIR: the paper's per-source
cleaning (section 2.1) on HF datatrove, whose executors run it on one machine (here) or a
cluster (its SLURM executor).

A recipe is a short list of steps (data/curate/steps.py), in one table. Input: JSONL files with a
"text" field (and metadata fields, e.g. GitHub's "license"). Output: DIR/*.jsonl.gz cleaned
documents, the documents each step removed under DIR/removed/<step>/, and DIR/data_card.json
+ data_card.md: per step, documents and bytes in, kept and removed, and removed examples.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable

import numpy as np
from datatrove.io import get_datafolder
from datatrove.pipeline.writers import JsonlWriter

from llama_jax.data.curate import dedup as dd
from llama_jax.data.curate import jobs
from llama_jax.data.curate import models as cm
from llama_jax.data.curate import steps as cs


@dataclasses.dataclass(frozen=True)
class Recipe:
    """before: per-document steps ahead of the dedup; dedup: "line_dedup", "exact_dedup",
    "books" or None; after: per-document steps behind it. Each builder takes (removed dir, the
    curation's options)."""

    before: Callable[[str, Options], list] = lambda r, o: []
    dedup: str | None = None
    after: Callable[[str, Options], list] = lambda r, o: []


@dataclasses.dataclass(frozen=True)
class Options:
    """What a run is given besides its recipe and input (all recorded in DIR/curation.json)."""

    tasks: int = 1  # datatrove tasks of each per-document stage
    shards: int = 0  # hash shards (= tasks of the find stage) of exact and line dedup; 0: tasks
    reference: str | None = None  # commoncrawl: JSONL reference pages
    random: str | None = None  # commoncrawl: JSONL random pages
    bad_words: str | None = None  # c4: a file of bad words and phrases, one a line


RECIPES = {
    "github": Recipe(lambda r, o: [cs.LicenseAllowlist(removed_dir=r), cs.CodeHeuristics(removed_dir=r),
                                   cs.StripLicenseHeader(removed_dir=r)], "exact_dedup"),
    "wikipedia": Recipe(lambda r, o: [cs.StripWikitext(removed_dir=r)]),
    "books": Recipe(dedup="books"),
    "arxiv": Recipe(lambda r, o: [cs.CleanLatex(removed_dir=r)]),
    "c4": Recipe(dedup="line_dedup", after=lambda r, o: [
        cs.LanguageID(removed_dir=r), cs.C4Heuristics(bad_words=o.bad_words or (), removed_dir=r)]),
    "stackexchange": Recipe(lambda r, o: [cs.StackExchangeAnswers(removed_dir=r)]),
    "commoncrawl": Recipe(dedup="line_dedup", after=lambda r, o: _commoncrawl(r, o.reference, o.random)),
}  # fmt: skip


def _commoncrawl(removed: str, reference: str | None, random: str | None) -> list:
    """CCNet's filters behind its line dedup, plus the paper's reference classifier. The n-gram
    model is trained on the reference pages, the classifier on reference against random pages
    (both JSONL files)."""
    if not (reference and random):
        raise ValueError("the commoncrawl recipe needs --reference and --random JSONL pages")
    ref, rnd = _texts(reference), _texts(random)
    # the perplexity cutoff: twice the 90th percentile of held-out reference pages (every 10th)
    held = ref[::10] if len(ref) >= 10 else ref
    lm = cm.NGramLM().fit([t for i, t in enumerate(ref) if i % 10 or len(ref) < 10])
    cutoff = 2 * float(np.quantile([lm.perplexity(t) for t in held], 0.9))
    lm = cm.NGramLM().fit(ref)
    return [cs.LanguageID(removed_dir=removed), cs.PerplexityFilter(lm, cutoff, removed_dir=removed),
            cs.ReferenceFilter(cm.ReferenceClassifier().fit(ref, rnd), removed_dir=removed)]  # fmt: skip


def _texts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


COUNTS = ("docs_in", "docs_kept", "docs_removed", "bytes_in", "bytes_kept", "bytes_removed")


def input_files(inputs: str) -> tuple[str, str, list[str]]:
    """(folder, glob relative to it, the matching files in order) of --input: a JSONL file, a
    directory of them, or a glob."""
    if os.path.isfile(inputs):
        folder, pattern = os.path.dirname(inputs) or ".", glob.escape(os.path.basename(inputs))
    elif os.path.isdir(inputs):
        folder, pattern = inputs, "*.jsonl*"
    else:
        folder = inputs
        while glob.has_magic(folder):
            folder = os.path.dirname(folder)
        folder = folder or "."
        pattern = os.path.relpath(inputs, folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--input {inputs!r}: no such file or directory")
    files = get_datafolder(folder).list_files(recursive=True, glob_pattern=pattern)
    if not files:
        raise FileNotFoundError(f"--input {inputs!r} matches no file")
    return folder, pattern, files


def stages(recipe: str, inputs: tuple, output: str, opts: Options) -> list[jobs.Stage]:
    """The recipe as datatrove stages: one per-document stage, or, with a dedup, signatures
    (and the steps before it) -> find -> filter (and the steps after it); see dedup.py.
    inputs: input_files()'s (folder, glob, files)."""
    r, removed, work = (
        RECIPES[recipe],
        os.path.join(output, "removed"),
        os.path.join(output, "work"),
    )
    folder, pattern, files = inputs
    read = jobs.Reader(folder, glob_pattern=pattern, adapter=dd.Ordered(files))
    write = JsonlWriter(output, adapter=dd.without_order)
    before, after, n = r.before(removed, opts), r.after(removed, opts), opts.tasks
    if r.dedup is None:
        return [jobs.Stage("clean", [read, *before, *after, write], n)]
    if r.dedup == "books":
        sign, find, drop = (dd.BookSketches(work), jobs.Stage("find", [dd.FindOverlaps(work)], 1),
                            dd.DropBooks(work, removed_dir=removed))  # fmt: skip
    else:
        shards = opts.shards or n
        sign = dd.HashSignatures(r.dedup, work, shards)
        find = jobs.Stage("find", [dd.FindDuplicates(r.dedup, work)], shards)
        drop = dd.DropDuplicates(r.dedup, work, removed_dir=removed)
    # the steps before the dedup run once: their output is carried to the filter stage
    carry, reread = (
        ([JsonlWriter(f"{work}/carry")], jobs.RankReader(f"{work}/carry")) if before else ([], read)
    )
    return [jobs.Stage("signatures", [read, *before, sign, *carry], n), find,
            jobs.Stage("filter", [reread, drop, *after, write], n)]  # fmt: skip


def curate(recipe: str, inputs: str, output: str, workers: int = 1, *,
           slurm: jobs.Slurm | None = None, **options) -> dict:  # fmt: skip
    """Runs the recipe over the input files into output; returns the data card. options: the
    fields of Options (tasks, shards, reference, random, bad_words). slurm: run each stage as a
    SLURM job array (datatrove's SLURM executor) and wait for the last. A rerun into the same
    output redoes only the unfinished tasks; one with another recipe, input or options is
    refused."""
    opts = Options(**options)
    if recipe not in RECIPES:  # (before the input: the first error a user can fix)
        raise ValueError(f"unknown recipe {recipe!r}; valid: {sorted(RECIPES)}")
    found = input_files(inputs)
    plan = stages(recipe, found, output, opts)
    jobs.claim(output, {"recipe": recipe, "input": inputs, "files": found[2],
                        **dataclasses.asdict(opts)})  # fmt: skip
    jobs.run(plan, os.path.join(output, "logs"), workers, slurm)
    names = [s.name for st in plan for s in st.pipeline if isinstance(s, cs.Step)]
    return write_card(recipe, inputs, output, names)


def write_card(recipe: str, inputs: str, output: str, names: list[str]) -> dict:
    """data_card.json and data_card.md from datatrove's merged stats and removed documents."""
    stats, unreadable = {}, {}
    for path in sorted(glob.glob(os.path.join(output, "logs", "*", "stats", "*.json"))):
        # each task's stats, of every stage (summed)
        stage = path.split(os.sep)[-3]
        with open(path) as f:
            for step in json.load(f):
                mine = stats.setdefault(step["name"].split(": ", 1)[-1], {})
                for c in COUNTS:
                    mine[c] = mine.get(c, 0) + _total(step["stats"], c)
                n = _total(step["stats"], "unreadable_lines")
                unreadable[stage] = unreadable.get(stage, 0) + n
    # input lines no reader could parse (jobs.Reader; a stage that rereads the input counts
    # them again, so the most any stage counted)
    card = {"recipe": recipe, "input": inputs, "unreadable_lines": max(unreadable.values(), default=0),
            "steps": []}  # fmt: skip
    for name in names:
        row = {"step": name, **{c: _total(stats.get(name, {}), c) for c in COUNTS}}
        row["examples_removed"] = _examples(os.path.join(output, "removed", name))
        card["steps"].append(row)
    with open(os.path.join(output, "data_card.json"), "w") as f:
        json.dump(card, f, indent=1)
    with open(os.path.join(output, "data_card.md"), "w") as f:
        f.write(_markdown(card))
    return card


def _total(stats: dict, counter: str) -> int:
    """A datatrove counter: a plain count, or {"total": ...} for a valued one (bytes)."""
    value = stats.get(counter, 0)
    return int(value["total"] if isinstance(value, dict) else value)


def _examples(folder: str, n: int = 3, chars: int = 200) -> list[str]:
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.jsonl"))):
        with open(path) as f:
            out += [json.loads(line)["text"][:chars] for _, line in zip(range(n - len(out)), f)]
    return out


def _markdown(card: dict) -> str:
    lines = [f"# Data card: {card['recipe']}", "", f"input: `{card['input']}`", "",
             f"input lines that are not JSON (skipped): {card['unreadable_lines']}", "",
             "| step | docs in | kept | removed | MB in | MB kept |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in card["steps"]:
        lines.append(f"| {r['step']} | {r['docs_in']} | {r['docs_kept']} | {r['docs_removed']} | "
                     f"{r['bytes_in'] / 1e6:.3f} | {r['bytes_kept'] / 1e6:.3f} |")  # fmt: skip
    for r in card["steps"]:
        if r["examples_removed"]:
            lines += ["", f"## removed by {r['step']}", ""]
            lines += [f"- `{e[:120]!r}`" for e in r["examples_removed"]]
    return "\n".join(lines) + "\n"
