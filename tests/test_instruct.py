"""Instruction data: templates, loss masks, packing with document masking."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.data import instruct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CharTokenizer:
    """A stand-in tokenizer with known ids: character c is ord(c) + 3, BOS 1, EOS 2. The
    templates' exact token ids are then fixed by the test alone (a sentencepiece model's ids
    depend on the text it was trained on)."""

    bos_id, eos_id = 1, 2

    def encode(self, text):
        return [ord(c) + 3 for c in text]

    def encode_offsets(self, text):
        starts = np.cumsum([0] + [len(c.encode()) for c in text])[:-1]
        return self.encode(text), starts.tolist()


def ids(text):
    return [ord(c) + 3 for c in text]


def test_alpaca_template_pins_ids_and_mask():
    """Stanford Alpaca's prompt with an input, byte for byte; the mask is 1 on the output and
    the EOS after it, 0 on BOS and the whole prompt."""
    row = {"instruction": "Add.", "input": "2 3", "output": "5"}
    tokens, mask = instruct.render(row, "alpaca", CharTokenizer())
    prompt = (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n2 3\n\n### Response:"
    )
    assert tokens.tolist() == [1, *ids(prompt), *ids("5"), 2]
    assert mask.tolist() == [0] * (1 + len(prompt)) + [1, 1]
    no_input = instruct.render({"instruction": "Hi", "output": "Yo"}, "alpaca", CharTokenizer())
    prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nHi\n\n### Response:"
    )
    assert no_input[0].tolist() == [1, *ids(prompt), *ids("Yo"), 2]


def test_llama2_chat_template_pins_ids_and_mask():
    """Meta's chat_completion format: the system prompt folded into the first user turn, each
    (user, answer) pair one BOS ... EOS sequence; only answers and their EOS are trained."""
    row = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"},
                        {"role": "user", "content": " Bye "},
                        {"role": "assistant", "content": "Ciao"}]}  # fmt: skip
    tokens, mask = instruct.render(row, "llama2_chat", CharTokenizer())
    p1 = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    p2 = "[INST] Bye [/INST]"
    want = [1, *ids(p1), *ids(" Hello "), 2, 1, *ids(p2), *ids(" Ciao "), 2]
    assert tokens.tolist() == want
    learn = [0] * (1 + len(p1)) + [1] * 8 + [0] * (1 + len(p2)) + [1] * 7
    assert mask.tolist() == learn


# Independent re-implementations of the published encodings, on sentencepiece directly.
DIALOGS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "You are terse.\nAnswer in one word."},
     {"role": "user", "content": "  Capital of France? "},
     {"role": "assistant", "content": " Paris. "},
     {"role": "user", "content": "And of Japan (\u65e5\u672c)?"},
     {"role": "assistant", "content": "Tokyo, caf\u00e9 capital."}],
    [{"role": "user", "content": "def f(x):\n    return x"},
     {"role": "assistant", "content": "It returns x.\n\n```python\nf(1)\n```"},
     {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Identity."},
     {"role": "user", "content": "ok"}, {"role": "assistant", "content": "Good!"}],
]  # fmt: skip
ALPACA_ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a fruit.", "input": "", "output": "An apple."},
    {"instruction": "Translate to French: cat", "output": " le chat (f\u00e9lin)\n"},
    {"instruction": "Write code.", "input": "sum of a list", "output": "def s(x):\n    return sum(x)"},
]  # fmt: skip


def meta_chat_ids(sp, dialog):
    """Meta's llama/generation.py chat_completion for a dialog that ends with an answer: the
    system prompt folded into the first user message, then per (user, answer) pair
    tokenizer.encode(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ", bos, eos)."""
    B_INST, E_INST, B_SYS, E_SYS = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        first = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": "user", "content": first}] + dialog[2:]
    ids = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {(user['content']).strip()} {E_INST} {(answer['content']).strip()} "
        ids += [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    return ids


STANFORD_PROMPTS = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
    ),
}


