"""Corpus preparation, the default corpus and the Loader: determinism, coverage, resume, errors."""

import gzip
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax.data import format as fmt
from llama_jax.data import prepare as prep
from llama_jax.data.loader import Loader, feistel_permute
from llama_jax.data.tokenizer import Tokenizer, train_tokenizer

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu 0 1 2 3 4 5 6 7 8 9".split()
)


def make_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 40))) + f" doc{i}" for i in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "c.txt").write_text("\n".join(make_docs(300)))
    return Tokenizer(train_tokenizer(str(d / "c.txt"), 300, str(d), num_threads=1))


def split_docs(meta_dir, split, tok):
    """Decodes a split's token stream back into its documents (BOS ... EOS each)."""
    tokens = fmt.open_split(str(meta_dir), split).read().result().astype(np.int64)
    assert tokens.size == 0 or tokens[-1] == tok.eos_id
    cuts = np.flatnonzero(tokens == tok.eos_id)
    docs = np.split(tokens, cuts + 1)[:-1]
    assert all(d[0] == tok.bos_id and tok.bos_id not in d[1:] for d in docs)
    return [tok.decode(d[1:]) for d in docs]


def write_inputs(d, docs):
    """The same documents spread over all four input formats; returns the paths in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    q = len(docs) // 4
    for i, t in enumerate(docs[:q]):
        (d / f"a{i:04d}.txt").write_text(t)
    (d / "b.jsonl").write_text(
        "".join(json.dumps({"text": t, "id": 1}) + "\n\n" for t in docs[q : 2 * q])
    )
    with gzip.open(d / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs[2 * q : 3 * q])
    pq.write_table(pa.table({"text": docs[3 * q :]}), d / "d.parquet", row_group_size=7)
    return [str(d / "a*.txt"), str(d / "b.jsonl"), str(d / "c.jsonl.gz"), str(d / "d.parquet")]


def test_prepare_all_formats_round_trip(tok, tmp_path):
    docs = make_docs(400)
    inputs = write_inputs(tmp_path / "in", docs)
    meta = prep.prepare(
        inputs,
        tok.model_path,
        str(tmp_path / "ds"),
        val_fraction=0.1,
        num_workers=1,
        shard_bytes=2000,
        progress=False,
        verbose=False,
    )
    train, val = split_docs(tmp_path / "ds", "train", tok), split_docs(tmp_path / "ds", "val", tok)
    # every document exactly once, in input order within each split, split by document
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in set(train)] and val == [
        d for d in docs if d in set(val)
    ]
    assert 20 <= len(val) <= 65  # ~10% of 400
    s = meta["splits"]
    assert (s["train"]["documents"], s["val"]["documents"]) == (len(train), len(val))
    assert s["train"]["tokens"] == sum(len(tok.encode(t)) + 2 for t in train)  # + BOS, EOS
    assert (
        meta["dtype"] == "uint16"
        and meta["vocab_size"] == 300
        and meta["tokenizer_sha256"] == tok.sha256
    )
    assert os.path.exists(tmp_path / "ds" / "tokenizer.model") and not os.path.exists(
        tmp_path / "ds.partial"
    )
    # stable under re-runs with another file order, shard size and worker processes
    shuffled = [inputs[3], inputs[1], inputs[0], inputs[2]]
    prep.prepare(
        shuffled,
        tok.model_path,
        str(tmp_path / "ds2"),
        val_fraction=0.1,
        num_workers=2,
        progress=False,
        verbose=False,
    )
    assert sorted(split_docs(tmp_path / "ds2", "val", tok)) == sorted(val)
    # re-running a finished job is a no-op; a different job into the same dir is refused
    assert (
        prep.prepare(
            inputs,
            tok.model_path,
            str(tmp_path / "ds"),
            val_fraction=0.1,
            num_workers=1,
            shard_bytes=2000,
            progress=False,
            verbose=False,
        )
        == meta
    )
    with pytest.raises(FileExistsError, match="different dataset"):
        prep.prepare(inputs, tok.model_path, str(tmp_path / "ds"), progress=False, verbose=False)


def test_prepare_resumes_after_crash(tok, tmp_path, monkeypatch):
    inputs = write_inputs(tmp_path / "in", make_docs(120))
    kw = dict(val_fraction=0.2, num_workers=1, shard_bytes=1500, progress=False, verbose=False)
    ref = prep.prepare(inputs, tok.model_path, str(tmp_path / "ref"), **kw)
    out = str(tmp_path / "out")

    def crash(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(prep, "write_split", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        prep.prepare(inputs, tok.model_path, out, **kw)
    monkeypatch.undo()
    assert not os.path.exists(out) and not any(
        n.startswith(".out.tmp") for n in os.listdir(tmp_path)
    )
    markers = sorted(f for f in os.listdir(out + ".partial/shards") if f.endswith(".json"))
    assert len(markers) >= 4
    os.remove(f"{out}.partial/shards/{markers[2]}")  # this shard "crashed" before its marker
    calls = []
    real = prep._tokenize_shard
    monkeypatch.setattr(prep, "_tokenize_shard", lambda job: calls.append(job[0]) or real(job))
    meta = prep.prepare(inputs, tok.model_path, out, **kw)
    assert calls == [2]  # only the unfinished shard is redone
    for split in ("train", "val"):
        a = fmt.open_split(out, split).read().result()
        b = fmt.open_split(str(tmp_path / "ref"), split).read().result()
        np.testing.assert_array_equal(a, b)  # nothing duplicated or lost
    assert meta["splits"] == ref["splits"] and not os.path.exists(out + ".partial")


def test_prepare_errors(tok, tmp_path, capsys):
    def run(inputs, **kw):
        return prep.prepare(
            inputs, tok.model_path, str(tmp_path / "o"), progress=False, verbose=False, **kw
        )

    with pytest.raises(FileNotFoundError, match="no input files match '.*nothing-\\*.txt'"):
        run([str(tmp_path / "nothing-*.txt")])
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "e2.txt").write_text("")
    with pytest.raises(ValueError, match="all 2 input files are empty"):
        run([str(tmp_path / "e*.txt")])
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="no documents: all 1 input files are empty"):
        run([str(tmp_path / "blank.jsonl")])
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(200)]
    lines[149] = json.dumps({"content": "no text field here"})
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    # shard_bytes splits the file into byte ranges: the line number must still be exact
    with pytest.raises(
        ValueError, match=r"bad\.jsonl:150: no 'text' field \(found \['content'\]\)"
    ):
        run([str(tmp_path / "bad.jsonl")], shard_bytes=500)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: invalid JSON"):
        run([str(tmp_path / "broken.jsonl")])
    with pytest.raises(ValueError, match=r"no column 'body'"):
        run(write_inputs(tmp_path / "in", make_docs(8))[3:], text_field="body")
    (tmp_path / "x.zip").write_bytes(b"PK")
    with pytest.raises(ValueError, match="unsupported input format"):
        run([str(tmp_path / "x.zip")])
    with pytest.raises(SystemExit) as exited:  # the shared one-line error path, llama_jax.cli.fail
        from launch.prepare_data import main

        main(
            [
                "--input",
                str(tmp_path / "nope.txt"),
                "--tokenizer",
                tok.model_path,
                "--output",
                str(tmp_path / "o"),
            ]
        )
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("error: FileNotFoundError: no input files match")


def test_undecodable_bytes_replaced_and_counted(tok, tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(b"alpha \xff\xfe beta \xc3 gamma")  # 3 invalid bytes
    (tmp_path / "b.jsonl").write_bytes(
        b'{"text": "delta \xff"}\n{"text": "lone \\ud800 surrogate"}\n'
    )
    meta = prep.prepare(
        [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")],
        tok.model_path,
        str(tmp_path / "o"),
        val_fraction=0.0,
        progress=False,
    )
    assert meta["replaced_bytes"] == 5 and meta["docs_with_replacements"] == 3
    assert "replaced 5 undecodable bytes in 3 documents" in capsys.readouterr().out
    assert split_docs(tmp_path / "o", "train", tok) == [
        "alpha \ufffd\ufffd beta \ufffd gamma",
        "delta \ufffd",
        "lone \ufffd surrogate",
    ]


def test_val_never_silently_empty(tok, tmp_path):
    docs = make_docs(12, seed=3)
    for i, t in enumerate(docs):
        (tmp_path / f"{i:02d}.txt").write_text(t)
    files = sorted(str(p) for p in tmp_path.glob("*.txt"))
    runs = []
    for name, order in (("a", files), ("b", files[::-1])):
        meta = prep.prepare(
            order,
            tok.model_path,
            str(tmp_path / name),
            val_fraction=1e-9,
            num_workers=1,
            shard_bytes=100,
            progress=False,
            verbose=False,
        )
        train, val = (
            split_docs(tmp_path / name, "train", tok),
            split_docs(tmp_path / name, "val", tok),
        )
        assert len(val) == 1 and sorted(train + val) == sorted(docs) and "val_fallback" in meta
        assert meta["splits"]["val"]["tokens"] == len(tok.encode(val[0])) + 2  # + BOS, EOS
        runs.append(val)
    assert runs[0] == runs[1]


def test_token_dtype():
    assert fmt.token_dtype(32000) == "uint16" and fmt.token_dtype(65536) == "uint16"
    assert fmt.token_dtype(65537) == "uint32" and fmt.token_dtype(128256) == "uint32"


# ----------------------------------------------------------------------------- loader

T, B = 8, 4


@pytest.fixture(scope="module")
def ramp(tmp_path_factory):
    """A dataset whose token i is i, so window w's inputs start at w * T."""
    d = str(tmp_path_factory.mktemp("ramp") / "ds")
    fmt.write_token_dataset(
        d,
        {"train": np.arange(37 * T + 3), "val": np.arange(5 * T + 1)},
        vocab_size=60000,
        tokenizer_sha256="abc",
    )
    return d


