"""Tokenizer, corpus preparation and the training-data loader.

  sources.py         reading raw .txt/.jsonl[.gz]/.parquet files as (text, replaced bytes) documents
  tokenizer.py       Tokenizer (any sentencepiece .model), train_tokenizer, check_vocab
  format.py          the dataset on disk (llama_jax.tokens/2: each document BOS + tokens + EOS in
                     zarr token arrays, plus metadata.json): write_token_dataset, open_split
  prepare.py         prepare(): raw documents -> a tokenized dataset, in resumable worker shards
  default_corpus.py  ensure_default_dataset(): the Python stdlib sources as a built-in corpus
  loader.py          Loader: shuffled, resumable, per-process global batches

Imports run one way: sources and format import nothing of the package, tokenizer imports
sources, and prepare, loader and default_corpus build on those (default_corpus also on prepare).
This package imports no submodule itself: prepare's worker processes must not pay for JAX.
"""