def stanford_ids_and_labels(sp, row):
    """Stanford Alpaca's train.py: source = PROMPT_DICT[...].format_map(row), target = output +
    eos_token, tokenized as source + target by LLaMA's tokenizer (BOS, then the text, then the
    "</s>" special token: EOS); labels IGNORE the first len(tokenize(source)) tokens."""
    key = "prompt_input" if row.get("input", "") != "" else "prompt_no_input"
    source = STANFORD_PROMPTS[key].format_map(row)
    ids = [sp.bos_id()] + sp.encode(source + row["output"]) + [sp.eos_id()]
    source_len = 1 + len(sp.encode(source))
    return ids, [0] * source_len + [1] * (len(ids) - source_len)


def test_llama2_chat_ids_equal_metas(tiny_dataset):
    """Every dialog's ids equal Meta's, id for id (one encode per turn: no extra dummy-prefix
    "\u2581" before a response); the loss mask covers exactly the answer's tokens and EOS,
    and the prompt for a new user turn is Meta's last-turn encoding."""
    import sentencepiece as spm

    from llama_jax.data.tokenizer import Tokenizer

    sp, tok = spm.SentencePieceProcessor(model_file=tiny_dataset[1]), Tokenizer(tiny_dataset[1])
    for dialog in DIALOGS:
        tokens, mask = instruct.render({"messages": dialog}, "llama2_chat", tok)
        assert tokens.tolist() == meta_chat_ids(sp, dialog)
        # the trained tokens decode to the answers (and their EOS), nothing of the prompts
        answers = [m["content"].strip() for m in dialog if m["role"] == "assistant"]
        trained = np.split(tokens, np.flatnonzero(np.diff(mask.astype(int)) == 1) + 1)[1:]
        picked = [t[: int(np.argmax(t == tok.eos_id)) + 1] for t in trained]
        assert [sp.decode(t[:-1].tolist()).strip() for t in picked] == answers
        assert all(t[-1] == tok.eos_id for t in picked) and mask.sum() == sum(map(len, picked))
    ask = "  Capital of France? "
    want = [sp.bos_id()] + sp.encode(f"[INST] {ask.strip()} [/INST]")
    assert instruct.prompt(ask, "llama2_chat", tok).tolist() == want


def test_alpaca_ids_and_labels_equal_stanfords(tiny_dataset):
    """Every row's ids and loss mask equal Stanford's train.py preprocessing, id for id; the
    generation prompt is Stanford's source."""
    import sentencepiece as spm

    from llama_jax.data.tokenizer import Tokenizer

    sp, tok = spm.SentencePieceProcessor(model_file=tiny_dataset[1]), Tokenizer(tiny_dataset[1])
    for row in ALPACA_ROWS:
        tokens, mask = instruct.render(row, "alpaca", tok)
        ids, labels = stanford_ids_and_labels(sp, row)
        assert tokens.tolist() == ids, row
        assert mask.tolist() == labels, row
    source = STANFORD_PROMPTS["prompt_no_input"].format_map({"instruction": "Name a fruit."})
    want = [sp.bos_id()] + sp.encode(source)
    assert instruct.prompt("Name a fruit.", "alpaca", tok).tolist() == want


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"instruction": "x"}', "no output"),
        ('{"instruction": "x", "output": "  "}', "empty response"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "unknown role 'bot'"),
        ("[1, 2]", "must be a JSON object"),
        ("{oops", "not JSON"),
    ],
)
def test_bad_rows_are_one_line_errors_with_file_and_line(tmp_path, tiny_dataset, capsys,
                                                         line, message):  # fmt: skip
    from launch.prepare_data import main

    rows = tmp_path / "rows.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"})
    rows.write_text(f"{good}\n{good}\n{line}\n")
    template = "llama2_chat" if "messages" in line else "alpaca"
    with pytest.raises(SystemExit) as e:
        main(["--format", "instruction", "--template", template, "--input", str(rows),
              "--tokenizer", tiny_dataset[1], "--output", str(tmp_path / "out"),
              "--seq-len", "32"])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert f"{rows}:3: " in err and message in err, err