def loader(path, **kw):
    kw = {"batch_size": B, "seq_len": T, "seed": 0, **kw}
    return Loader(path, "train", **kw)


def windows(batch):
    return (np.asarray(batch["inputs"])[:, 0] // T).tolist()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_feistel_is_a_permutation(n):
    p = feistel_permute(np.arange(n), n, key=12345)
    assert sorted(p.tolist()) == list(range(n))
    if n >= 64:
        assert (p != np.arange(n)).mean() > 0.9
        assert not np.array_equal(p, feistel_permute(np.arange(n), n, key=12346))


def test_batches_are_shifted_windows(ramp):
    with loader(ramp) as ld:
        assert ld.num_windows == 37
        b = next(ld)
    x, y = b["inputs"], b["targets"]
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(y, x + 1)  # targets are the inputs shifted by one token
    np.testing.assert_array_equal(x % T, np.broadcast_to(np.arange(T), (B, T)))  # window-aligned


def test_same_seed_same_batches_other_seed_differs(ramp):
    a = [windows(next(ld)) for ld in [loader(ramp)] for _ in range(6)]
    b = [windows(next(ld)) for ld in [loader(ramp, prefetch=0)] for _ in range(6)]
    c = [windows(next(ld)) for ld in [loader(ramp, seed=1)] for _ in range(6)]
    assert a == b and a != c


def test_epoch_covers_every_window_once_across_processes(ramp):
    steps = 30  # 120 slots = 3 epochs of 37 windows + 9; batches straddle epoch boundaries
    per_proc = [loader(ramp, process_index=i, process_count=2) for i in range(2)]
    single = loader(ramp)
    stream = []
    for _ in range(steps):
        parts = [windows(next(ld)) for ld in per_proc]
        assert not set(parts[0]) & set(parts[1])  # disjoint slices ...
        assert parts[0] + parts[1] == windows(next(single))  # ... that make the global batch
        stream += parts[0] + parts[1]
    for e in range(3):
        assert sorted(stream[e * 37 : (e + 1) * 37]) == list(range(37))
    assert stream[:37] != stream[37:74]  # each epoch has its own order


def test_resume_at_step_k(ramp):
    full = loader(ramp)
    ref = [next(full) for _ in range(12)]
    assert full.step == 12
    resumed = loader(ramp, step=7)
    for k in range(7, 12):
        b = next(resumed)
        np.testing.assert_array_equal(b["inputs"], ref[k]["inputs"])
        np.testing.assert_array_equal(b["targets"], ref[k]["targets"])
    full.seek(3)
    assert windows(next(full)) == windows(ref[3]) and full.step == 4
    assert [windows(b) for b in full.batches(2)] == [windows(b) for b in ref[:2]]
    assert full.step == 4  # random access leaves the state alone
    full.close()


def test_tensorstore_reads_match_in_memory(ramp):
    a = [windows(next(ld)) for ld in [loader(ramp, in_memory=True)] for _ in range(10)]
    ld = loader(ramp, in_memory=False, prefetch=0)
    assert ld._tokens is None
    assert a == [windows(next(ld)) for _ in range(10)]
    url = loader("file://" + os.path.abspath(ramp), in_memory=False)  # a tensorstore kvstore URL
    assert a == [windows(next(url)) for _ in range(10)]


@pytest.mark.parametrize("mesh_shape", [(8, 1), (2, 4)])
def test_global_sharded_array(ramp, mesh_shape):
    mesh = jax.make_mesh(mesh_shape, ("data", "tensor"))
    sharding = NamedSharding(mesh, P("data", None))  # replicated over "tensor"
    ld = loader(ramp, batch_size=8, sharding=sharding)
    ref = loader(ramp, batch_size=8, prefetch=0)
    for _ in range(3):
        b, r = next(ld), next(ref)
        assert isinstance(b["inputs"], jax.Array) and b["inputs"].sharding == sharding
        assert b["inputs"].shape == (8, T)
        np.testing.assert_array_equal(np.asarray(b["inputs"]), r["inputs"])
        np.testing.assert_array_equal(np.asarray(b["targets"]), r["targets"])
    ld.close()


TWO_PROCESS_WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
pid, port, ds = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
from llama_jax.data.loader import Loader
sharding = NamedSharding(jax.make_mesh((8,), ("data",)), P("data", None))
ld = Loader(ds, "train", batch_size=8, seq_len=8, seed=0, sharding=sharding)
ref = Loader(ds, "train", batch_size=8, seq_len=8, seed=0, process_index=0, process_count=1)
for _ in range(12):  # 96 slots over 37 windows: crosses two epoch boundaries
    b, r = next(ld), next(ref)
    assert b["inputs"].shape == (8, 8) and jax.process_count() == 2
    for s in b["inputs"].addressable_shards + b["targets"].addressable_shards:
        key = "inputs" if s in b["inputs"].addressable_shards else "targets"
        np.testing.assert_array_equal(np.asarray(s.data), r[key][s.index])
print("rows", ld.rows)
"""


@pytest.mark.slow
def test_two_real_processes_assemble_the_global_batch(ramp):
    """jax.distributed with 2 CPU processes x 4 devices: each reads only its rows, and the
    global array's shards equal the single-process batch."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
    cmd = [sys.executable, "-c", TWO_PROCESS_WORKER, port, ramp]
    procs = [
        subprocess.Popen(
            [*cmd[:3], str(i), *cmd[3:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "rows (0, 4)" in outs[0] and "rows (4, 8)" in outs[1]


EXIT_WITHOUT_CLOSE = """
import gc, sys
import jax  # as in any run: without it the modules happen to be torn down in a harmless order
from llama_jax.data.loader import Loader
kw = dict(batch_size=4, seq_len=8, process_index=0, process_count=1)
kept = Loader(sys.argv[1], "train", **kw)  # prefetching, left open at exit
plain = Loader(sys.argv[1], "train", prefetch=0, **kw)
dropped = Loader(sys.argv[1], "train", **kw)
next(kept), next(plain), next(dropped)
thread = dropped._thread
del dropped  # an abandoned loader still stops its thread
gc.collect()
thread.join(timeout=30)
print("dropped thread alive:", thread.is_alive())
"""


def test_loaders_left_open_exit_quietly(ramp):
    """A script that leaves loaders open exits without 'Exception ignored in: Loader.__del__'
    (module globals are None by then), and a collected loader's thread still stops."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
    r = subprocess.run([sys.executable, "-c", EXIT_WITHOUT_CLOSE, ramp], env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "dropped thread alive: False" in r.stdout, r.stdout + r.stderr
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_loader_errors(ramp, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"'val' split .* smaller than one batch: 41 tokens make 5 windows "
        r"of seq_len\+1=9 tokens, but batch_size=6 needs 6 windows \(49 tokens\)",
    ):
        Loader(ramp, "val", batch_size=6, seq_len=T)
    with pytest.raises(ValueError, match="vocab_size=60000 .* larger than model.vocab_size=2048"):
        loader(ramp, expected_vocab_size=2048)
    with pytest.raises(ValueError, match="different tokenizer"):
        loader(ramp, expected_tokenizer_sha="def")
    loader(ramp, expected_vocab_size=60000, expected_tokenizer_sha="abc", prefetch=0)
    with pytest.raises(FileNotFoundError, match="no prepared dataset"):
        loader(str(tmp_path))
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        loader(ramp, process_index=0, process_count=3)


def test_default_corpus_concurrent_build_and_tiny_batches(tmp_path):
    """Two processes build the (shrunken) default corpus at once; both get the same dataset."""
    code = (
        "import sys; from llama_jax.data.default_corpus import ensure_default_dataset as e; "
        f"print(e(512, {str(tmp_path)!r}, max_bytes=1 << 20, verbose=False))"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    from llama_jax.data.default_corpus import ensure_default_dataset

    data, model = ensure_default_dataset(512, str(tmp_path), max_bytes=1 << 20)
    assert repr((data, model)) in outs[0]
    assert [n for n in os.listdir(tmp_path) if not n.endswith(".lock")] == [os.path.basename(data)]
    tok = Tokenizer(model)
    ld = Loader(
        data,
        "train",
        batch_size=16,
        seq_len=128,
        seed=0,
        expected_vocab_size=512,
        expected_tokenizer_sha=tok.sha256,
        prefetch=0,
    )
    assert ld.num_windows > 1000
    assert "def " in tok.decode(next(ld)["inputs"].ravel())
    Loader(data, "val", batch_size=2, seq_len=32, prefetch=0)  # small, but never empty
    # the benchmark section runs end to end on this dataset
    import argparse

    from llama_jax.bench import data as bench_data

    parser = argparse.ArgumentParser()
    bench_data.add_args(parser)
    args = parser.parse_args(
        [
            "--data-path",
            data,
            "--data-batches",
            "3",
            "--data-prepare-mb",
            "0.1",
            "--data-curate-mb",
            "0",
        ]  # (curation rows: tests/test_benchmark.py)
    )
    from llama_jax.config import load_file

    args.cfg = load_file(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
    rows = bench_data.measure(args)
    measured = [r["what"] for r in rows if not r["what"].startswith("limit:")]
    assert measured == ["prepare_data"] + ["loader"] * (len(measured) - 1)
    assert rows[-1]["what"].startswith("limit:")  # every section states its physical limit
    assert all(r["tokens/s"] > 0 for r in rows)
