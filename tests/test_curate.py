"""Curation recipes on small planted inputs: what each filter must catch and what it must keep,
and data cards whose counts add up."""

import gzip
import json
import os

import numpy as np
import pytest

pytest.importorskip("datatrove")
from llama_jax.data.curate.recipes import curate  # noqa: E402


def _run(tmp_path, recipe, rows):
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "part.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    card = curate(recipe, str(tmp_path / "in" / "*.jsonl"), str(tmp_path / "out"))
    kept = []
    for name in sorted(os.listdir(tmp_path / "out")):
        if name.endswith(".jsonl.gz"):
            with gzip.open(tmp_path / "out" / name, "rt") as f:
                kept += [json.loads(line)["text"] for line in f]
    _check_card(card, len(rows))
    return kept, card


def _check_card(card, n):
    """in = kept + removed at every step, and each step takes in what the one before kept;
    bytes kept and removed never exceed the bytes in (cleaning only shrinks a text)."""
    docs = n
    for row in card["steps"]:
        assert row["docs_in"] == docs == row["docs_kept"] + row["docs_removed"], row
        if row["step"] != "stackexchange_answers":  # (which adds the answers to the text)
            assert row["bytes_in"] >= row["bytes_kept"] + row["bytes_removed"], row
        docs = row["docs_kept"]


def test_github(tmp_path):
    normal = "def area(r):\n    return 3.14159 * r * r\n"
    minified = "function a(b){return b*2}var c=" + "a(1)+" * 400 + "0;"
    header = "# Copyright (c) 2020 Someone\n# Licensed under the MIT License.\n\nimport os\n"
    rows = [{"text": normal, "license": "MIT"}, {"text": minified, "license": "mit"},
            {"text": normal, "license": "Apache-2.0"}, {"text": "x = 1\n", "license": "gpl-3.0"},
            {"text": header, "license": "bsd-3-clause"}]  # fmt: skip
    kept, card = _run(tmp_path, "github", rows)
    assert kept == [normal, "import os\n"]  # the copy, the GPL file and the minified one gone
    removed = {r["step"]: r["examples_removed"] for r in card["steps"]}
    assert removed["license_allowlist"] == ["x = 1\n"]
    assert removed["code_heuristics"][0].startswith("function a(b)")
    assert (tmp_path / "out" / "data_card.md").read_text().startswith("# Data card: github")


def test_wikipedia(tmp_path):
    page = ("'''Paris''' is the [[capital city|capital]] of [[France]].<ref>{{cite web|url=x}}"
            "</ref><!-- hidden -->\n{{Infobox city|name=Paris}}\n== History ==\nOld.")  # fmt: skip
    kept, _ = _run(tmp_path, "wikipedia", [{"text": page}])
    assert kept == ["Paris is the capital of France.\n\nHistory\nOld."], kept


def test_books_near_duplicates(tmp_path):
    """Two books sharing 95% of their text: the second goes; one sharing 50% stays."""
    words = [f"w{i}" for i in range(4000)]
    book = " ".join(words)
    near = " ".join(words[:3800] + [f"v{i}" for i in range(200)])  # 95% shared
    half = " ".join(words[:2000] + [f"u{i}" for i in range(2000)])  # 50% shared
    kept, card = _run(tmp_path, "books", [{"text": book}, {"text": near}, {"text": half}])
    assert kept == [book, half]
    assert card["steps"][0]["docs_removed"] == 1


def test_arxiv_latex_cleanup(tmp_path):
    paper = r"""\documentclass{article}
\usepackage{amsmath}
\newcommand{\R}{\mathbb{R}}
\def\eps{\varepsilon}
\title{A paper}
\begin{document}
\maketitle
\begin{abstract}Short.\end{abstract}
\section{Introduction}
Let $x \in \R$ and $\eps > 0$. % a comment
It costs 5\% more.
\section{Results}
As shown \cite{a}.
\begin{thebibliography}{9}
\bibitem{a} A. Author. Title. 2020.
\end{thebibliography}
\end{document}
"""
    clean = r"""\section{Introduction}
Let $x \in \mathbb{R}$ and $\varepsilon > 0$.
It costs 5\% more.
\section{Results}
As shown \cite{a}.
"""
    kept, _ = _run(tmp_path, "arxiv", [{"text": paper}, {"text": "no sections at all"}])
    assert [k.replace(" \n", "\n") for k in kept] == [clean]


