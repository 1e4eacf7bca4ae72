"""Tokenizer: LLaMA's trainer options, Unicode round-trips, byte fallback, vocab checks."""

import hashlib
import json
import re

import pytest

from llama_jax.data.tokenizer import Tokenizer, check_vocab, train_tokenizer

CORPUS = [
    "def add(a, b):\n    return a + b  # 12345 apples\n",
    "The quick brown fox jumps over the lazy dog. 2023-05-17 at 10:30.\n" * 3,
    "Numbers 3141592653 and 2718281828 are famous; so is 1618033988.\n",
    "Le cœur a ses raisons que la raison ne connaît point.\n",
] * 40


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    src = d / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    return Tokenizer(train_tokenizer([str(src)], 320, str(d / "out"), num_threads=1))


def test_llama_special_ids_and_vocab(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert tok.vocab_size == 320
    ids = tok.encode("hello", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
    assert tok.decode(ids) == "hello"
    # the trainer spec matches the paper's options
    spec = tok.sp.serialized_model_proto()
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto.FromString(spec)
    assert m.trainer_spec.model_type == pb.TrainerSpec.BPE
    assert m.trainer_spec.split_digits and m.trainer_spec.byte_fallback
    assert m.normalizer_spec.name == "identity" and not m.normalizer_spec.remove_extra_whitespaces


def test_digits_are_split(tok):
    pieces = tok.sp.encode("year 31415926 ok", out_type=str)
    digit_pieces = [p.lstrip("▁") for p in pieces if any(c.isdigit() for c in p)]
    assert "".join(digit_pieces) == "31415926"
    assert all(len(p) == 1 for p in digit_pieces), pieces


ROUND_TRIP = [
    "",
    "plain ascii",
    "  leading, trailing and   inner spaces  ",
    "emoji 😀👩‍👩‍👧‍👦🏳️‍🌈 and flags 🇯🇵",
    "中文字符，日本語のテキスト、한국어 텍스트",
    "combining: e\u0301 a\u0308\u0323 Z\u0351\u0352\u0353",
    "control \x00\x01\x07\x1b[0m\x7f tab\tcr\r\nlf\n\n",
    "unseen scripts: ᚠᛇᚻ᛫ᛒᛦᚦ 𒀭𒂗𒆠 ꦲꦏꦫ 𓀀𓁐 ⵜⴰⵎⴰⵣⵉⵖⵜ",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∀x∈ℝ: x²≥0, and \ufeff\u200b\u2028\u00ad invisible ones",
    "\U0010ffff\ud7ff\ue000 edges of the code space",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_arbitrary_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids  # byte fallback, never <unk>


def test_byte_fallback_pieces(tok):
    pieces = tok.sp.encode("𒀭", out_type=str)  # unseen: its 4 UTF-8 bytes as byte pieces
    assert pieces[-4:] == ["<0xF0>", "<0x92>", "<0x80>", "<0xAD>"]


def test_sha256_and_repr(tok):
    with open(tok.model_path, "rb") as f:
        assert tok.sha256 == hashlib.sha256(f.read()).hexdigest()
    assert tok.sha256[:12] in repr(tok)


def test_training_is_deterministic(tok, tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("".join(CORPUS))
    a = train_tokenizer(str(src), 320, str(tmp_path / "a"), num_threads=1)
    b = train_tokenizer([str(tmp_path / "*.txt")], 320, str(tmp_path / "b"), num_threads=1)
    assert Tokenizer(a).sha256 == Tokenizer(b).sha256


def test_check_vocab(tok):
    assert check_vocab(tok, 320) == 320
    assert check_vocab({"vocab_size": 320}, 2048) == 320
    with pytest.raises(ValueError, match=r"vocab_size=320 .* larger than model.vocab_size=256"):
        check_vocab(tok, 256)


def test_train_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no input files match"):
        train_tokenizer([str(tmp_path / "missing*.txt")], 300, str(tmp_path / "o"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="all 1 input files are empty"):
        train_tokenizer([str(tmp_path / "empty.txt")], 300, str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(str(tmp_path / "nope.model"))


def test_cli(tmp_path, capsys):
    from launch.train_tokenizer import main

    (tmp_path / "c.txt").write_text("".join(CORPUS))
    main(
        ["--input", str(tmp_path / "c.txt"), "--vocab-size", "320", "--output", str(tmp_path / "o")]
    )
    assert Tokenizer(str(tmp_path / "o" / "tokenizer.model")).vocab_size == 320
    # Errors take the shared one-line path (llama_jax.cli.fail): stderr, exit status 2.
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "--input",
                str(tmp_path / "c.txt"),
                "--vocab-size",
                "262",
                "--output",
                str(tmp_path / "o"),
            ]
        )
    assert exited.value.code == 2
    assert re.match(
        r"error: ValueError: sentencepiece training failed: .*Vocabulary size",
        capsys.readouterr().err,
    )
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "--input",
                str(tmp_path / "x.txt"),
                "--vocab-size",
                "300",
                "--output",
                str(tmp_path / "o"),
            ]
        )
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("error: FileNotFoundError: no input files match")
