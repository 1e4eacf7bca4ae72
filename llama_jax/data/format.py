"""The prepared-dataset format, llama_jax.tokens/2: writing and opening it.

A dataset directory (local, or any tensorstore kvstore URL such as gs://... for reading):
  train/, val/      zarr v3 arrays of shape [tokens], uint16 when the vocab fits else uint32:
                    every document as BOS + its tokens + EOS, concatenated in input order (no
                    BOS for a tokenizer without one)
  tokenizer.model   a copy of the tokenizer the tokens were made with
  metadata.json     format, token/document counts per split, tokenizer sha256, vocab size, dtype,
                    sources

/2 added the BOS, as LLaMA trained and as inference prompts start; read_metadata refuses
any other version (/1: documents without BOS) with a request to re-run prepare_data.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np

FORMAT = "llama_jax.tokens/2"
SPLITS = ("train", "val")
ZARR_SHARD = 1 << 24  # tokens per zarr shard file (32 MiB at uint16)
ZARR_CHUNK = 1 << 13  # tokens per independently readable chunk inside a shard file


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def write_json(path: str, obj) -> None:
    """Writes to a temp file renamed into place: a reader never sees half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def _zarr_spec(path: str, size: int, dtype: str) -> dict:
    raw = [{"name": "bytes", "configuration": {"endian": "little"}}]
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": path},
        "metadata": {
            "shape": [size],
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [ZARR_SHARD]}},
            # Sharded so that a large dataset is few files, yet a window reads only ~16 KiB.
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": [ZARR_CHUNK],
                        "codecs": raw,
                        "index_codecs": raw + [{"name": "crc32c"}],
                    },
                }
            ],
        },
        "create": True,
    }


def write_split(path: str, parts: list, size: int, dtype: str) -> None:
    """Concatenates token parts (.npy paths or arrays) into one zarr array of `size` tokens at
    path, a zarr shard at a time."""
    import tensorstore as ts

    arr = ts.open(_zarr_spec(path, size, dtype)).result()
    buf, held, offset = [], 0, 0
    for f in parts + [None]:
        if f is not None:
            a = np.load(f) if isinstance(f, str) else f
            buf.append(a)
            held += a.size
        while held >= ZARR_SHARD or (f is None and held):
            flat = np.concatenate(buf)
            n = min(ZARR_SHARD, flat.size)
            arr[offset : offset + n].write(flat[:n]).result()
            offset += n
            buf, held = [flat[n:]], flat.size - n
    assert offset == size, (offset, size)


def write_token_dataset(
    output_dir: str,
    splits: dict[str, np.ndarray],
    *,
    vocab_size: int,
    tokenizer_sha256: str = "",
    **meta,
) -> dict:
    """Writes already-tokenized splits as a dataset (synthetic data, tests); returns metadata.
    The tokens are written as given: BOS/EOS framing is the caller's."""
    dtype = token_dtype(vocab_size)
    tmp = tempfile.mkdtemp(
        prefix=f".{os.path.basename(output_dir)}.tmp-",
        dir=os.path.dirname(os.path.abspath(output_dir)),
    )
    for split, tokens in splits.items():
        np.save(os.path.join(tmp, f"{split}.npy"), np.asarray(tokens, dtype=dtype))
        write_split(
            os.path.join(tmp, split), [os.path.join(tmp, f"{split}.npy")], len(tokens), dtype
        )
        os.remove(os.path.join(tmp, f"{split}.npy"))
    meta = dict(
        format=FORMAT,
        vocab_size=vocab_size,
        dtype=dtype,
        tokenizer_sha256=tokenizer_sha256,
        splits={s: {"tokens": len(t), "documents": 0} for s, t in splits.items()},
        **meta,
    )
    write_json(os.path.join(tmp, "metadata.json"), meta)
    os.rename(tmp, output_dir)
    return meta


def _is_url(dataset_dir: str) -> bool:
    return "://" in dataset_dir and not dataset_dir.startswith("file://")


def read_metadata(dataset_dir: str) -> dict:
    """metadata.json of a prepared dataset: a local dir or any tensorstore kvstore URL (gs://...).
    Raises if the dataset is missing or of another format version."""
    if _is_url(dataset_dir):
        import tensorstore as ts

        kv = ts.KvStore.open(dataset_dir.rstrip("/") + "/").result()
        result = kv.read("metadata.json").result()
        if result.state != "value":
            raise FileNotFoundError(f"no prepared dataset at {dataset_dir} (metadata.json missing)")
        return _check_format(dataset_dir, json.loads(bytes(result.value)))
    path = os.path.join(dataset_dir.removeprefix("file://"), "metadata.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no prepared dataset at {dataset_dir} (metadata.json missing); "
            "run python -m launch.prepare_data"
        )
    with open(path) as f:
        return _check_format(dataset_dir, json.load(f))


def _check_format(dataset_dir: str, meta: dict) -> dict:
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{dataset_dir} holds dataset format {meta.get('format')!r}, this version reads "
            f"{FORMAT!r}: re-run python -m launch.prepare_data"
        )
    return meta


def open_split(dataset_dir: str, split: str):
    """The split's token array as an opened tensorstore.TensorStore."""
    import tensorstore as ts

    if _is_url(dataset_dir):
        kvstore = dataset_dir.rstrip("/") + f"/{split}/"
    else:
        kvstore = {
            "driver": "file",
            "path": os.path.join(dataset_dir.removeprefix("file://"), split),
        }
    return ts.open({"driver": "zarr3", "kvstore": kvstore, "open": True}, read=True).result()


def fingerprint(dataset_dir: str, tokenizer_sha256: str) -> dict:
    """What a checkpoint records of the data it trained on: the tokenizer's sha256 and the
    sha256 of the prepared dataset's metadata (token counts, shards, sources), so a resumed run
    can tell a re-prepared dataset at the same path, or another tokenizer, from its own."""
    meta = json.dumps(read_metadata(dataset_dir), sort_keys=True).encode()
    return {
        "tokenizer_sha256": tokenizer_sha256,
        "metadata_sha256": hashlib.sha256(meta).hexdigest(),
    }
