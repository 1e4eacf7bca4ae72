"""Instruction data: rows rendered by a named template into tokens with a loss mask, packed
several examples per training row.

Rows (JSONL, one per line): Alpaca style {"instruction", "input" (optional), "output"}, or chat
style {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}. A
template turns a row into sequences of segments (text, trained?). Each sequence is encoded as
one string in one tokenizer call, as Meta's chat_completion and Stanford's train.py encode
theirs, so the ids are theirs (encoding segments one by one would put sentencepiece's dummy
prefix "▁" before every response). The loss mask is 1 on the tokens that start inside a
response (by the tokenizer's byte offsets) and on the EOS that ends each response, 0 on
everything the model is given.

Packing: examples go into rows of seq_len + 1 tokens in input order, each into the first row
with room (first fit); segment_ids number the examples of a row from 1 (0 = padding), so the
loader gives attention a document mask and positions that restart at 0 in each example.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from llama_jax.data import format as fmt
from llama_jax.data.tokenizer import Tokenizer

Segments = list[tuple[str, bool]]  # (text, is a response the model learns to produce)

ALPACA_INTRO = (
    "Below is an instruction that describes a task{}. Write a response that appropriately "
    "completes the request.\n\n"
)


def alpaca(row: dict) -> list[Segments]:
    """Stanford Alpaca's prompt (with or without an input) and the output as the response,
    joined as their train.py joins them: the output right after "### Response:", then EOS."""
    _need(row, "instruction", "output")
    if row.get("input"):
        prompt = (
            ALPACA_INTRO.format(", paired with an input that provides further context")
            + f"### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}\n\n"
            "### Response:"
        )
    else:
        prompt = (
            ALPACA_INTRO.format("") + f"### Instruction:\n{row['instruction']}\n\n### Response:"
        )
    return [[(prompt, False), (row["output"], True)]]


def llama2_chat(row: dict) -> list[Segments]:
    """Llama 2 chat: each user turn (the system prompt folded into the first) and its answer are
    one BOS ... EOS sequence, "[INST] {user} [/INST] {answer} ", as Meta's chat_completion."""
    messages = _messages(row)
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n", messages[1:]
    turns = []
    for i in range(0, len(messages), 2):
        user, answer = messages[i], messages[i + 1] if i + 1 < len(messages) else None
        if user["role"] != "user" or answer is None or answer["role"] != "assistant":
            raise ValueError("messages must alternate user, assistant (after an optional system)")
        prompt = f"[INST] {((system if i == 0 else '') + user['content']).strip()} [/INST]"
        turns.append([(prompt, False), (f" {answer['content'].strip()} ", True)])
    return turns


def chatml_of_alpaca(row: dict) -> dict:
    """An Alpaca row as chat messages, so every template reads both kinds of rows."""
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": row["output"]}]}  # fmt: skip


TEMPLATES: dict[str, Callable[[dict], list[Segments]]] = {
    "alpaca": alpaca,
    "llama2_chat": llama2_chat,
}
ROLES = ("system", "user", "assistant")


def _need(row: dict, *fields: str) -> None:
    missing = [f for f in fields if not isinstance(row.get(f), str)]
    if missing:
        raise ValueError(f"row has no {' or '.join(missing)} field (a string); keys: {list(row)}")
    if not row[fields[-1]].strip():
        raise ValueError(f"empty response ({fields[-1]!r})")


def _messages(row: dict) -> list[dict]:
    if "messages" not in row:
        _need(row, "instruction", "output")
        row = chatml_of_alpaca(row)
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content}")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"unknown role {m.get('role') if isinstance(m, dict) else m!r}; "
                             f"valid: {list(ROLES)}")  # fmt: skip
        if not isinstance(m.get("content"), str):
            raise ValueError(f"a {m['role']} message has no 'content' string")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError("empty response (an assistant message with no content)")
    return messages


def render(row: dict, template: str, tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, loss_mask) of one row: each sequence of the template is BOS + its segments +
    EOS, the EOS trained when it ends a response."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; valid: {sorted(TEMPLATES)}")
    tokens, mask = [], []
    for sequence in TEMPLATES[template](row):
        ids, starts = tok.encode_offsets("".join(text for text, _ in sequence))
        spans, at = [], 0  # byte ranges of the responses in the joined text
        for text, response in sequence:
            n = len(text.encode("utf-8"))
            if response:
                spans.append((at, at + n))
            at += n
        learn = [int(any(a <= s < b for a, b in spans)) for s in starts]
        bos = [tok.bos_id] if tok.bos_id >= 0 else []
        tokens += bos + ids + [tok.eos_id]
        mask += [0] * len(bos) + learn + [int(sequence[-1][1])]
    return np.asarray(tokens, np.int64), np.asarray(mask, np.uint8)


