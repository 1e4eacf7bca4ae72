"""The curation steps of the paper's data sources (section 2.1), as datatrove pipeline steps.

Every step sees documents one at a time and either keeps one (possibly with cleaned text) or
removes it. It counts documents and bytes in, kept and removed (datatrove merges the counts of
all tasks into stats.json: the data card's numbers), and writes what it removes under
removed/<step>/ (the card's examples). What a library does well is used, not rewritten:
mwparserfromhell for wikitext, datasketch for MinHash + LSH.
"""

from __future__ import annotations

import contextlib
import re

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers import JsonlWriter

_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_utf8(text: str) -> str:
    """text with each lone surrogate as U+FFFD: JSON may escape one ("\\udc80") and
    mwparserfromhell decodes "&#xdc80;" to one, and neither can be written as UTF-8."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


class Step(PipelineStep):
    """apply(doc) -> the kept text, or None to remove the document."""

    type = "llama_jax"

    def __init__(self, removed_dir: str | None = None):
        super().__init__()
        self.removed_dir = removed_dir

    def apply(self, doc) -> str | None:
        raise NotImplementedError

    def run(self, data, rank: int = 0, world_size: int = 1):
        writer = (JsonlWriter(f"{self.removed_dir}/{self.name}", compression=None)
                  if self.removed_dir else contextlib.nullcontext())  # fmt: skip
        with writer:
            for doc in data:
                doc.text = valid_utf8(doc.text)
                size = len(doc.text.encode())
                self.stat_update("docs_in")
                self.stat_update("bytes_in", value=size, unit="bytes")
                text = self.apply(doc)
                if text is None:
                    self.stat_update("docs_removed")
                    self.stat_update("bytes_removed", value=size, unit="bytes")
                    if self.removed_dir:
                        writer.write(doc, rank)
                    continue
                doc.text = text = valid_utf8(text)
                self.stat_update("docs_kept")
                self.stat_update("bytes_kept", value=len(text.encode()), unit="bytes")
                yield doc


# ------------------------------------------------------------------------------------- GitHub


class LicenseAllowlist(Step):
    """GitHub: keep projects under the Apache, BSD and MIT licenses (a metadata field)."""

    name = "license_allowlist"
    ALLOWED = ("apache-2.0", "bsd-2-clause", "bsd-3-clause", "mit")

    def __init__(self, field: str = "license", allowed=ALLOWED, **kw):
        super().__init__(**kw)
        self.field, self.allowed = field, {a.lower() for a in allowed}

    def apply(self, doc):
        return doc.text if str(doc.metadata.get(self.field, "")).lower() in self.allowed else None


class CodeHeuristics(Step):
    """GitHub: drop generated or minified files: a line longer than max_line, a mean line longer
    than max_mean, or too few alphanumeric characters."""

    name = "code_heuristics"

    def __init__(
        self, max_line: int = 1000, max_mean: float = 100.0, min_alnum: float = 0.25, **kw
    ):
        super().__init__(**kw)
        self.max_line, self.max_mean, self.min_alnum = max_line, max_mean, min_alnum

    def apply(self, doc):
        lines = doc.text.splitlines() or [""]
        lengths = [len(x) for x in lines]
        alnum = sum(c.isalnum() for c in doc.text) / max(1, len(doc.text))
        ok = max(lengths) <= self.max_line and sum(lengths) / len(lengths) <= self.max_mean
        return doc.text if ok and alnum >= self.min_alnum else None


# a C/C++/C# preprocessor line is code, not a # comment: "#" then the directive ("#include",
# "#if"); after spaces after the "#" only words a comment would not begin with ("#  define")
DIRECTIVE = (r"#(?:(?:include|import|define|undef|if|ifdef|ifndef|elif|else|endif|pragma|error"
             r"|warning|line|region|endregion)\b|[ \t]+(?:define|undef|ifdef|ifndef|elif|endif"
             r"|pragma)\b|[ \t]*include[ \t]*[<\"])")  # fmt: skip
# a leading comment block, in #, // or /* */ syntax; it is stripped if it mentions a license
HEADER = re.compile(rf"\A(?:\s*(?:/\*.*?\*/|(?:(?:(?!{DIRECTIVE})#|//)[^\n]*\n)+))", re.S)
# kept above it: a shebang, and a Python encoding line (PEP 263: line 1 or 2)
HEADER_KEEP = re.compile(r"\A(?:#![^\n]*\n)?(?:[ \t]*#[^\n]*coding[:=][^\n]*\n)?")


class StripLicenseHeader(Step):
    """GitHub: remove a boilerplate license/copyright comment at the top of a file (after a
    shebang line, which stays; preprocessor lines are never part of the comment)."""

    name = "strip_license_header"

    def apply(self, doc):
        keep = HEADER_KEEP.match(doc.text).end()
        m = HEADER.match(doc.text[keep:])
        if m and re.search(r"copyright|license|licence|spdx", m.group(0), re.I):
            return doc.text[:keep] + doc.text[keep + m.end() :].lstrip("\n")
        return doc.text


# ----------------------------------------------------------------------------------- Wikipedia


# links that are not running text: files and images (options and caption), categories, and
# interlanguage links ([[fr:Paris]]: a lower-case code and no shown text); a leading colon makes
# an inline link ([[:Category:X|X]] shows "X")
WIKI_FILE_OR_CATEGORY = re.compile(r"\s*(?:file|image|category)\s*:", re.I)
WIKI_LANGUAGE = re.compile(r"\s*(?:[a-z]{2,3}(?:-[a-z]+)*|simple)\s*:")


class StripWikitext(Step):
    """Wikipedia: hyperlinks reduced to their text; tables, file and image links (with their
    captions), category and interlanguage links removed; templates, comments, tags and other
    markup removed (mwparserfromhell's strip_code)."""

    name = "strip_wikitext"

    def apply(self, doc):
        import mwparserfromhell

        code = mwparserfromhell.parse(doc.text)
        drop = [t for t in code.filter_tags() if t.tag.strip().lower() == "table"]  # {| |} too
        drop += [link for link in code.filter_wikilinks() if self._drop_link(link)]
        for node in drop:
            with contextlib.suppress(ValueError):  # inside a node removed before it
                code.remove(node)
        text = code.strip_code(normalize=True, collapse=True)
        text = "\n".join(line.strip() for line in text.splitlines())  # headings keep spaces
        text = re.sub(r"\n{3,}", "\n\n", text).strip()
        return text or None

    @staticmethod
    def _drop_link(link) -> bool:
        title = str(link.title)
        return bool(WIKI_FILE_OR_CATEGORY.match(title)
                    or (WIKI_LANGUAGE.match(title) and link.text is None))  # fmt: skip


# --------------------------------------------------------------------------------------- ArXiv

COMMENT = re.compile(r"(?<!\\)%[^\n]*")
NEWCOMMAND = re.compile(r"\\(?:re)?newcommand\*?\{?\\([A-Za-z]+)\}?\s*\{")
DEF = re.compile(r"\\def\\([A-Za-z]+)\s*\{")


def _braced(text: str, start: int) -> int:
    """The index just past the brace group whose "{" is at text[start - 1]."""
    depth, i = 1, start
    while i < len(text) and depth:
        if text[i] == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return i


class CleanLatex(Step):
    """ArXiv: comments removed, user macros without arguments (\\newcommand, \\def) expanded
    inline, everything before the first section and the bibliography removed. A paper without
    a section is dropped."""

    name = "clean_latex"

    def apply(self, doc):
        text = COMMENT.sub("", doc.text)
        macros = {}
        for pattern in (NEWCOMMAND, DEF):
            for m in list(pattern.finditer(text)):
                end = _braced(text, m.end())
                macros[m.group(1)] = text[m.end() : end - 1]
        for pattern in (NEWCOMMAND, DEF):  # the definitions themselves go
            while m := pattern.search(text):
                text = text[: m.start()] + text[_braced(text, m.end()) :]
        for name in sorted(macros, key=len, reverse=True):  # \foo before \fo
            text = re.sub(rf"\\{name}(?![A-Za-z])", lambda _, n=name: macros[n], text)
        first = re.search(r"\\(?:section|chapter)\*?\{", text)
        if not first:
            return None
        text = text[first.start() :]
        text = re.sub(
            r"\\begin\{thebibliography\}.*?\\end\{thebibliography\}", "", text, flags=re.S
        )
        text = re.sub(r"\\bibliography\{[^}]*\}|\\bibliographystyle\{[^}]*\}", "", text)
        text = re.sub(r"\\end\{document\}.*", "", text, flags=re.S)
        return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


# ------------------------------------------------------------------------- CommonCrawl and C4


def normalize_line(line: str) -> str:
    """CCNet's normalization before hashing a line: lower case, digits to 0, punctuation and
    extra spaces removed."""
    line = re.sub(r"\d", "0", line.lower())
    return " ".join(re.sub(r"[^\w\s]", " ", line).split())


class LanguageID(Step):
    """Keep documents whose top language is `lang` with probability >= min_prob, by Google's
    CLD2 (pycld2: the model is compiled into the wheel, nothing is downloaded); CLD2's
    probability of a language is the share of the page's text it gives it. Where CLD2 abstains
    (no language: word lists, symbols, scripts it lacks), langid.py's shipped model decides,
    as it did for every page before. Measured in issue 25: ~10-30x langid.py per MB, the same
    decision on 99.5% of pages."""

    name = "language_id"

    def __init__(self, lang: str = "en", min_prob: float = 0.5, **kw):
        super().__init__(**kw)
        self.lang, self.min_prob, self.model = lang, min_prob, None

    def apply(self, doc):
        import pycld2

        text = doc.text
        for _ in range(2):
            try:
                _, lang, percent, _ = pycld2.detect(text)[2][0]
                prob = percent / 100
                break
            except pycld2.error:  # refused: retry without the characters CLD2 rejects
                lang = "un"
                text = "".join(c for c in text if c.isprintable() or c in "\n\t")
                text = text.encode("utf-8", "replace").decode()
        if lang == "un":
            if self.model is None:
                from langid.langid import LanguageIdentifier, model

                self.model = LanguageIdentifier.from_modelstring(model, norm_probs=True)
            lang, prob = self.model.classify(doc.text)
        return doc.text if lang == self.lang and prob >= self.min_prob else None


C4_BOILERPLATE = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                  "use of cookies", "use cookies")  # fmt: skip
C4_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
C4_END_MARKS = (".", "?", "!", '"')
# a sentence ends at end marks (and closing quotes/brackets) before a space and a capital or a
# digit, so "e.g. this" does not split; punkt (which C4 uses) also knows "Dr. Smith" does not
SENTENCE_BREAK = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]*[A-Z0-9])")


