"""The rules of single curation steps on planted documents: C4's clean_page thresholds, citation
and bad-phrase rules; wikitext tables, files and categories; license headers below a shebang
and above preprocessor lines."""

import pytest

pytest.importorskip("datatrove")
from datatrove.data import Document  # noqa: E402

from llama_jax.data.curate.steps import (  # noqa: E402
    C4Heuristics,
    StripLicenseHeader,
    StripWikitext,
)


def _apply(step, text):
    return step.apply(Document(text=text, id="0"))


# three lines of exactly 5 words, one sentence each
FIVE = ["The cat sat down quietly.", "Rain fell on the hills.", "We walked home after dark."]


def test_c4_keeps_five_word_lines_and_three_sentences():
    assert _apply(C4Heuristics(), "\n".join(FIVE)) == "\n".join(FIVE)


def test_c4_drops_four_word_lines():
    text = "\n".join([*FIVE, "The dog barked twice."])
    assert _apply(C4Heuristics(), text) == "\n".join(FIVE)


def test_c4_drops_two_sentence_pages():
    assert _apply(C4Heuristics(), "\n".join(FIVE[:2])) is None
    # and counts sentences within a line: two lines, three sentences
    two_lines = "\n".join([FIVE[0] + " " + FIVE[1], FIVE[2]])
    assert _apply(C4Heuristics(), two_lines) == two_lines


def test_c4_thresholds_are_arguments():
    step = C4Heuristics(min_words_per_line=3, min_sentences=2)
    assert _apply(step, "Short line here.\nAnother short one.") == (
        "Short line here.\nAnother short one."
    )


def test_c4_removes_citation_markers_before_the_line_checks():
    cited = "Paris is the capital of France.[1] It is large.[12][citation needed]"
    edit = "History of the old town hall.[edit]"
    kept = _apply(C4Heuristics(), "\n".join([cited, edit, *FIVE]))
    assert kept.split("\n")[:2] == [
        "Paris is the capital of France. It is large.",
        "History of the old town hall.",
    ]
    # a line that ends in a marker ends in a "." once it is removed
    assert _apply(C4Heuristics(), "\n".join([*FIVE, "He came home at last.[3]"])).endswith(
        "He came home at last."
    )


def test_c4_drops_lines_with_a_word_over_1000_chars():
    long_line = "Here is a word " + "x" * 1001 + " today."
    assert _apply(C4Heuristics(), "\n".join([long_line, *FIVE])) == "\n".join(FIVE)
    ok_line = "Here is a word " + "x" * 1000 + " today."
    assert _apply(C4Heuristics(), "\n".join([ok_line, *FIVE])).startswith(ok_line)


def test_c4_drops_ellipsis_javascript_and_policy_lines_and_brace_pages():
    noise = ["And then we waited for it...", "Please enable JavaScript in your browser now.",
             "Read our privacy policy before you go."]  # fmt: skip
    assert _apply(C4Heuristics(), "\n".join([*noise, *FIVE])) == "\n".join(FIVE)
    assert _apply(C4Heuristics(), "\n".join([*FIVE, "The code was var x = {a: 1}."])) is None
    # a brace on a line dropped anyway (too short) does not drop the page, as in C4
    assert _apply(C4Heuristics(), "\n".join([*FIVE, "f() {"])) == "\n".join(FIVE)


def test_c4_bad_words_list_file_and_phrases(tmp_path):
    words = tmp_path / "bad.txt"
    words.write_text("grumbleword\nblue moon\n\n")
    phrase = "\n".join([*FIVE, "Once in a Blue Moon it rains."])
    single = "\n".join([*FIVE, "A grumbleword, said the old man."])
    for bad in (["grumbleword", "blue moon"], str(words), words):
        step = C4Heuristics(bad_words=bad)
        assert _apply(step, phrase) is None
        assert _apply(step, single) is None
        assert _apply(step, "\n".join(FIVE)) == "\n".join(FIVE)
    # whole words and phrases only: "blue moonlight" and "grumblewords" do not match
    step = C4Heuristics(bad_words=["grumbleword", "blue moon"])
    near = "\n".join([*FIVE, "The blue moonlight and the grumblewords shone."])
    assert _apply(step, near) == near
    # a bad word on a dropped line does not drop the page
    assert _apply(step, "\n".join([*FIVE, "grumbleword"])) == "\n".join(FIVE)