def prompt(text: str, template: str, tok: Tokenizer) -> np.ndarray:
    """The tokens a template gives the model before a response to `text` (one user turn), as
    training rendered them: the model continues with the response."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; valid: {sorted(TEMPLATES)}")
    sequence = TEMPLATES[template]({"instruction": text, "output": "?"})[-1]
    given = "".join(piece for piece, _ in sequence[: [r for _, r in sequence].index(True)])
    ids = [tok.bos_id] if tok.bos_id >= 0 else []
    return np.asarray(ids + tok.encode(given), np.int64)


def read_rows(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a JSONL file; a line that is not a JSON object is an error."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: a row must be a JSON object")
            yield lineno, row


class Packed(NamedTuple):
    tokens: np.ndarray  # [rows * row_len]
    loss_mask: np.ndarray  # uint8, same length
    segment_ids: np.ndarray  # uint16, same length: example number within its row, 0 = padding
    examples: int
    truncated: int  # examples longer than a row, cut to it
    no_response: int  # examples cut so short that no response token is left: nothing to learn

    @property
    def efficiency(self) -> float:
        """The fraction of tokens that are not padding."""
        return float(np.mean(self.segment_ids > 0)) if len(self.segment_ids) else 0.0


def pack(examples: list[tuple[np.ndarray, np.ndarray]], row_len: int, pad_id: int) -> Packed:
    """First-fit packing of (tokens, loss_mask) examples into rows of row_len tokens."""
    rows: list[list[int]] = []  # per row: indices of its examples
    room: list[int] = []
    truncated = 0
    for i, (t, _) in enumerate(examples):
        n = min(len(t), row_len)
        truncated += len(t) > row_len
        j = next((r for r, free in enumerate(room) if free >= n), None)
        if j is None:
            rows.append([]), room.append(row_len)
            j = len(rows) - 1
        rows[j].append(i)
        room[j] -= n
    tokens = np.full(len(rows) * row_len, pad_id, np.int64)
    mask = np.zeros(len(rows) * row_len, np.uint8)
    seg = np.zeros(len(rows) * row_len, np.uint16)
    for r, members in enumerate(rows):
        at = r * row_len
        for k, i in enumerate(members, 1):
            t, m = examples[i][0][:row_len], examples[i][1][:row_len]
            tokens[at : at + len(t)], mask[at : at + len(t)], seg[at : at + len(t)] = t, m, k
            at += len(t)
    learned = response_tokens(mask, seg, row_len)
    return Packed(tokens, mask, seg, len(examples), truncated, int((learned == 0).sum()))


def response_tokens(mask: np.ndarray, segments: np.ndarray, row_len: int) -> np.ndarray:
    """The trained tokens of each packed example (a run of one segment id within a row)."""
    if not len(segments):
        return np.zeros(0, np.int64)
    key = (np.arange(len(segments)) // row_len) * (1 << 16) + segments.astype(np.int64)
    starts = np.flatnonzero(np.diff(key, prepend=-1) != 0)
    real = segments[starts] > 0
    return np.add.reduceat(mask.astype(np.int64), starts)[real]


def check_trainable(dataset_dir: str) -> None:
    """Raises (one line) when a packed split's examples leave nothing to learn: no loss token
    at all (training would log loss 0.0 and look converged), or most examples cut to a row so
    short that their whole response is gone."""
    meta = fmt.read_metadata(dataset_dir)
    packed = meta.get("packed")
    for split in meta["splits"] if packed else ():
        if not meta["splits"][split]["documents"]:
            continue
        mask, seg = (np.asarray(fmt.open_split(dataset_dir, f"{split}.{name}").read().result())
                     for name in ("loss_mask", "segment_ids"))  # fmt: skip
        learned = response_tokens(mask, seg, packed["row_len"])
        lost = int((learned == 0).sum())
        why = (f"cut to rows of {packed['row_len']} tokens: prepare it again with a larger "
               "--seq-len (and train.seq_len), or drop the long rows")  # fmt: skip
        if not learned.sum():
            raise ValueError(f"{dataset_dir}: the {split!r} split has no loss token (no "
                             f"response token in any of its {len(learned)} examples), {why}")  # fmt: skip
        if 2 * lost > len(learned):
            raise ValueError(f"{dataset_dir}: {lost} of the {split!r} split's {len(learned)} "
                             f"examples lost their whole response, {why}")  # fmt: skip


def positions_and_mask(segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For [B, T+1] segment ids of windows: positions [B, T] of the inputs, restarting at 0 at
    each segment start, and [B, T] 0/1 of targets in the same (non-padding) segment as their
    input, so no example is trained to predict the next one's first token."""
    inputs, targets = segments[:, :-1], segments[:, 1:]
    T = inputs.shape[1]
    idx = np.broadcast_to(np.arange(T), inputs.shape)
    start = np.ones(inputs.shape, bool)
    start[:, 1:] = inputs[:, 1:] != inputs[:, :-1]
    first = np.maximum.accumulate(np.where(start, idx, 0), axis=1)
    same = (inputs == targets) & (targets > 0)
    return (idx - first).astype(np.int32), same.astype(np.float32)


