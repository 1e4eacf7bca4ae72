"""SentencePiece BPE tokenizer: training with the paper's options, and one class to load any .model.

LLaMA's tokenizer is a sentencepiece BPE model with digits split into single tokens and byte
fallback (characters outside the vocabulary become <0xNN> byte pieces instead of <unk>), with
unk=0, bos=1, eos=2 and no pad piece. `train_tokenizer` reproduces its trainer spec (only the
vocabulary size and thread count differ), so the released LLaMA tokenizer.model and a model
trained here load through the same `Tokenizer` class.

Round-trip: with identity normalization and byte fallback, decode(encode(s)) == s for every
string, except that U+2581 (the "▁" sentencepiece uses to mark spaces) decodes to a space; the
released LLaMA tokenizer has the same property.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from llama_jax.data.sources import expand_inputs, iter_documents

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, -1

# The released LLaMA tokenizer.model's trainer spec, minus what depends on the corpus.
LLAMA_TRAINER_OPTIONS = dict(
    model_type="bpe",
    split_digits=True,
    byte_fallback=True,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    pad_id=PAD_ID,
    normalization_rule_name="identity",  # no NFKC: text must round-trip byte for byte
    remove_extra_whitespaces=False,  # code indentation and double spaces are data
    add_dummy_prefix=True,
    allow_whitespace_only_pieces=True,
    character_coverage=0.99995,
    max_sentencepiece_length=16,
    max_sentence_length=4192,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    vocabulary_output_piece_score=True,
    hard_vocab_limit=True,
)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """A loaded sentencepiece model (ours or the released LLaMA tokenizer.model)."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.sha256 = sha256_file(model_path)

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()  # -1 for LLaMA: padding is masked by the caller, not a token

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, the UTF-8 byte offset in text where each id's piece starts)."""
        pieces = self.sp.encode_as_proto(text).pieces  # begin: byte offset of the piece
        return [p.id for p in pieces], [p.begin for p in pieces]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts in one call (sentencepiece loops in C++)."""
        return self.sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        sha = self.sha256[:12]
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size}, sha256={sha})"


def check_vocab(tokenizer_or_meta, model_vocab_size: int) -> int:
    """Raises if the tokenizer (a Tokenizer, dataset metadata dict or int) has more ids than
    the model's embedding table; returns the tokenizer's vocab size."""
    if isinstance(tokenizer_or_meta, Tokenizer):
        vocab, what = tokenizer_or_meta.vocab_size, tokenizer_or_meta.model_path
    elif isinstance(tokenizer_or_meta, dict):
        vocab, what = int(tokenizer_or_meta["vocab_size"]), "the dataset's tokenizer"
    else:
        vocab, what = int(tokenizer_or_meta), "the tokenizer"
    if vocab > model_vocab_size:
        raise ValueError(
            f"tokenizer vocab_size={vocab} ({what}) is larger than "
            f"model.vocab_size={model_vocab_size}; "
            f"token ids would index past the embedding table: set model.vocab_size >= {vocab}"
        )
    return vocab


def _sample_lines(
    documents: Iterable[str], max_sentences: int, max_bytes: int, seed: int
) -> list[str]:
    """A reservoir sample of non-blank lines: sentencepiece trains on lines ("sentences"), and
    sampling here (seeded) keeps the result independent of sentencepiece's own sampler."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for doc in documents:
        for line in doc.split("\n"):
            if not line.strip() or len(line.encode("utf-8", "replace")) > max_bytes:
                continue
            seen += 1
            if len(sample) < max_sentences:
                sample.append(line)
            else:
                j = rng.randrange(seen)
                if j < max_sentences:
                    sample[j] = line
    return sample


def train_tokenizer(
    inputs: str | Sequence[str],
    vocab_size: int,
    output_dir: str,
    *,
    text_field: str = "text",
    model_name: str = "tokenizer",
    max_sentences: int = 2_000_000,
    seed: int = 0,
    num_threads: int = 8,
    **options,
) -> str:
    """Trains a LLaMA-style BPE sentencepiece model on the documents of `inputs`.

    Args:
      inputs: files, directories or globs (.txt, .jsonl, .jsonl.gz, .parquet), as for prepare().
      vocab_size: number of pieces, including the 3 specials and 256 byte-fallback pieces.
      output_dir: gets <model_name>.model and .vocab (written atomically).
      max_sentences: lines sampled (seeded reservoir) from the corpus to train on.
      num_threads: sentencepiece trainer threads. A constant rather than os.cpu_count(): the
        count is recorded in the .model file, and the same corpus must give the same file
        (same sha256) on every machine, e.g. each host of a job building the default corpus.
      options: overrides of LLAMA_TRAINER_OPTIONS (any sentencepiece trainer flag).
    Returns:
      The path of the .model file.
    """
    if vocab_size < 260:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte fallback alone needs 256 + 3 ids"
        )
    files = expand_inputs(inputs)
    docs = (doc for f in files for doc, _ in iter_documents(f, text_field))
    opts = {**LLAMA_TRAINER_OPTIONS, **options}
    lines = _sample_lines(docs, max_sentences, opts["max_sentence_length"], seed)
    if not lines:
        raise ValueError(f"no text to train a tokenizer on: all {len(files)} input files are empty")
    os.makedirs(output_dir, exist_ok=True)
    # A BytesIO, not model_prefix: the file would record that (temp) path, changing its hash.
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=vocab_size,
            input_sentence_size=0,  # already sampled above
            num_threads=num_threads,
            minloglevel=2,
            **opts,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars"
        raise ValueError(f"sentencepiece training failed: {str(e).splitlines()[0]}") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    base = os.path.join(output_dir, model_name)
    for ext, data in ((".vocab", vocab.encode("utf-8")), (".model", model.getvalue())):
        with open(base + ext + ".tmp", "wb") as f:  # temp + rename: never a half-written .model
            f.write(data)
        os.replace(base + ext + ".tmp", base + ext)
    return os.path.join(output_dir, model_name + ".model")
