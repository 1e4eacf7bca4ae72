"""The curation steps of the paper's data sources (section 2.1), as datatrove pipeline steps.

Every step sees documents one at a time and either keeps one (possibly with cleaned text) or
removes it. It counts documents and bytes in, kept and removed (datatrove merges the counts of
all tasks into stats.json: the data card's numbers), and writes what it removes under
removed/<step>/ (the card's examples). What a library does well is used, not rewritten:
mwparserfromhell for wikitext, datasketch for MinHash + LSH.
"""

from __future__ import annotations

import contextlib
import hashlib
import re

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers import JsonlWriter


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
                doc.text = text
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


# a leading comment block that mentions a license or copyright, in #, // or /* */ syntax
HEADER = re.compile(r"\A(?:\s*(?:/\*.*?\*/|(?:(?:#|//)[^\n]*\n)+))", re.S)


class StripLicenseHeader(Step):
    """GitHub: remove a boilerplate license/copyright comment at the top of a file."""

    name = "strip_license_header"

    def apply(self, doc):
        m = HEADER.match(doc.text)
        if m and re.search(r"copyright|license|licence|spdx", m.group(0), re.I):
            return doc.text[m.end() :].lstrip("\n")
        return doc.text


class ExactDedup(Step):
    """Exact file-level deduplication: the first copy of each text (sha256) is kept. Within
    one task; the hashes of everything kept stay in memory (32 bytes per file)."""

    name = "exact_dedup"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen: set[bytes] = set()

    def apply(self, doc):
        h = hashlib.sha256(doc.text.encode()).digest()
        if h in self.seen:
            return None
        self.seen.add(h)
        return doc.text


# ----------------------------------------------------------------------------------- Wikipedia


class StripWikitext(Step):
    """Wikipedia: hyperlinks reduced to their text; templates, comments, tags, tables and
    other markup removed (mwparserfromhell's strip_code)."""

    name = "strip_wikitext"

    def apply(self, doc):
        import mwparserfromhell

        text = mwparserfromhell.parse(doc.text).strip_code(normalize=True, collapse=True)
        text = "\n".join(line.strip() for line in text.splitlines())  # headings keep spaces
        text = re.sub(r"\n{3,}", "\n\n", text).strip()
        return text or None


# --------------------------------------------------------------------------------------- Books


class NearDuplicateBooks(Step):
    """Books: remove a book whose content overlaps an earlier kept one by more than `overlap`
    (the paper: 90%). Word 5-gram shingles, MinHash (128 permutations) and LSH find candidates;
    the overlap |A & B| / min(|A|, |B|) is estimated from the MinHash Jaccard J and the shingle
    counts as J (|A| + |B|) / ((1 + J) min(|A|, |B|)). Memory: one MinHash per kept book."""

    name = "near_duplicate_books"

    def __init__(self, overlap: float = 0.9, num_perm: int = 128, **kw):
        super().__init__(**kw)
        self.overlap, self.num_perm, self.kept, self.lsh = overlap, num_perm, {}, None

    def apply(self, doc):
        from datasketch import MinHash, MinHashLSH

        if self.lsh is None:  # candidates down to Jaccard 0.5 (overlap ~0.67 for equal sizes)
            self.lsh = MinHashLSH(threshold=0.5, num_perm=self.num_perm)
        words = doc.text.split()
        shingles = {" ".join(words[i : i + 5]) for i in range(max(1, len(words) - 4))}
        m = MinHash(num_perm=self.num_perm)
        m.update_batch([s.encode() for s in shingles])
        for key in self.lsh.query(m):
            other, n_other = self.kept[key]
            j = m.jaccard(other)
            if (
                j * (len(shingles) + n_other) / ((1 + j) * min(len(shingles), n_other))
                > self.overlap
            ):
                return None
        key = str(len(self.kept))
        self.kept[key] = (m, len(shingles))
        self.lsh.insert(key, m)
        return doc.text


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