def test_wikitext_removes_tables():
    page = ('Before the table.\n{| class="wikitable"\n|-\n! Head\n|-\n| cellone || celltwo\n'
            "|}\nAfter the table.\n<table><tr><td>htmlcell</td></tr></table>")  # fmt: skip
    text = _apply(StripWikitext(), page)
    assert text == "Before the table.\n\nAfter the table.", text


def test_wikitext_removes_file_links_with_options_and_caption():
    page = ("[[File:Paris.jpg|thumb|200px|The [[Eiffel Tower]] at night]]\n"
            "Paris is a city.\n[[Image:Map.png|left|A map]]")  # fmt: skip
    assert _apply(StripWikitext(), page) == "Paris is a city."


def test_wikitext_removes_category_and_interlanguage_links():
    page = ("Paris is the [[capital city|capital]] of [[France]]. See [[:Category:Cities|cities]]."
            "\n\n[[Category:Capitals in Europe]]\n[[Category:Paris| ]]\n[[fr:Paris]] [[de:Paris]]")  # fmt: skip
    text = _apply(StripWikitext(), page)
    assert text == "Paris is the capital of France. See cities.", text


def test_license_header_below_a_shebang_is_stripped_and_the_shebang_kept():
    src = "#!/usr/bin/env python\n# Copyright 2020 Someone\n# Licensed under MIT.\n\nimport os\n"
    assert _apply(StripLicenseHeader(), src) == "#!/usr/bin/env python\nimport os\n"
    plain = "#!/usr/bin/env python\nimport os\n"
    assert _apply(StripLicenseHeader(), plain) == plain


def test_preprocessor_lines_are_not_part_of_the_header():
    src = '#include "license.h"\n#define LICENSE_X 1\n#pragma once\nint x;\n'
    assert _apply(StripLicenseHeader(), src) == src
    src = "// Copyright 2020 Someone, MIT License\n#include <stdio.h>\n#  define N 2\nint x;\n"
    assert _apply(StripLicenseHeader(), src) == "#include <stdio.h>\n#  define N 2\nint x;\n"
    guard = "/* SPDX-License-Identifier: MIT */\n#ifndef X_H\n#define X_H\n#endif\n"
    assert _apply(StripLicenseHeader(), guard) == "#ifndef X_H\n#define X_H\n#endif\n"


@pytest.mark.parametrize("recipe", ["wikipedia", "c4"])
def test_lone_surrogates_become_replacement_characters(tmp_path, recipe):
    """A JSON "\\udc80" escape decodes to a lone surrogate, and mwparserfromhell turns the
    entity "&#xdc80;" into one (both in the stdlib's own test files): neither can be encoded as
    UTF-8: datatrove's reader dropped the page with the first (a warning), and the wikipedia
    recipe crashed on the second while counting bytes. Each becomes U+FFFD, the rest of the
    text is kept, and a line that is not JSON at all is counted in the data card."""
    import gzip
    import json

    from llama_jax.data.curate.recipes import curate

    lines = [f"Line {k} of the page has a few more words in it." for k in range(6)]
    pages = [
        " ".join(lines) + ' The entity "&#xdc80;" is one.',
        " ".join(lines) + " Raw \udc80 is.",
    ]
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "pages.jsonl", "w") as f:  # json.dumps writes "\udc80" escaped
        f.writelines(json.dumps({"text": p}) + "\n" for p in pages)
        f.write('{"text": "a line cut short\n')  # not JSON: skipped, and counted
    card = curate(recipe, str(tmp_path / "in"), str(tmp_path / "out"), tasks=1)
    assert card["unreadable_lines"] == 1, card
    out = [json.loads(line)["text"] for p in sorted((tmp_path / "out").rglob("*.jsonl.gz"))
           for line in gzip.open(p, "rt", encoding="utf-8")]  # fmt: skip
    joined = "".join(out)
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in joined), out
    assert "Raw \ufffd is." in joined and "Line 5 of the page" in joined, out
    if recipe == "wikipedia":
        assert '"\ufffd" is one.' in joined, out
