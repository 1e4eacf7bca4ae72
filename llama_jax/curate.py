"""python -m launch.curate --recipe NAME --input GLOB --output DIR: the paper's per-source
cleaning (section 2.1) on HF datatrove, whose executors run it on one machine (here) or a
cluster (its SLURM executor).

A recipe is a short list of steps (curate_steps.py), in one table. Input: JSONL files with a
"text" field (and metadata fields, e.g. GitHub's "license"). Output: DIR/*.jsonl.gz cleaned
documents, the documents each step removed under DIR/removed/<step>/, and DIR/data_card.json
+ data_card.md: per step, documents and bytes in, kept and removed, and removed examples.
"""

from __future__ import annotations

import glob
import json
import os

from llama_jax import curate_steps as cs

RECIPES = {
    "github": lambda r: [cs.LicenseAllowlist(removed_dir=r), cs.CodeHeuristics(removed_dir=r),
                         cs.StripLicenseHeader(removed_dir=r), cs.ExactDedup(removed_dir=r)],
    "wikipedia": lambda r: [cs.StripWikitext(removed_dir=r)],
    "books": lambda r: [cs.NearDuplicateBooks(0.9, removed_dir=r)],
    "arxiv": lambda r: [cs.CleanLatex(removed_dir=r)],
    "c4": lambda r: [cs.LineDedup(removed_dir=r), cs.LanguageID(removed_dir=r),
                     cs.C4Heuristics(removed_dir=r)],
    "stackexchange": lambda r: [cs.StackExchangeAnswers(removed_dir=r)],
}  # fmt: skip


def _commoncrawl(removed: str, reference: str | None, random: str | None) -> list:
    """CCNet's steps plus the paper's reference classifier. The n-gram model is trained on the
    reference pages, the classifier on reference against random pages (both JSONL files)."""
    import numpy as np

    from llama_jax import curate_models as cm

    if not (reference and random):
        raise ValueError("the commoncrawl recipe needs --reference and --random JSONL pages")
    ref, rnd = _texts(reference), _texts(random)
    # the perplexity cutoff: twice the 90th percentile of held-out reference pages (every 10th)
    held = ref[::10] if len(ref) >= 10 else ref
    lm = cm.NGramLM().fit([t for i, t in enumerate(ref) if i % 10 or len(ref) < 10])
    cutoff = 2 * float(np.quantile([lm.perplexity(t) for t in held], 0.9))
    lm = cm.NGramLM().fit(ref)
    return [cs.LineDedup(removed_dir=removed), cs.LanguageID(removed_dir=removed),
            cs.PerplexityFilter(lm, cutoff, removed_dir=removed),
            cs.ReferenceFilter(cm.ReferenceClassifier().fit(ref, rnd), removed_dir=removed)]  # fmt: skip


def _texts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


COUNTS = ("docs_in", "docs_kept", "docs_removed", "bytes_in", "bytes_kept", "bytes_removed")


def _split_glob(pattern: str) -> tuple[str, str]:
    """("dir", "relative glob") of an input glob, for datatrove's reader."""
    if os.path.isdir(pattern):
        return pattern, "*.jsonl*"
    root = pattern
    while glob.has_magic(root):
        root = os.path.dirname(root)
    if not glob.glob(pattern, recursive=True):
        raise FileNotFoundError(f"--input {pattern!r} matches no file")
    return root or ".", os.path.relpath(pattern, root or ".")


def curate(recipe: str, inputs: str, output: str, workers: int = 1, *,
           reference: str | None = None, random: str | None = None) -> dict:  # fmt: skip
    """Runs the recipe over the input files into output; returns the data card. reference and
    random: JSONL pages the commoncrawl recipe trains its filters on."""
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    if recipe not in RECIPES and recipe != "commoncrawl":
        raise ValueError(f"unknown recipe {recipe!r}; valid: {sorted([*RECIPES, 'commoncrawl'])}")
    folder, pattern = _split_glob(inputs)
    removed = os.path.join(output, "removed")
    if recipe == "commoncrawl":
        steps = _commoncrawl(removed, reference, random)
    else:
        steps = RECIPES[recipe](removed)
    # one task: the dedup steps compare every document with every earlier one
    executor = LocalPipelineExecutor(
        [JsonlReader(folder, glob_pattern=pattern), *steps, JsonlWriter(output)],
        tasks=1, workers=workers, logging_dir=os.path.join(output, "logs"), skip_completed=False,
    )  # fmt: skip
    executor.run()
    return write_card(recipe, inputs, output, [s.name for s in steps])


def write_card(recipe: str, inputs: str, output: str, names: list[str]) -> dict:
    """data_card.json and data_card.md from datatrove's merged stats and removed documents."""
    with open(os.path.join(output, "logs", "stats.json")) as f:
        stats = {s["name"].split(": ", 1)[-1]: s["stats"] for s in json.load(f)}
    card = {"recipe": recipe, "input": inputs, "steps": []}
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
             "| step | docs in | kept | removed | MB in | MB kept |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in card["steps"]:
        lines.append(f"| {r['step']} | {r['docs_in']} | {r['docs_kept']} | {r['docs_removed']} | "
                     f"{r['bytes_in'] / 1e6:.3f} | {r['bytes_kept'] / 1e6:.3f} |")  # fmt: skip
    for r in card["steps"]:
        if r["examples_removed"]:
            lines += ["", f"## removed by {r['step']}", ""]
            lines += [f"- `{e[:120]!r}`" for e in r["examples_removed"]]
    return "\n".join(lines) + "\n"