class C4Heuristics(Step):
    """C4's page cleaning (Raffel et al. 2020), the rules of TFDS c4_utils.clean_page and
    get_badwords_filter_fn, in their order. Each line, stripped: dropped if a word is longer than
    max_word_length; citation markers ([1], [edit], [citation needed]) removed; dropped unless it
    ends in . ? ! or " (but not "...") and has min_words_per_line words; then "lorem ipsum" drops
    the page, "javascript" drops the line, a curly brace drops the page, a policy phrase (cookies,
    terms of use) drops the line. The page goes with fewer than min_sentences sentences in the
    kept lines, or with a bad word or phrase in them between non-word characters. C4's list
    (LDNOOBW) is not shipped: pass bad_words, a file (one word or phrase a line) or a list.
    Unlike C4, sentences are counted by end marks, not by NLTK's punkt."""

    name = "c4_heuristics"

    def __init__(self, bad_words=(), min_words_per_line: int = 5, min_sentences: int = 3,
                 max_word_length: int = 1000, **kw):  # fmt: skip
        super().__init__(**kw)
        if isinstance(bad_words, str) or hasattr(bad_words, "__fspath__"):
            with open(bad_words, encoding="utf-8") as f:
                bad_words = [w.strip() for w in f if w.strip()]
        words = "|".join(sorted({re.escape(w.strip().lower()) for w in bad_words if w.strip()}))
        self.bad = re.compile(rf"(?:\W|^)(?:{words})(?:\W|$)") if words else None
        self.min_words_per_line, self.min_sentences = min_words_per_line, min_sentences
        self.max_word_length = max_word_length

    def apply(self, doc):
        keep, sentences = [], 0
        for line in doc.text.splitlines():
            line = line.strip()
            if any(len(w) > self.max_word_length for w in line.split()):
                continue
            line = C4_CITATION.sub("", line)
            if not line.endswith(C4_END_MARKS) or line.endswith("..."):
                continue
            if len(line.split()) < self.min_words_per_line:
                continue
            low = line.lower()
            if "lorem ipsum" in low:
                return None
            if "javascript" in low:
                continue
            if "{" in line:
                return None
            if any(p in low for p in C4_BOILERPLATE):
                continue
            sentences += 1 + len(SENTENCE_BREAK.findall(line))
            keep.append(line)
        text = "\n".join(keep).strip()
        if sentences < self.min_sentences or (self.bad and self.bad.search(text.lower())):
            return None
        return text