def prepare(
    input_path: str,
    tokenizer_path: str,
    output_dir: str,
    template: str,
    seq_len: int,
    val_fraction: float = 0.05,
) -> dict:
    """Renders, packs and writes an instruction dataset (train/val splits of rows of seq_len + 1
    tokens, with loss_mask and segment_ids arrays beside the tokens); returns its metadata."""
    tok = Tokenizer(tokenizer_path)
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; valid: {sorted(TEMPLATES)}")
    examples = []
    for lineno, row in read_rows(input_path):
        try:
            examples.append(render(row, template, tok))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{input_path}:{lineno}: {e}") from None
    if not examples:
        raise ValueError(f"{input_path}: no rows")
    n_val = min(len(examples) - 1, round(len(examples) * val_fraction)) if val_fraction else 0
    val_ids = set(np.linspace(0, len(examples) - 1, n_val).astype(int).tolist()) if n_val else set()
    splits = {
        "train": [e for i, e in enumerate(examples) if i not in val_ids],
        "val": [e for i, e in enumerate(examples) if i in val_ids],
    }
    tmp = tempfile.mkdtemp(prefix=".instruct-", dir=os.path.dirname(os.path.abspath(output_dir)))
    dtype, meta_splits, packed = fmt.token_dtype(tok.vocab_size), {}, {}
    for name, exs in splits.items():
        p = pack(exs, seq_len + 1, tok.eos_id)
        for suffix, arr, dt in (("", p.tokens, dtype), (".loss_mask", p.loss_mask, "uint8"),
                                (".segment_ids", p.segment_ids, "uint16")):  # fmt: skip
            fmt.write_split(os.path.join(tmp, name + suffix), [arr.astype(dt)], len(arr), dt)
        meta_splits[name] = {"tokens": len(p.tokens), "documents": p.examples}
        packed[name] = {"efficiency": round(p.efficiency, 4), "truncated": p.truncated,
                        "no_response": p.no_response}  # fmt: skip
    shutil.copy(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
    meta = {
        "format": fmt.FORMAT,
        "vocab_size": tok.vocab_size,
        "dtype": dtype,
        "tokenizer_sha256": tok.sha256,
        "splits": meta_splits,
        "packed": {"row_len": seq_len + 1, "template": template, "source": input_path, **packed},
    }
    fmt.write_json(os.path.join(tmp, "metadata.json"), meta)
    if os.path.exists(output_dir):
        raise FileExistsError(f"{output_dir} exists; choose a new --output")
    os.rename(tmp, output_dir)
    return meta


def summary_line(meta: dict, output_dir: str) -> str:
    p, s = meta["packed"], meta["splits"]
    rows = lambda n: s[n]["tokens"] // p["row_len"]  # noqa: E731
    cut = lambda k: p["train"].get(k, 0) + p["val"].get(k, 0)  # noqa: E731
    return (
        f"prepared {s['train']['documents'] + s['val']['documents']} examples (template "
        f"{p['template']}): train {s['train']['documents']} in {rows('train')} rows of "
        f"{p['row_len']} tokens, packing efficiency {p['train']['efficiency']:.1%} (non-pad "
        f"tokens); val {s['val']['documents']} in {rows('val')} rows; "
        f"{cut('truncated')} examples cut to a row, {cut('no_response')} of them with no "
        f"response token left -> {output_dir}"
    )
