"""Curation as parallel datatrove tasks: N tasks keep exactly what one does (every recipe, with
duplicates planted across files so that a per-task dedup would miss them), line dedup against
a set-based reference, books near-dedup at 90% overlap (a contained half-book included), and a
SIGKILLed run finished by rerunning it."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("datatrove")
from test_curate import ENGLISH, _check_card, _encyclopedia, _spam  # noqa: E402

from llama_jax.data.curate.recipes import curate  # noqa: E402
from llama_jax.data.curate.steps import normalize_line  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(folder, rows, files):
    """rows[i] goes to file i % files: copies land in other files, so other tasks."""
    os.makedirs(folder, exist_ok=True)
    for k in range(files):
        with open(os.path.join(folder, f"part-{k}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[k::files])


def _kept(out):
    texts = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".jsonl.gz"):
            with gzip.open(os.path.join(out, name), "rt") as f:
                texts += [json.loads(line) for line in f]
    return texts


def _book(words, n, seed):
    return " ".join(np.random.default_rng(seed).choice(words, n))


VOCAB = [f"w{i}" for i in range(5000)]
BOOK = _book(VOCAB, 6000, 0)
HEADER = "# Copyright (c) 2020 Someone\n# Licensed under the MIT License.\n\nimport os\n"
ROWS = {
    "github": [{"text": "def area(r):\n    return 3.14 * r * r\n", "license": "MIT"},
               {"text": HEADER, "license": "mit"},
               {"text": "x = 1\n", "license": "gpl-3.0"},
               {"text": "def area(r):\n    return 3.14 * r * r\n", "license": "Apache-2.0"},
               {"text": HEADER.replace("2020 Someone", "2021 Other"), "license": "bsd-3-clause"},
               {"text": "var c=" + "a(1)+" * 400 + "0;", "license": "mit"}],
    "wikipedia": [{"text": f"'''Page {i}''' is a [[page|page]].\n== History ==\nOld."}
                  for i in range(5)],
    "books": [{"text": BOOK}, {"text": _book(VOCAB, 6000, 1)}, {"text": BOOK},
              {"text": " ".join(BOOK.split()[:3000])}],
    "arxiv": [{"text": f"\\section{{Intro {i}}}\nText.\n"} for i in range(3)]
             + [{"text": "no sections"}],
    "c4": [{"text": ENGLISH}, {"text": ENGLISH.replace("mills", "windmills")},
           {"text": "Home\n" + ENGLISH}, {"text": ENGLISH + " Lorem ipsum dolor sit amet."},
           {"text": ENGLISH.replace("river", "stream")}],
    "stackexchange": [{"text": f"<p>Question {i}?</p>",
                       "answers": [{"text": f"<p>Answer {i}.</p>", "score": 1}]}
                      for i in range(4)],
    "commoncrawl": [{"text": t} for t in _encyclopedia(6, 7) + _spam(2, 8) + _encyclopedia(2, 7)],
}  # fmt: skip


@pytest.mark.parametrize("recipe", sorted(ROWS))
def test_four_tasks_keep_what_one_task_keeps(tmp_path, recipe):
    """Every recipe, 4 input files: tasks=1 and tasks=4 (3 hash shards; 2 worker processes
    for one recipe, so the steps also cross a process boundary) keep the same documents,
    metadata included, and count the same at every step; where the recipe dedups, the planted
    cross-file copies are removed in both."""
    _write(tmp_path / "in", ROWS[recipe], 4)
    kw = {}
    if recipe == "commoncrawl":
        for name, pages in (("ref.jsonl", _encyclopedia(40, 0)), ("rnd.jsonl", _spam(40, 1))):
            (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in pages))
        kw = {"reference": str(tmp_path / "ref.jsonl"), "random": str(tmp_path / "rnd.jsonl")}
    one = curate(recipe, str(tmp_path / "in"), str(tmp_path / "one"), **kw)
    four = curate(recipe, str(tmp_path / "in"), str(tmp_path / "four"),
                  2 if recipe == "github" else 1, tasks=4, shards=3, **kw)  # fmt: skip
    _check_card(one, len(ROWS[recipe]))
    key = lambda d: json.dumps(d, sort_keys=True)  # noqa: E731
    assert sorted(map(key, _kept(tmp_path / "one"))) == sorted(map(key, _kept(tmp_path / "four")))
    assert [s["docs_kept"] for s in one["steps"]] == [s["docs_kept"] for s in four["steps"]]
    assert [s["bytes_kept"] for s in one["steps"]] == [s["bytes_kept"] for s in four["steps"]]
    dedup = [s for s in four["steps"] if s["step"] in ("line_dedup", "exact_dedup",
                                                        "near_duplicate_books")]  # fmt: skip
    if recipe in ("github", "books", "c4", "commoncrawl"):
        assert len(dedup) == 1 and dedup[0]["bytes_kept"] < dedup[0]["bytes_in"], dedup


def _reference_line_dedup(docs):
    """The definition, sequentially over the input order: a line whose normalized form appeared
    earlier (in this or an earlier document) goes; an emptied document goes."""
    seen, out = set(), []
    for text in docs:
        lines = []
        for line in text.split("\n"):
            norm = normalize_line(line)
            if norm and norm in seen:
                continue
            seen.add(norm)
            lines.append(line)
        out.append("\n".join(lines).strip() or None)
    return out


def test_line_dedup_matches_a_set_based_reference(tmp_path):
    """3 files of planted documents (each repeats lines of earlier ones with other digits,
    case and punctuation, which CCNet's normalization equates; some repeat within themselves;
    some are wholly duplicate): 3 tasks with 1 or 7 hash shards give exactly the reference's
    kept text for every document, in place."""

    def word(n):  # digits would all normalize to 0: spell numbers in letters
        return "".join(chr(97 + int(c)) for c in str(n))

    rng = np.random.default_rng(0)
    docs = []
    for d in range(300):
        lines = [f"line {word(d)} {word(i)} of the planted input, 2024" for i in range(8)]
        for _ in range(4):
            e, i = rng.integers(0, max(1, d)), rng.integers(0, 12)
            lines.insert(
                rng.integers(0, len(lines)), f"LINE {word(e)} {word(i)} of the PLANTED input; 1999"
            )
        if d % 10 == 3:
            lines = [f"Line {word(d - 1)} {word(i)} of the planted input; 1999" for i in range(3)]
        docs.append("\n".join(lines))
    _write(tmp_path / "in", [{"text": t, "id": str(i)} for i, t in enumerate(docs)], 1)
    # the input order is the files' order: split into 3 files by contiguous ranges
    os.remove(tmp_path / "in" / "part-0.jsonl")
    for k in range(3):
        with open(tmp_path / "in" / f"part-{k}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t, "id": str(i)}) + "\n"
                         for i, t in enumerate(docs) if i // 100 == k)  # fmt: skip
    want = _reference_line_dedup(docs)
    assert sum(w is None for w in want) >= 25  # the wholly duplicate ones
    from datatrove.pipeline.writers import JsonlWriter

    from llama_jax.data.curate import dedup as dd
    from llama_jax.data.curate import jobs
    from llama_jax.data.curate.recipes import input_files

    for shards in (1, 7):
        out = tmp_path / f"out{shards}"
        folder, pattern, files = input_files(str(tmp_path / "in"))
        read = jobs.JsonlReader(folder, glob_pattern=pattern, adapter=dd.Ordered(files))
        work = str(out / "work")
        stages = [jobs.Stage("sig", [read, dd.HashSignatures("line_dedup", work, shards)], 3),
                  jobs.Stage("find", [dd.FindDuplicates("line_dedup", work)], shards),
                  jobs.Stage("filter", [read, dd.DropDuplicates("line_dedup", work),
                                        JsonlWriter(str(out), adapter=dd.without_order)], 3)]  # fmt: skip
        jobs.run(stages, str(out / "logs"))
        got = {d["id"]: d["text"] for d in _kept(out)}
        assert got == {str(i): w for i, w in enumerate(want) if w is not None}


def test_books_copies_and_a_contained_half_go_a_half_overlap_stays(tmp_path):
    """The paper: books with more than 90% content overlap go. An exact copy, a 95% copy and
    the first half of the book (overlap 1.0: it is contained) go; a book sharing 50% stays,
    and so does a book that merely shares its vocabulary. The copies are in other files than
    the book, so other tasks."""
    words = BOOK.split()
    rows = [{"text": BOOK}, {"text": " ".join(words[:5700] + [f"v{i}" for i in range(300)])},
            {"text": " ".join(words[:3000])}, {"text": BOOK},
            {"text": " ".join(words[:3000] + [f"u{i}" for i in range(3000)])},
            {"text": _book(VOCAB, 6000, 5)}]  # fmt: skip
    _write(tmp_path / "in", rows, 3)  # files: [0, 3], [1, 4], [2, 5]
    card = curate("books", str(tmp_path / "in"), str(tmp_path / "out"), tasks=3)
    kept = sorted(d["text"] for d in _kept(tmp_path / "out"))
    assert kept == sorted([BOOK, rows[4]["text"], rows[5]["text"]])
    assert card["steps"][0]["docs_removed"] == 3


def _run_curate(out, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "launch.curate", "--recipe", "c4", "--output", str(out), *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_a_killed_run_rerun_gives_the_uninterrupted_output(tmp_path):
    """SIGKILL once the first task of the filter stage has finished (so some tasks of it are done
    and some not): the same command again redoes only the unfinished tasks, and the output
    files and the data card equal an uninterrupted run's. Another recipe or input into the
    same --output is refused in one line naming the run there."""
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(ENGLISH.split(), 8)) + "." for _ in range(400)]
    rows = [{"text": "\n".join(rng.choice(lines, 30))} for _ in range(1600)]
    _write(tmp_path / "in", rows, 8)
    args = ["--input", str(tmp_path / "in"), "--tasks", "8", "--shards", "2"]
    ref = _run_curate(tmp_path / "ref", *args)
    assert ref.wait(300) == 0, ref.stdout.read()
    p = _run_curate(tmp_path / "out", *args)
    done = tmp_path / "out" / "logs" / "filter" / "completions"
    deadline = time.time() + 300
    while not (done / "00000").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait(60)
    finished = len(os.listdir(done)) if done.exists() else 0
    assert 1 <= finished < 8, f"{finished} of 8 filter tasks done at the kill: not mid-run"
    again = _run_curate(tmp_path / "out", *args)
    log = again.stdout.read()
    assert again.wait(300) == 0, log
    assert f"Skipping {finished} already completed tasks" in log, log[-3000:]
    for name in sorted(os.listdir(tmp_path / "ref")):
        if name.endswith(".jsonl.gz"):
            with gzip.open(tmp_path / "ref" / name) as a, gzip.open(tmp_path / "out" / name) as b:
                assert a.read() == b.read(), name
    card = lambda d: json.loads((d / "data_card.json").read_text())["steps"]  # noqa: E731
    assert card(tmp_path / "ref") == card(tmp_path / "out")
    assert card(tmp_path / "ref")[0]["docs_removed"] > 0  # line dedup emptied some pages

    for extra, differs in (
        (["--recipe", "github"], "recipe"),
        (["--input", str(tmp_path / "in" / "part-0.jsonl")], "files"),
    ):
        p = subprocess.run([sys.executable, "-m", "launch.curate", "--recipe", "c4", *args,
                            "--output", str(tmp_path / "out"), *extra], cwd=ROOT,
                           capture_output=True, text=True)  # fmt: skip
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
        assert "holds a curation of recipe 'c4'" in p.stderr and differs in p.stderr, p.stderr


def test_input_takes_a_file_a_directory_or_a_glob(tmp_path, capsys):
    """The same two documents read from a file, its directory and a glob; a path that does not
    exist is one line, once."""
    from launch.curate import main

    _write(tmp_path / "in", [{"text": "\\section{A}\nOne.\n"}, {"text": "\\section{B}\nTwo.\n"}], 1)
    for i, path in enumerate(("in/part-0.jsonl", "in", "in/*.jsonl")):
        card = curate("arxiv", str(tmp_path / path), str(tmp_path / f"out{i}"))
        assert card["steps"][0]["docs_kept"] == 2, path
    capsys.readouterr()  # (datatrove's logs of those runs)
    with pytest.raises(SystemExit) as e:
        main(["--recipe", "arxiv", "--input", str(tmp_path / "nothing.jsonl"),
              "--output", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "nothing.jsonl" in err, err