def test_pack_first_fit_segments_and_efficiency():
    """Examples of 5, 7, 4 and 12 tokens into rows of 12: [5, 7], [4], [12]; segment ids count
    examples per row from 1, padding is 0, and efficiency = 28 real / 36 tokens."""
    ex = [(np.full(n, n), np.ones(n, np.uint8)) for n in (5, 7, 4, 12)]
    p = instruct.pack(ex, 12, pad_id=0)
    seg = p.segment_ids.reshape(3, 12)
    assert seg[0].tolist() == [1] * 5 + [2] * 7
    assert seg[1].tolist() == [1] * 4 + [0] * 8
    assert seg[2].tolist() == [1] * 12
    assert p.efficiency == pytest.approx(28 / 36) and p.truncated == 0


def test_positions_restart_and_no_target_crosses_examples():
    seg = np.array([[1, 1, 1, 2, 2, 0, 0]])
    positions, same = instruct.positions_and_mask(seg)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0]]
    # targets: the 2nd and 3rd of example 1, (first of example 2: no), 2nd of 2, (pad), (pad)
    assert same.tolist() == [[1, 1, 0, 1, 0, 0]]


def _tiny_model(impl):
    from llama_jax.config import ModelConfig
    from llama_jax.model.llama import Llama

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=8,
                      max_seq_len=32, dtype="float32", attention_impl=impl, attn_block_q=4,
                      attn_block_k=4, remat_policy="none", init_std=0.2)  # fmt: skip
    model = Llama(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
    return model, params


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_packed_example_sees_only_itself(impl):
    """Example B's logits are the same packed after A (segment 2, positions from 0) as alone.
    Bound: float32 attention whose sums differ only in masked (exactly zero) terms and in
    reduction order over <= 16 keys: ~16 eps ~ 2e-6 relative per layer; 1e-5 (and 1e-5
    absolute for logits near 0) holds over 2 layers, while attending across the boundary
    changes B's logits by ~1e-1 (checked below)."""
    model, params = _tiny_model(impl)
    rng = np.random.default_rng(0)
    a, b = rng.integers(3, 64, 5), rng.integers(3, 64, 11)
    packed = jnp.asarray(np.concatenate([a, b]))[None]
    seg = jnp.asarray([1] * 5 + [2] * 11)[None]
    pos = jnp.asarray(list(range(5)) + list(range(11)))[None]
    both = model.apply({"params": params}, packed, pos, seg)[0, 5:]
    alone = model.apply({"params": params}, jnp.asarray(b)[None])[0]
    np.testing.assert_allclose(both, alone, rtol=1e-5, atol=1e-5)
    leaky = model.apply({"params": params}, packed, pos, jnp.ones_like(seg))[0, 5:]
    assert np.abs(leaky - alone).max() > 1e-2  # the mask is what keeps them apart


@pytest.fixture(scope="module")
def instruction_data(tmp_path_factory, tiny_dataset):
    root = tmp_path_factory.mktemp("instruct")
    rows = [{"instruction": f"Say {w} {k} times.", "output": " ".join([w] * k)} for k in (1, 2, 3)
            for w in ("red", "green", "blue", "cyan", "black", "white", "pink", "gray")]  # fmt: skip
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = instruct.prepare(str(root / "rows.jsonl"), tiny_dataset[1], str(root / "data"),
                            "alpaca", seq_len=255, val_fraction=0.25)  # fmt: skip
    return str(root / "data"), meta


def test_prepared_rows_and_loader(instruction_data):
    """The loader reads packed rows whole (stride seq_len + 1) with loss_mask, segment_ids and
    positions; every trained target is a response token or EOS of its own example."""
    from llama_jax.data.loader import Loader
    from llama_jax.data.tokenizer import Tokenizer

    data, meta = instruction_data
    p = meta["packed"]
    assert p["row_len"] == 256 and p["train"]["truncated"] == 0, p
    assert 0.5 < p["train"]["efficiency"] <= 1, p  # 18 examples of ~110 tokens, 2 a row
    loader = Loader(data, "train", batch_size=2, seq_len=255, prefetch=0)
    b = loader.batch(0)
    assert set(b) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
    tok = Tokenizer(os.path.join(data, "tokenizer.model"))
    colors = {"red", "green", "blue", "cyan", "black", "white", "pink", "gray"}
    for r in range(2):
        trained = b["targets"][r][b["loss_mask"][r] > 0]
        assert (trained == tok.eos_id).sum() == len(set(b["segment_ids"][r]) - {0})
        for seg in set(b["segment_ids"][r]) - {0}:  # each example's trained targets: its output
            mine = b["targets"][r][(b["loss_mask"][r] > 0) & (b["segment_ids"][r] == seg)]
            text = tok.decode([t for t in mine if t != tok.eos_id])
            assert text.strip() and set(text.split()) <= colors, text
    with pytest.raises(ValueError, match="packed in rows of 256 tokens: set train.seq_len=255"):
        Loader(data, "train", batch_size=2, seq_len=32, prefetch=0)


@pytest.mark.slow
def test_prompt_targets_do_not_count(instruction_data):
    """Changing the target of a prompt token leaves the loss unchanged, bit for bit; changing
    the target of a response token changes it."""
    from llama_jax.config import load
    from llama_jax.data.loader import Loader
    from llama_jax.parallel.sharding import make_mesh
    from llama_jax.train.step import create_train_state, make_eval_step

    data, _ = instruction_data
    cfg = load(f"{ROOT}/configs/tiny.py", ["model.vocab_size=512", "train.seq_len=255",
               "train.batch_size=8", "model.max_seq_len=256", "mesh.fsdp=-1"])  # fmt: skip
    mesh = make_mesh(1, -1, 1)
    state, shardings = create_train_state(cfg, mesh)
    evaluate = make_eval_step(cfg, mesh, shardings)
    batch = Loader(data, "train", batch_size=8, seq_len=255, prefetch=0).batch(0)
    base = float(evaluate(state.params, batch, {})["loss"])
    mask = np.asarray(batch["loss_mask"])
    prompt, response = np.argwhere(mask == 0)[3], np.argwhere(mask > 0)[0]
    for where, changes in ((prompt, False), (response, True)):
        t = np.asarray(batch["targets"]).copy()
        t[tuple(where)] = (t[tuple(where)] + 7) % 512
        loss = float(evaluate(state.params, {**batch, "targets": t}, {})["loss"])
        assert (loss != base) == changes, (where, loss, base)


def test_document_masking_for_token_streams(tiny_dataset):
    """data.document_masking on pre-training data: a segment starts at every BOS, positions
    restart there, and the target after a document's EOS (the next BOS) is not trained."""
    from llama_jax.data.loader import Loader
    from llama_jax.data.tokenizer import Tokenizer

    tok = Tokenizer(tiny_dataset[1])
    b = Loader(tiny_dataset[0], "train", batch_size=8, seq_len=64, prefetch=0,
               document_bos=tok.bos_id).batch(0)  # fmt: skip
    inputs, seg = np.asarray(b["inputs"]), np.asarray(b["segment_ids"])
    starts = inputs == tok.bos_id
    assert starts.any()
    assert (np.asarray(b["positions"])[starts] == 0).all()
    assert (np.diff(seg, axis=1) == starts[:, 1:]).all()
    eos = inputs == tok.eos_id
    assert (np.asarray(b["loss_mask"])[eos] == 0).all()
    assert np.asarray(b["loss_mask"])[~eos].min() == 1


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [0, 16], ids=["full", "lora"])
def test_fine_tuning_teaches_responses_that_generate_reproduces(tmp_path, tiny_dataset, capsys,
                                                                lora_rank):  # fmt: skip
    """End to end on CPU: four instruction -> response pairs, prepared with the alpaca template
    and packed; a small model trained on them (all its parameters, or LoRA rank 16 on every
    linear layer of a frozen random base) until greedy `launch.generate --template alpaca`
    answers each instruction with its response, exactly. The merged LoRA model converted
    `--to hf` answers the same in transformers."""
    from launch.export import main as export_main
    from launch.generate import main as generate_main
    from llama_jax.config import load
    from llama_jax.trainer import loop as trainer

    pairs = {"Name a fruit.": "apple pie", "Name a color.": "deep blue",
             "Name an animal.": "grey wolf", "Name a tool.": "steel hammer"}  # fmt: skip
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        2 * "".join(json.dumps({"instruction": i, "output": o}) + "\n" for i, o in pairs.items())
    )  # fmt: skip  (8 rows: one batch)
    data = str(tmp_path / "data")
    instruct.prepare(str(rows), tiny_dataset[1], data, "alpaca", seq_len=127, val_fraction=0)
    steps, lr = (150, 3e-3) if not lora_rank else (200, 1e-2)
    cfg = load(f"{ROOT}/configs/finetune_tiny.py", [
        "model.vocab_size=512", "model.dim=64", "model.n_layers=2", "model.max_seq_len=128",
        "train.seq_len=127", "train.batch_size=8", f"train.steps={steps}", f"train.lr={lr}",
        "train.eval_every=0", "train.log_every=50", f"data.path={data}",
        f"checkpoint.every_steps={steps}", f"model.lora_rank={lora_rank}",
        "model.lora_targets=q,k,v,o,w1,w2,w3"])  # fmt: skip
    trainer.train(cfg, str(tmp_path / "run"))
    export = ["--workdir", str(tmp_path / "run"), "--output", str(tmp_path / "export")]
    export_main(export + (["--merge-lora"] if lora_rank else []))
    capsys.readouterr()
    argv = ["--checkpoint", str(tmp_path / "export"), "--tokenizer", tiny_dataset[1],
            "--template", "alpaca", "--temperature", "0", "--max-new-tokens", "12"]  # fmt: skip
    for instruction in pairs:
        argv += ["--prompt", instruction]
    generate_main(argv)
    out = capsys.readouterr().out
    answers = [block.split("\n", 1)[1].strip() for block in out.split("--- ")[1:]]
    assert answers == list(pairs.values()), out
    if lora_rank:
        assert _transformers_answers(tmp_path, tiny_dataset[1], pairs) == list(pairs.values())


