"""python -m launch.curate --recipe NAME --input GLOB --output DIR: the paper's per-source
cleaning (section 2.1) on HF datatrove, whose executors run it on one machine (here) or a
cluster (its SLURM executor).

A recipe is a short list of steps (data/curate/steps.py), in one table. Input: JSONL files with a
"text" field (and metadata fields, e.g. GitHub's "license"). Output: DIR/*.jsonl.gz cleaned
documents, the documents each step removed under DIR/removed/<step>/, and DIR/data_card.json
+ data_card.md: per step, documents and bytes in, kept and removed, and removed examples.
"""

from __future__ import annotations

import glob
import json
import os

from llama_jax.data.curate import models as cm
from llama_jax.data.curate import steps as cs

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
           reference: str | None = None, random: str | None = None,
           slurm_partition: str | None = None, slurm_timeout_s: float = 3600) -> dict:  # fmt: skip
    """Runs the recipe over the input files into output; returns the data card. reference and
    random: JSONL pages the commoncrawl recipe trains its filters on. slurm_partition: run
    it as a SLURM job there (datatrove's SLURM executor) and wait for it."""
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
    pipeline = [JsonlReader(folder, glob_pattern=pattern), *steps, JsonlWriter(output)]
    logs = os.path.join(output, "logs")
    if slurm_partition:
        _run_on_slurm(pipeline, logs, slurm_partition, slurm_timeout_s)
    else:  # one task: the dedup steps compare every document with every earlier one
        from datatrove.executor.local import LocalPipelineExecutor

        LocalPipelineExecutor(pipeline, tasks=1, workers=workers, logging_dir=logs,
                              skip_completed=False).run()  # fmt: skip
    return write_card(recipe, inputs, output, [s.name for s in steps])


def _run_on_slurm(pipeline: list, logs: str, partition: str, timeout_s: float = 1800) -> None:
    """datatrove's SLURM executor: one array task whose job runs with this Python on PATH; the
    stats are merged here (not by its separate merge job) once the task's completion marker
    appears."""
    import sys
    import time

    from datatrove.executor.slurm import SlurmPipelineExecutor

    class Executor(SlurmPipelineExecutor):
        def launch_merge_stats(self):  # write_card merges the per-task stats itself
            pass

    executor = Executor(
        pipeline, tasks=1, time="01:00:00", partition=partition, job_name="llama_jax_curate",
        logging_dir=logs, qos="", sbatch_args={"mem-per-cpu": "500M"}, skip_completed=False,
        env_command=f"export PATH={os.path.dirname(sys.executable)}:$PATH", requeue=False,
    )  # fmt: skip
    executor.run()
    deadline = time.time() + timeout_s
    while not os.path.exists(os.path.join(logs, "completions", "00000")):
        if time.time() > deadline:
            raise TimeoutError(
                f"the SLURM curation job did not finish in {timeout_s:.0f} s: {logs}"
            )
        time.sleep(1)


def write_card(recipe: str, inputs: str, output: str, names: list[str]) -> dict:
    """data_card.json and data_card.md from datatrove's merged stats and removed documents."""
    stats = {}
    merged = os.path.join(output, "logs", "stats.json")
    for path in (
        [merged]
        if os.path.exists(merged)
        else sorted(glob.glob(os.path.join(output, "logs", "stats", "*.json")))
    ):  # datatrove's merged stats, or each task's (summed)
        with open(path) as f:
            for step in json.load(f):
                mine = stats.setdefault(step["name"].split(": ", 1)[-1], {})
                for c in COUNTS:
                    mine[c] = mine.get(c, 0) + _total(step["stats"], c)
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
