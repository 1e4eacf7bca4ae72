"""The training run's data: the dataset (data.path, the default corpus, or data.mixture's
sources) and its tokenizer, the fingerprint checkpoints record, the training batches, and the
validation prompts the end-of-run samples continue."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from llama_jax.config import RunConfig
from llama_jax.data import instruct, mixture
from llama_jax.data.default_corpus import resolve_dataset
from llama_jax.data.format import fingerprint as format_fingerprint
from llama_jax.data.format import open_split
from llama_jax.data.loader import Loader
from llama_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def open_data(cfg: RunConfig) -> tuple[str, Tokenizer]:
    """(dataset dir, tokenizer): data.path's (or the default corpus), or the first source of
    data.mixture (whose tokenizer every source must share)."""
    path = cfg.data.path
    if cfg.data.mixture:
        path = next(iter(mixture.parse(cfg.data.mixture).values()))[0]
    dataset_dir, tokenizer_path = resolve_dataset(path, cfg.data.tokenizer, cfg.model.vocab_size)
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer vocab {tokenizer.vocab_size} ({tokenizer_path}) is larger "
            f"than model.vocab_size={cfg.model.vocab_size}"
        )
    return dataset_dir, tokenizer


def document_bos(cfg: RunConfig, tokenizer: Tokenizer) -> int | None:
    """data.document_masking: the BOS id that starts each document in the token stream."""
    if not cfg.data.document_masking:
        return None
    if tokenizer.bos_id < 0:
        raise ValueError("data.document_masking needs a tokenizer with a BOS piece")
    return tokenizer.bos_id


def fingerprint(cfg: RunConfig, dataset_dir: str, tokenizer: Tokenizer) -> dict:
    """The data a checkpoint records: data.format.fingerprint, of every mixture source."""
    if not cfg.data.mixture:
        return format_fingerprint(dataset_dir, tokenizer.sha256)
    parts = {name: format_fingerprint(path, tokenizer.sha256)["metadata_sha256"]
             for name, (path, _) in mixture.parse(cfg.data.mixture).items()}  # fmt: skip
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return {"tokenizer_sha256": tokenizer.sha256, "metadata_sha256": digest}


def train_loader(cfg: RunConfig, sharding, dataset_dir: str, tokenizer: Tokenizer, start: int):
    """The training batches: of data.path, or of data.mixture's sources in proportion."""
    kw = dict(
        batch_size=cfg.train.batch_size,
        seq_len=cfg.train.seq_len,
        seed=cfg.train.data_order_seed,
        sharding=sharding,
        step=start,
        prefetch=cfg.data.prefetch,
        expected_vocab_size=cfg.model.vocab_size,
        expected_tokenizer_sha=tokenizer.sha256,
        document_bos=document_bos(cfg, tokenizer),
    )
    sources = mixture.parse(cfg.data.mixture) if cfg.data.mixture else {"": (dataset_dir, 1)}
    for path, _ in sources.values():
        instruct.check_trainable(path)
    if not cfg.data.mixture:
        return Loader(dataset_dir, "train", **kw)
    loader = mixture.MixtureLoader(sources, "train", **kw)
    plan = loader.planned_epochs(cfg.train.steps)
    log.info("mixture over %d steps: %s", cfg.train.steps, "; ".join(
        f"{n} {w:.1%} ({plan[n]:.2f} epochs)" for n, w in zip(loader.names, loader.weights)))  # fmt: skip
    return loader


def val_prompts(
    dataset_dir: str, tokenizer: Tokenizer, n: int, length: int = 12
) -> list[list[int]]:
    """The first `length` tokens of n documents spread over the validation split: prompts
    from text the model never trained on. Documents start at BOS (after EOS for a tokenizer
    without one); an empty split gives no prompts."""

    split = open_split(dataset_dir, "val")
    tokens = np.asarray(split[: min(split.shape[0], 1 << 20)].read().result()).astype(np.int64)
    if tokenizer.bos_id >= 0 and (tokens == tokenizer.bos_id).any():
        starts = np.flatnonzero(tokens == tokenizer.bos_id)
    else:
        starts = np.concatenate([[0], np.flatnonzero(tokens == tokenizer.eos_id) + 1])
        starts = starts[starts < len(tokens)]
    if n <= 0 or not len(starts):
        return []
    picks = starts[np.linspace(0, len(starts) - 1, num=min(n, len(starts))).astype(int)]
    prompts = []
    for s in picks:
        p = tokens[s : s + length].tolist()
        p = p[: p.index(tokenizer.eos_id)] if tokenizer.eos_id in p else p
        if p:
            prompts.append(p)
    return prompts
