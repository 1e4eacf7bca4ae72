"""Simulate 8 CPU devices (set before jax is imported) and keep tests in float32 precision."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the whole session: this process, the pytest-xdist
# workers (they inherit the environment) and every process the tests launch (launch.train runs,
# multi-process and SLURM jobs, notebooks). Most tests compile the same tiny steps; a cache hit
# loads the executable that an identical compile produced, so no result changes, and
# memory_analysis() reads the same numbers off a loaded executable (checked on jaxlib 0.10.2).
# On AMD EPYC Zen 3, 2 cores: tests/test_train.py 970 s -> 470 s. A fresh directory per
# session, removed at exit, so no session sees another's cache; set before jax is imported,
# which reads these variables once.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="llama_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import glob  # noqa: E402
import json  # noqa: E402
import sysconfig  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """(dataset_dir, tokenizer_path): ~300 KB of the stdlib's sources, a 512-piece BPE."""
    from llama_jax.data.prepare import prepare
    from llama_jax.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_dataset")
    text, docs = "", []
    for f in sorted(glob.glob(f"{sysconfig.get_paths()['stdlib']}/*.py")):
        text += open(f, encoding="utf-8", errors="replace").read()
        if len(text) > 300_000:
            break
    docs = [text[i : i + 2000] for i in range(0, len(text), 2000)]  # ~150 documents
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    tok = train_tokenizer(str(corpus), 512, str(root / "tok"))
    prepare(
        str(corpus),
        tok,
        str(root / "data"),
        val_fraction=0.1,
        num_workers=1,
        progress=False,
        verbose=False,
    )
    return str(root / "data"), tok


@pytest.fixture(scope="session")
def tiny_config():
    """A factory: tiny_config(model=None, **train) -> RunConfig of a 2-layer float32 model (dim
    64, 4 heads, 2 kv heads, vocab 128, reference attention, save_linear remat) and a 16 x 32
    batch at lr 1e-3, no warmup, seed 1; `model` and `train` override single fields
    (tests/test_train_step.py, tests/test_sharding.py: the latter passes seed=3)."""
    from llama_jax.config import ModelConfig, RunConfig, TrainConfig

    def make(model=None, **train):
        mc = dict(
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            vocab_size=128,
            multiple_of=32,
            max_seq_len=32,
            dtype="float32",
            attention_impl="reference",
            remat_policy="save_linear",
        )
        tc = dict(batch_size=16, seq_len=32, lr=1e-3, warmup_steps=0, steps=100, seed=1)
        return RunConfig(
            model=ModelConfig(**{**mc, **(model or {})}), train=TrainConfig(**{**tc, **train})
        )

    return make


@pytest.fixture(scope="session")
def mesh_of():
    """A factory: mesh_of(data, fsdp, tensor) -> a (data, fsdp, tensor) mesh over the first
    data x fsdp x tensor of the 8 simulated devices."""
    from llama_jax.parallel import sharding as shd

    def make(data, fsdp, tensor):
        return shd.make_mesh(data, fsdp, tensor, devices=jax.devices()[: data * fsdp * tensor])

    return make


@pytest.fixture(autouse=True)
def _no_stale_log_handlers():
    """A launcher run in-process (launch.train's basicConfig) leaves a root handler on that
    test's captured stderr, closed once the test ends: later log records (orbax's INFO) would
    print '--- Logging error ---' into other tests' stderr. Remove such handlers after each test."""
    import logging

    root = logging.getLogger()
    level = root.level
    yield
    for h in [h for h in root.handlers if type(h) is logging.StreamHandler]:
        root.removeHandler(h)
    root.setLevel(level)