class LineDedup(Step):
    """Line-level deduplication: a line whose normalized form appeared earlier (in this or an
    earlier document) is removed; a document left empty is removed.

    Memory is bounded: at most max_hashes 8-byte hashes live in a Python set (the default,
    2^22, is ~250 MB with the set's overhead); when it fills, its hashes are sorted and spilled
    to a file under spill_dir, memory-mapped, and looked up by binary search. Every line is
    checked against the set and every spilled run, so the result is exact whatever the budget.
    """

    name = "line_dedup"

    def __init__(self, max_hashes: int = 1 << 22, spill_dir: str | None = None, **kw):
        super().__init__(**kw)
        self.max_hashes, self.spill_dir = max_hashes, spill_dir
        self.seen: set[int] = set()
        self.runs: list = []  # sorted uint64 arrays on disk (np.memmap)

    def _seen(self, h: int) -> bool:
        import numpy as np

        if h in self.seen:
            return True
        key = np.uint64(h)
        for run in self.runs:
            i = int(np.searchsorted(run, key))
            if i < len(run) and run[i] == key:
                return True
        return False

    def _spill(self) -> None:
        import tempfile

        import numpy as np

        if self.spill_dir is None:
            self.spill_dir = tempfile.mkdtemp(prefix="line_dedup-")
        path = f"{self.spill_dir}/run-{len(self.runs):05d}.u64"
        np.array(sorted(self.seen), np.uint64).tofile(path)
        self.runs.append(np.memmap(path, np.uint64, "r"))
        self.seen.clear()

    def apply(self, doc):
        out = []
        for line in doc.text.split("\n"):
            norm = normalize_line(line)
            if not norm:
                out.append(line)
                continue
            h = int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little")
            if not self._seen(h):
                self.seen.add(h)
                out.append(line)
                if len(self.seen) >= self.max_hashes:
                    self._spill()
        text = "\n".join(out).strip()
        return text or None


class LanguageID(Step):
    """Keep documents in `lang` with probability >= min_prob, by langid.py's model (shipped in
    the package: nothing is downloaded)."""

    name = "language_id"

    def __init__(self, lang: str = "en", min_prob: float = 0.5, **kw):
        super().__init__(**kw)
        self.lang, self.min_prob, self.model = lang, min_prob, None

    def apply(self, doc):
        if self.model is None:
            from langid.langid import LanguageIdentifier, model

            self.model = LanguageIdentifier.from_modelstring(model, norm_probs=True)
        lang, prob = self.model.classify(doc.text)
        return doc.text if lang == self.lang and prob >= self.min_prob else None


C4_BOILERPLATE = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                  "use of cookies", "use cookies", "javascript")  # fmt: skip


class C4Heuristics(Step):
    """C4's rules (Raffel et al. 2020): keep lines that end in terminal punctuation and have at
    least 3 words, drop boilerplate lines (cookies, terms of use, javascript); drop a page with
    "lorem ipsum", a curly brace, a bad word, or fewer than 5 sentences left. C4's bad-word list
    (LDNOOBW) is not shipped: pass bad_words (a file path or a list)."""

    name = "c4_heuristics"

    def __init__(self, bad_words=(), min_sentences: int = 5, **kw):
        super().__init__(**kw)
        if isinstance(bad_words, str):
            with open(bad_words) as f:
                bad_words = [w.strip() for w in f if w.strip()]
        self.bad = {w.lower() for w in bad_words}
        self.min_sentences = min_sentences

    def apply(self, doc):
        low = doc.text.lower()
        if "lorem ipsum" in low or "{" in doc.text or self.bad & set(re.findall(r"\w+", low)):
            return None
        lines = [ln.strip() for ln in doc.text.split("\n")]
        keep = [ln for ln in lines if ln.endswith((".", "!", "?", '"')) and len(ln.split()) >= 3
                and not any(b in ln.lower() for b in C4_BOILERPLATE)]  # fmt: skip
        sentences = sum(len(re.findall(r"[.!?](?:\s|$)", ln)) for ln in keep)
        return "\n".join(keep) if sentences >= self.min_sentences else None


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