def _transformers_answers(tmp_path, tokenizer, pairs) -> list[str]:
    """Greedy answers of the exported model converted to Hugging Face, run by transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from llama_jax.data.tokenizer import Tokenizer
    from llama_jax.weights import convert

    convert.convert("ours", "hf", str(tmp_path / "export"), str(tmp_path / "hf"))
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok, answers = Tokenizer(tokenizer), []
    for instruction in pairs:
        ids = torch.tensor([instruct.prompt(instruction, "alpaca", tok).tolist()])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False,
                                 eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)  # fmt: skip
        new = [t for t in out[0, ids.shape[1] :].tolist() if t != tok.eos_id]
        answers.append(tok.decode(new).strip())
    return answers


@pytest.mark.slow
def test_training_refuses_data_with_no_response_left(tmp_path, tiny_dataset, capsys):
    """Rows longer than the sequence lose their response to truncation: prepare counts the
    examples with no response token left, and training refuses to start (one line, exit 2)
    when no loss token is left at all, or when most examples lost their response, instead
    of training on nothing and logging loss 0.0."""
    from launch.train import main as train_main

    long = {"instruction": "Repeat: " + "all work and no play " * 60, "output": "no"}
    short = {"instruction": "Say yes.", "output": "yes"}
    for name, rows, match in (
        ("none", [long] * 8, "has no loss token (no response token in any of its 8 examples)"),
        ("most", [long] * 7 + [short], "7 of the 'train' split's 8 examples lost their whole"),
    ):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        data = str(tmp_path / name)
        meta = instruct.prepare(str(path), tiny_dataset[1], data, "alpaca", seq_len=255,
                                val_fraction=0)  # fmt: skip
        assert meta["packed"]["train"]["no_response"] == rows.count(long)
        assert f"{rows.count(long)} of them with no response token left" in (
            instruct.summary_line(meta, data)
        )
        with pytest.raises(SystemExit) as e:
            train_main(["--config", f"{ROOT}/configs/tiny.py", "--workdir", str(tmp_path / "run"),
                        "--config.model.vocab_size=512", "--config.train.seq_len=255",
                        "--config.model.max_seq_len=256", "--config.train.steps=2",
                        "--config.train.batch_size=8", f"--config.data.path={data}"])  # fmt: skip
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert e.value.code == 2 and len(err) == 1 and match in err[0], err
