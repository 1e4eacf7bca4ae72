"""Tokenizer, corpus preparation and the training-data loader.

  tokenizer.py       Tokenizer (any sentencepiece .model), train_tokenizer, check_vocab
  prepare.py         raw .txt/.jsonl/.parquet -> tokenized zarr token arrays + metadata.json
  default_corpus.py  ensure_default_dataset(): the Python stdlib sources as a built-in corpus
  loader.py          Loader: shuffled, resumable, per-process global batches

Submodules are imported on use: prepare's worker processes must not pay for importing JAX.
"""