# ------------------------------------------------------------------------------ StackExchange


def html_to_text(html: str) -> str:
    """Text of an HTML fragment: tags removed, entities decoded, blocks on their own lines."""
    from html.parser import HTMLParser

    class Text(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.parts = []

        def handle_starttag(self, tag, attrs):
            if tag in ("p", "br", "li", "pre", "div", "h1", "h2", "h3", "blockquote", "tr"):
                self.parts.append("\n")

        def handle_data(self, data):
            self.parts.append(data)

    parser = Text()
    try:
        parser.feed(html)
        parser.close()
        text = "".join(parser.parts)
    except AssertionError:  # html.parser gives up on some malformed markup ("<![" in code)
        import html as html_lib

        text = html_lib.unescape(re.sub(r"<(?:p|br|li|pre|div|tr)\b[^>]*>", "\n", html))
        text = re.sub(r"<[^>]*>", "", text)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(x.rstrip() for x in text.split("\n"))).strip()


class StackExchangeAnswers(Step):
    """StackExchange: the question (the document's text) followed by its answers (metadata
    "answers": [{"text", "score"}]) from the highest score down, HTML removed."""

    name = "stackexchange_answers"

    def apply(self, doc):
        answers = sorted(doc.metadata.get("answers") or [], key=lambda a: -a.get("score", 0))
        parts = [html_to_text(doc.text)] + [html_to_text(a["text"]) for a in answers]
        return "\n\n".join(p for p in parts if p) or None


# ------------------------------------------------------------------------------- CommonCrawl


class PerplexityFilter(Step):
    """CCNet's quality filter: remove pages whose perplexity under a word n-gram model trained
    on the reference corpus exceeds max_perplexity (the recipe: twice the 90th percentile of
    held-out reference pages; CCNet cuts at quantiles of the input instead, which needs a
    pass over it first)."""

    name = "perplexity_filter"

    def __init__(self, lm, max_perplexity: float, **kw):
        super().__init__(**kw)
        self.lm, self.max_perplexity = lm, max_perplexity

    def apply(self, doc):
        return doc.text if self.lm.perplexity(doc.text) <= self.max_perplexity else None


class ReferenceFilter(Step):
    """The paper's extra CommonCrawl step: keep pages a linear classifier takes for reference
    pages (p >= min_prob), trained on reference pages against random ones."""

    name = "reference_classifier"

    def __init__(self, classifier, min_prob: float = 0.5, **kw):
        super().__init__(**kw)
        self.classifier, self.min_prob = classifier, min_prob

    def apply(self, doc):
        return doc.text if self.classifier.prob(doc.text) >= self.min_prob else None