def test_unknown_recipe_and_missing_input_are_one_line_errors(tmp_path, capsys):
    from launch.curate import main

    for argv, message in ((["--recipe", "x", "--input", "a", "--output", "b"], "unknown recipe"),
                          (["--recipe", "books", "--input", str(tmp_path / "none*.jsonl"),
                            "--output", str(tmp_path / "o")], "matches no file")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


ENGLISH = "\n".join([
    "The river rises in the northern hills and flows south for many miles.",
    "Farmers along its banks grow wheat, barley and apples every year.",
    "In spring the water is high and the old bridge is sometimes closed.",
    "Visitors come in summer to swim and to fish in the quiet pools.",
    "The town museum tells the story of the mills that once stood here.",
])  # fmt: skip


def test_c4(tmp_path):
    """A French page among English ones goes (language id); lines without terminal
    punctuation or under 3 words, and boilerplate lines, go; a line seen on an earlier page goes;
    a page with lorem ipsum goes."""
    english = "Home\n" + ENGLISH + "\nThis site uses cookies to improve your experience."
    other = ENGLISH.replace("mills", "windmills")  # 4 of its 5 lines seen before
    french = ("La rivière prend sa source dans les collines du nord et coule vers le sud. "
              "Les agriculteurs cultivent du blé, de l'orge et des pommes chaque année. "
              "Au printemps l'eau est haute et le vieux pont est parfois fermé. "
              "Les visiteurs viennent en été pour nager et pêcher dans les bassins calmes. "
              "Le musée raconte l'histoire des moulins qui se trouvaient ici.")  # fmt: skip
    lorem = ENGLISH + " Lorem ipsum dolor sit amet, consectetur adipiscing elit."
    kept, card = _run(tmp_path, "c4", [{"text": t} for t in (english, french, lorem, other)])
    assert kept[0] == ENGLISH  # "Home" and the cookie line dropped
    steps = {r["step"]: r for r in card["steps"]}
    assert steps["language_id"]["examples_removed"][0].startswith("La rivière")
    assert len(kept) == 1  # `other` lost its lines seen before and is too short; lorem ipsum
    from datatrove.data import Document

    from llama_jax.data.curate.steps import C4Heuristics

    step = C4Heuristics(bad_words=["grumbleword"])
    assert step.apply(Document(text=ENGLISH, id="0")) == ENGLISH
    assert step.apply(Document(text=ENGLISH + " A grumbleword here.", id="1")) is None


def test_stackexchange(tmp_path):
    question = "<p>How do I <b>sort</b> a list?</p>"
    answers = [{"text": "<p>Use a loop.</p>", "score": 1},
               {"text": "<p>Use <code>sorted(x)</code> &amp; be happy.</p>", "score": 10},
               {"text": "<p>Ask again.</p>", "score": -2}]  # fmt: skip
    kept, _ = _run(tmp_path, "stackexchange", [{"text": question, "answers": answers}])
    from llama_jax.data.curate.steps import html_to_text

    assert html_to_text("<p>a <![ b</p><p>c &amp; d</p>") == "a\nc & d"  # malformed: no crash
    assert kept == [
        "How do I sort a list?\n\nUse sorted(x) & be happy.\n\nUse a loop.\n\nAsk again."
    ]


def _encyclopedia(n, seed):
    """Reference-like pages: plain encyclopedic sentences over a fixed vocabulary."""
    rng = np.random.default_rng(seed)
    cities = ["Lyon", "Porto", "Graz", "Turku", "Gdansk", "Aarhus", "Bergen", "Basel"]
    rivers = ["Rhone", "Douro", "Mur", "Aura", "Vistula", "Aros", "Nidelva", "Rhine"]
    pages = []
    for _ in range(n):
        c, r = rng.integers(0, 8, 2)
        pages.append(
            f"{cities[c]} is a city on the {rivers[r]} river. It has a population of about "
            f"{rng.integers(50, 900)} thousand people. The city has a university, a cathedral "
            f"and a museum of history. The {rivers[r]} river flows through the old town."
        )
    return pages


def _spam(n, seed):
    rng = np.random.default_rng(seed)
    items = ["shoes", "watches", "phones", "bags", "pills", "loans", "tickets", "games"]
    return [f"Buy cheap {items[i]} now! Best price {items[i]} free shipping, click here to "
            f"order {items[i]} today. Login register cart checkout deals deals deals."
            for i in rng.integers(0, 8, n)]  # fmt: skip


@pytest.mark.slow
def test_commoncrawl_filters_are_trained_by_the_pipeline(tmp_path):
    """CommonCrawl: the n-gram model (trained on reference pages) gives fluent reference-like
    text a low perplexity and word salad a high one; the classifier (reference vs random pages)
    tells a new encyclopedic page from a new spam page; end to end the French page, the word
    salad and the spam page go and the encyclopedic page stays."""
    from llama_jax.data.curate import models as cm

    ref, rnd = _encyclopedia(40, 0), _spam(40, 1)
    for name, pages in (("ref.jsonl", ref), ("rnd.jsonl", rnd)):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in pages))
    good, spam = _encyclopedia(1, 7)[0], _spam(1, 8)[0]
    salad = ("Velvet quantum orchard lantern meteor saddle prism walrus. Harbor tulip gravel "
             "oxygen violin kettle. Marble comet ginger puzzle anchor basket.")  # fmt: skip
    lm = cm.NGramLM().fit(ref)
    assert lm.perplexity(good) < 10 < 100 < lm.perplexity(salad)
    clf = cm.ReferenceClassifier().fit(ref, rnd)
    assert clf.prob(good) > 0.5 > clf.prob(spam)

    french = ("Lyon est une ville sur le Rhône. Elle compte environ cinq cent mille habitants. "
              "La ville possède une université, une cathédrale et un musée d'histoire.")  # fmt: skip
    (tmp_path / "in").mkdir()
    rows = [{"text": t} for t in (good, french, salad, spam)]
    (tmp_path / "in" / "cc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    card = curate("commoncrawl", str(tmp_path / "in"), str(tmp_path / "out"),
                  reference=str(tmp_path / "ref.jsonl"), random=str(tmp_path / "rnd.jsonl"))  # fmt: skip
    _check_card(card, 4)
    steps = {r["step"]: r for r in card["steps"]}
    assert steps["language_id"]["docs_removed"] == 1
    assert steps["perplexity_filter"]["examples_removed"][0].startswith("Velvet quantum")
    assert card["steps"][-1]["docs_kept"] == 1
    with gzip.open(tmp_path / "out" / "00000.jsonl.gz", "rt") as f:
        assert [json.loads(line)["text"] for line in f] == [good]
