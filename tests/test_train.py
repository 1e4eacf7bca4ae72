"""The training run end to end: loss falls, exact resume after SIGKILL, SIGTERM, other meshes,
multi-process, export."""

import contextlib
import glob
import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from llama_jax.config import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = [  # a small float32 model on the test dataset: each step takes milliseconds
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=512",
    "model.multiple_of=16",
    "model.max_seq_len=64",
    "model.attn_block_q=16",
    "model.attn_block_k=16",
    "train.seq_len=32",
    "train.batch_size=8",
    "train.steps=16",
    "train.warmup_steps=4",
    "train.log_every=1",
    "train.eval_every=8",
    "train.eval_batches=2",
    "train.samples=0",
    "checkpoint.every_steps=8",
    "checkpoint.keep=3",
    "mesh.data=1",
    "mesh.fsdp=-1",
]


def small_cfg(dataset, *extra):
    return load(f"{ROOT}/configs/tiny.py", [*SMALL, f"data.path={dataset[0]}", *extra])


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run_train(workdir, dataset, *extra, env=None, devices=4, check=True, preexec_fn=None):
    args = [f"--config.{o}" for o in [*SMALL, f"data.path={dataset[0]}", *extra]]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        **(env or {}),
    }
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.train",
            f"--config={ROOT}/configs/tiny.py",
            f"--workdir={workdir}",
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=preexec_fn,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


@pytest.mark.slow
def test_loss_falls_and_outputs_written(tmp_path, tiny_dataset):
    from llama_jax.trainer import loop as trainer

    cfg = small_cfg(tiny_dataset, "train.steps=40", "train.eval_every=20", "train.lr=1e-2")
    last = trainer.train(cfg, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(0, 41))  # step 0: the untrained val loss
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec"):
        assert key in rows[-1]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 3 and vals[0] > 0.95 * np.log(512)  # untrained: about uniform
    assert vals[2] < vals[1] < 0.8 * np.log(512)
    assert rows[-1]["loss"] < 0.8 * rows[1]["loss"]
    assert last["step"] == 40
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert os.listdir(tmp_path / "tb")


@pytest.mark.slow
def test_blockwise_and_reference_give_the_same_loss_curve(tmp_path, tiny_dataset):
    from llama_jax.trainer import loop as trainer

    curves = {}
    for impl in ("blockwise", "reference"):
        cfg = small_cfg(
            tiny_dataset, f"model.attention_impl={impl}", "train.steps=8", "train.eval_every=0"
        )
        trainer.train(cfg, str(tmp_path / impl))
        curves[impl] = np.array([losses(tmp_path / impl)[s] for s in range(1, 9)])
    np.testing.assert_allclose(curves["blockwise"], curves["reference"], rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "async_save,kill_at,resume_from",
    [(False, 12, 8), (True, 9, None)],
    ids=["sync-save", "kill-during-async-save"],
)
def test_resume_after_sigkill_is_exact(tmp_path, tiny_dataset, async_save, kill_at, resume_from):
    opt = f"checkpoint.async_save={async_save}"
    straight = run_train(tmp_path / "straight", tiny_dataset, opt)
    assert straight.returncode == 0
    r = run_train(
        tmp_path / "killed",
        tiny_dataset,
        opt,
        env={"LLAMA_JAX_SIGNAL_AT_STEP": f"9:{kill_at}"},
        check=False,
    )
    assert r.returncode == -signal.SIGKILL
    assert max(losses(tmp_path / "killed")) == kill_at - 1  # killed before logging kill_at
    with open(tmp_path / "killed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 12, "lo')  # a line torn by the kill must not block the resume
    resumed = run_train(tmp_path / "killed", tiny_dataset, opt)
    if resume_from:
        assert (
            f"resumed from {tmp_path / 'killed' / 'checkpoints'} step {resume_from}"
            in resumed.stderr
        )
    # With an async save cut short, whichever checkpoint was complete is used (step 8 or none);
    # a partial one never is, and either way the losses are those of the uninterrupted run.
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == list(range(1, 17))
    np.testing.assert_array_equal([a[s] for s in a], [b[s] for s in a])


@pytest.mark.slow
def test_sigterm_saves_and_next_run_continues(tmp_path, tiny_dataset):
    r = run_train(tmp_path, tiny_dataset, env={"LLAMA_JAX_SIGNAL_AT_STEP": "15:5"}, check=False)
    assert r.returncode == 75, r.stderr[-3000:]  # saved, resume me (0 is "finished")
    assert "SIGTERM received: saved step 5" in r.stdout
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [5]
    # Resuming with another batch size would silently change the data order: refused.
    r = run_train(tmp_path, tiny_dataset, "train.batch_size=16", check=False)
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith("error: ValueError: resuming with a different data order")
    )
    r = run_train(tmp_path, tiny_dataset)
    assert "resumed from" in r.stderr and "step 5" in r.stderr
    assert sorted(losses(tmp_path)) == list(range(1, 17))


@pytest.mark.slow
def test_nonfinite_loss_stops_with_clear_error(tmp_path, tiny_dataset):
    r = run_train(tmp_path, tiny_dataset, "train.lr=1e6", "train.warmup_steps=0", check=False)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: NonFiniteLossError: non-finite loss"), last
    logged = losses(tmp_path)
    assert not np.isfinite(logged[max(logged)])  # it stopped at the first non-finite step
    saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    assert all(np.isfinite(logged[s]) for s in saved)  # no checkpoint holds the bad state


@pytest.mark.slow
def test_restore_onto_other_meshes_gives_the_same_next_loss(tmp_path, tiny_dataset):
    from llama_jax.checkpoint.manager import Checkpointer
    from llama_jax.data.loader import Loader
    from llama_jax.parallel import sharding as shd
    from llama_jax.train import step as ts

    cfg = small_cfg(tiny_dataset, "mesh.fsdp=8")
    mesh = shd.make_mesh(*cfg.mesh.sizes)
    state, shardings = ts.create_train_state(cfg, mesh)
    step = ts.make_train_step(cfg, mesh, shardings)
    loader = Loader(tiny_dataset[0], "train", batch_size=8, seq_len=32, seed=0)
    b0, b1 = next(loader), next(loader)
    loader.close()
    state, _ = step(state, b0, {})
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, state, {"step": 1})
    ckpt.wait()
    _, want = step(state, b1, {})
    for data, fsdp, tensor, devices in [
        (1, 2, 4, jax.devices()),
        (1, 1, 1, jax.devices()[:1]),
        (2, 1, 4, jax.devices()),
    ]:
        c = cfg.replace({"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})
        m = shd.make_mesh(*c.mesh.sizes, devices=devices)
        abstract, sh = ts.abstract_train_state(c, m)
        restored, meta = ckpt.restore(abstract)
        assert meta["step"] == 1
        _, got = ts.make_train_step(c, m, sh)(restored, b1, {})
        np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-5)
    ckpt.close()


@pytest.mark.slow
def test_export_then_load_gives_the_training_logits(tmp_path, tiny_dataset):
    from llama_jax.checkpoint.export import export
    from llama_jax.checkpoint.manager import Checkpointer
    from llama_jax.model.llama import Llama
    from llama_jax.parallel import sharding as shd
    from llama_jax.train import step as ts
    from llama_jax.weights import params_io

    cfg = small_cfg(tiny_dataset)
    mesh = shd.make_mesh(*cfg.mesh.sizes)
    state, _ = ts.create_train_state(cfg, mesh)
    ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"))
    ckpt.save(3, state, {"step": 3, "config": cfg.to_dict()})
    ckpt.close()
    export(str(tmp_path / "run"), str(tmp_path / "export"))
    params, mc = params_io.load_params(str(tmp_path / "export"))
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12)
    model = Llama(cfg.model)
    want = model.apply({"params": jax.device_get(state.params)}, tokens)
    got = Llama(mc).apply({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_two_processes_match_one_and_checkpoint_restores(tmp_path, tiny_dataset):
    one = run_train(tmp_path / "one", tiny_dataset, "mesh.fsdp=4", devices=4)
    assert one.returncode == 0
    args = [f"--config.{o}" for o in [*SMALL, f"data.path={tiny_dataset[0]}", "mesh.fsdp=4"]]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.local_cluster",
            "--num-processes",
            "2",
            "--devices-per-process",
            "2",
            "--",
            f"--config={ROOT}/configs/tiny.py",
            f"--workdir={tmp_path / 'two'}",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-5000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 17))
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
    # The 2-process checkpoint restores in one process on one device and trains on.
    r = run_train(tmp_path / "two", tiny_dataset, "train.steps=18", "mesh.fsdp=1", devices=1)
    assert "resumed from" in r.stderr and "step 16" in r.stderr
    assert max(losses(tmp_path / "two")) == 18


def test_resume_refuses_another_dataset_at_the_same_path(tmp_path, tiny_dataset):
    """Every checkpoint stores the tokenizer's and the prepared metadata's sha256; a dataset
    re-prepared at the same path (here: its metadata changed) is refused on resume with a
    one-line error that names the override, and the override resumes on purpose."""
    import shutil

    from llama_jax.trainer import loop as trainer

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset[0], data)
    cfg = small_cfg((str(data),), "train.steps=4", "checkpoint.every_steps=2", "train.eval_every=0")
    trainer.train(cfg, str(tmp_path / "run"))
    meta = json.loads((data / "metadata.json").read_text())
    meta["sources"] = ["a re-prepared corpus"]
    (data / "metadata.json").write_text(json.dumps(meta))
    longer = cfg.replace({"train.steps": 6})
    with pytest.raises(
        ValueError,
        match="resuming on a different dataset .*metadata_sha256.*data.allow_dataset_change=true",
    ):
        trainer.train(longer, str(tmp_path / "run"))
    last = trainer.train(longer.replace({"data.allow_dataset_change": True}), str(tmp_path / "run"))
    assert last["step"] == 6


@pytest.mark.slow
def test_lost_checkpoints_do_not_silently_restart(tmp_path, tiny_dataset):
    """A workdir whose checkpoints/ is gone (wrong mount, a clean-up script) used to restart at
    step 0 and cut metrics.jsonl back to step 0. Now: a one-line error, unless
    checkpoint.allow_restart, which starts over and keeps the old metrics aside."""
    import shutil

    from llama_jax.trainer import loop as trainer

    cfg = small_cfg(tiny_dataset, "train.steps=4", "checkpoint.every_steps=2", "train.eval_every=0")
    trainer.train(cfg, str(tmp_path))
    before = (tmp_path / "metrics.jsonl").read_text()
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(FileNotFoundError, match="metrics up to step 4 but no checkpoints/"):
        trainer.train(cfg, str(tmp_path))
    assert (tmp_path / "metrics.jsonl").read_text() == before  # history untouched
    trainer.train(cfg.replace({"checkpoint.allow_restart": True}), str(tmp_path))
    kept = list(tmp_path.glob("metrics.jsonl.before-restart-*"))
    assert len(kept) == 1 and kept[0].read_text() == before
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]


def test_metrics_rewrite_never_truncates_history(tmp_path):
    """Resuming drops the records after the checkpoint by rewriting metrics.jsonl. Interrupted
    (here: the file-size limit hit mid-write, as a full disk would), the old file must stay
    whole; an in-place rewrite left only what it had written so far."""
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0, "pad": "x" * 200}) + "\n" for s in range(1, 31)]
    path.write_text("".join(rows))
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))\n"
        "from llama_jax.trainer.metrics import MetricsWriter\n"
        "try:\n"
        f"    MetricsWriter({str(tmp_path)!r}, resume_step=20, enabled=True).open()\n"
        "except OSError as e:\n"
        "    print('interrupted:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert "interrupted" in r.stdout, r.stdout + r.stderr
    assert path.read_text() == "".join(rows)


@pytest.mark.slow
def test_one_run_per_workdir(tmp_path, tiny_dataset):
    """A second run on a workdir in use is a one-line error naming the holder (two runs used
    to train and write side by side); the lock of a killed run is taken over; a finished run
    leaves no lock behind."""
    import socket

    from llama_jax.trainer import loop as trainer

    cfg = small_cfg(tiny_dataset, "train.steps=2", "train.eval_every=0")
    lock = tmp_path / "run.lock"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": alive.pid, "since": "x"}))
        with pytest.raises(RuntimeError, match=f"in use by pid {alive.pid} on host .*one run per"):
            trainer.train(cfg, str(tmp_path))
        assert not (tmp_path / "metrics.jsonl").exists()  # it wrote nothing
    finally:
        alive.kill()
        alive.wait()
    # the holder is dead now (a killed run): its stale lock is taken over
    assert trainer.train(cfg, str(tmp_path))["step"] == 2
    assert not lock.exists()


@pytest.mark.slow
def test_resume_compares_every_field(tmp_path, tiny_dataset, caplog):
    """On resume every field is compared with the checkpoint's config, before anything is
    restored: a model of another shape is refused naming the field (orbax used to call it a
    corrupt checkpoint), other changes are listed in one warning (weight decay, clip norm and
    rope theta used to change silently), or refused under checkpoint.strict_resume."""
    import logging

    from llama_jax.trainer import loop as trainer

    cfg = small_cfg(tiny_dataset, "train.steps=2", "train.eval_every=0")
    trainer.train(cfg, str(tmp_path))
    more = cfg.replace({"train.steps": 3})
    with pytest.raises(ValueError, match=r"model of another shape .*model.dim: 64 -> 32"):
        trainer.train(more.replace({"model.dim": 32}), str(tmp_path))
    drift = more.replace({"train.weight_decay": 0.0, "model.rope_theta": 500.0})
    with pytest.raises(
        ValueError, match=r"changed config \(.*train.weight_decay: 0.1 -> 0.0.*strict"
    ):
        trainer.train(drift.replace({"checkpoint.strict_resume": True}), str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="llama_jax.checkpoint.resume"):
        assert trainer.train(drift, str(tmp_path))["step"] == 3
    warned = [r.getMessage() for r in caplog.records if "changed config" in r.getMessage()]
    assert len(warned) == 1 and "model.rope_theta: 10000.0 -> 500.0" in warned[0], warned


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(tmp_path, tiny_dataset, capsys):
    """The newest checkpoint cut short (its largest array file emptied): the run moves it to
    checkpoints/corrupt-<step> and continues from the newest one that restores, with the
    losses of the uninterrupted run (it used to stop with exit 2); on_corrupt=fail stops."""
    from llama_jax.checkpoint.manager import CorruptCheckpointError
    from llama_jax.trainer import loop as trainer

    cfg = small_cfg(tiny_dataset, "train.steps=6", "checkpoint.every_steps=2", "train.eval_every=0")
    trainer.train(cfg, str(tmp_path / "straight"))
    short = cfg.replace({"train.steps": 4})
    trainer.train(short, str(tmp_path / "run"))
    files = [p for p in (tmp_path / "run" / "checkpoints" / "4").rglob("*") if p.is_file()]
    max(files, key=lambda p: p.stat().st_size).write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="step 4"):
        trainer.train(cfg.replace({"checkpoint.on_corrupt": "fail"}), str(tmp_path / "run"))
    from launch.export import main as export_main  # and export says so in one line, exit 2

    capsys.readouterr()  # the runs' progress bars so far
    with pytest.raises(SystemExit) as e:
        export_main(["--workdir", str(tmp_path / "run"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: CorruptCheckpointError: cannot restore checkpoint step 4"), err
    assert trainer.train(cfg, str(tmp_path / "run"))["step"] == 6
    assert (tmp_path / "run" / "checkpoints" / "corrupt-4").is_dir()
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "run")
    assert sorted(b) == list(range(1, 7))
    np.testing.assert_array_equal([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)])


@pytest.mark.slow
def test_sigusr1_saves_and_exits_to_be_requeued(tmp_path, tiny_dataset):
    """SLURM's --signal=USR1@<s> warning is handled like SIGTERM: save, then exit 75 ("stopped,
    checkpoint saved, run me again"), which train.sbatch turns into a requeue. A finished run
    exits 0, so a scheduler can tell the two apart (SIGTERM used to exit 0 as well)."""
    r = run_train(tmp_path, tiny_dataset, env={"LLAMA_JAX_SIGNAL_AT_STEP": f"{signal.SIGUSR1}:3"},
                  check=False)  # fmt: skip
    assert r.returncode == 75, r.stderr[-3000:]
    assert "SIGUSR1 received: saved step 3" in r.stdout
    assert run_train(tmp_path, tiny_dataset).returncode == 0
    assert sorted(losses(tmp_path)) == list(range(1, 17))


def _children(pid: int) -> list[int]:
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # field 4 of /proc/<pid>/stat: the parent's pid
            out.append(int(stat.split("/")[2]))
    return out


def _running(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_workers_die_with_their_launcher(tmp_path, tiny_dataset):
    """SIGKILL of launch.local_cluster used to leave both workers training (or blocked in a
    collective) for minutes; now the kernel kills them with it (PR_SET_PDEATHSIG): gone within
    a few seconds, well inside the 30 s a scheduler's clean-up may wait."""
    import time

    args = [f"--config.{o}" for o in [*SMALL, f"data.path={tiny_dataset[0]}", "train.steps=100000"]]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch.local_cluster", "--num-processes", "2", "--",
         f"--config={ROOT}/configs/tiny.py", f"--workdir={tmp_path}", *args],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    workers = []
    try:
        deadline = time.time() + 60
        while len(workers) < 2 and time.time() < deadline:
            workers = _children(launcher.pid)
            time.sleep(0.2)
        assert len(workers) == 2, workers
        time.sleep(3)  # past start-up: importing jax, joining the job
        launcher.kill()
        launcher.wait()
        deadline = time.time() + 30
        while any(_running(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_running(w) for w in workers), "workers outlived their launcher"
    finally:
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)


def _logged_steps(workdir) -> list[int]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if '"loss"' in line]


def _run_cluster(workdir, dataset, *extra, env=None, check=True):
    """run_train's 2-process twin: launch.local_cluster, 2 processes of 2 CPU devices."""
    args = [f"--config.{o}" for o in [*SMALL, f"data.path={dataset[0]}", *extra]]
    r = subprocess.run(
        [sys.executable, "-m", "launch.local_cluster", "--num-processes", "2",
         "--devices-per-process", "2", "--", f"--config={ROOT}/configs/tiny.py",
         f"--workdir={workdir}", *args],
        cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[-5000:]}")
    return r


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2], ids=["1-process", "2-process"])
def test_chaos_kills_corruption_and_interrupted_rewrite(tmp_path, tiny_dataset, processes):
    """SIGKILLs at steps between saves and right after them (while an async save is being
    written), the newest checkpoint corrupted (all processes fall back past it together), a
    metrics rewrite left half done: the run still
    completes with the per-step losses of the uninterrupted run, bit for bit, and metrics.jsonl
    holds every step once. (Every killed run leaves its run.lock behind, taken over as stale.)"""
    run = run_train if processes == 1 else _run_cluster
    opts = ["train.steps=24", "checkpoint.every_steps=3", "checkpoint.keep=3", "train.eval_every=0",
            "mesh.fsdp=-1"]  # fmt: skip
    run(tmp_path / "straight", tiny_dataset, *opts)
    # 4: between saves; 7, 13: just after a save (the async write in flight); 2 processes:
    # between saves, then just after one. (Three more kill points between saves cost ~60 s of
    # CI and test nothing these do not.)
    kills = [4, 7, 13] if processes == 1 else [5, 10]
    wd = tmp_path / "chaos"
    for i, step in enumerate(kills):
        r = run(wd, tiny_dataset, *opts, env={"LLAMA_JAX_SIGNAL_AT_STEP": f"9:{step}"}, check=False)
        assert r.returncode != 0, f"the kill at step {step} did not happen"
        if processes == 2:  # the launcher names the worker that died
            assert re.search(
                r"local_cluster: process \d \(pid \d+\) was killed by SIGKILL", r.stderr
            )
        if i == 1:  # the newest checkpoint cut short: fall back past it
            newest = max(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit())
            files = [p for p in (wd / "checkpoints" / str(newest)).rglob("*") if p.is_file()]
            max(files, key=lambda p: p.stat().st_size).write_bytes(b"")
        if i == len(kills) - 1:  # a rewrite of metrics.jsonl killed halfway: only its temp file
            (wd / "metrics.jsonl.tmp").write_text('{"step": 1, "loss": 0.0}\n{"step": 2, "lo')
    run(wd, tiny_dataset, *opts)
    assert _logged_steps(wd) == list(range(1, 25))
    a, b = losses(tmp_path / "straight"), losses(wd)
    np.testing.assert_array_equal([b[s] for s in range(1, 25)], [a[s] for s in range(1, 25)])
    assert any(d.startswith("corrupt-") for d in os.listdir(wd / "checkpoints"))


@pytest.mark.slow
def test_step_watchdog_ends_a_stuck_run(tmp_path, tiny_dataset):
    """train.step_timeout_s: a step that never finishes (a stuck read or collective; here an
    injected hang) ends the run within the limit, with every thread's stack and one error
    line, exit status 3, instead of waiting forever."""
    import time

    t0 = time.time()
    r = run_train(tmp_path, tiny_dataset, "train.step_timeout_s=3",
                  env={"LLAMA_JAX_HANG_AT_STEP": "6"}, check=False)  # fmt: skip
    assert r.returncode == 3, r.stderr[-3000:]
    assert "Thread 0x" in r.stderr and "File " in r.stderr  # faulthandler's stacks
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: StepWatchdog: no progress for") and "after step 5" in last, last
    assert time.time() - t0 < 120
    # and no false alarm in a healthy run with its evaluations and saves
    assert run_train(tmp_path / "ok", tiny_dataset, "train.step_timeout_s=3").returncode == 0


def _small_files_only():
    """In the child, before exec: writes past 100 KB fail with EFBIG ("File too large"), as on a
    full disk (ENOSPC) but without root or a filesystem to fill. Metrics lines fit; a
    checkpoint of the small model (~1.4 MB per array file) does not."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


@pytest.mark.slow
def test_a_failing_async_save_is_one_error_at_that_save(tmp_path, tiny_dataset):
    """A checkpoint write that fails in orbax's background thread (here: a file size limit)
    used to surface only at the next save, as ~500 lines of tracebacks (30-76 'Event loop is
    closed'). Now it ends the run before the next save with one error line naming the step
    whose save failed, and no traceback. The next save is 50 steps later; the failed write is
    noticed at the first step after it fails (milliseconds here)."""
    r = run_train(tmp_path, tiny_dataset, "train.steps=120", "checkpoint.every_steps=50",
                  "train.eval_every=0", check=False, preexec_fn=_small_files_only)  # fmt: skip
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2, r.stderr[-3000:]
    assert last.startswith("error: CheckpointSaveError: saving checkpoint step 50 "), last
    assert "File too large" in last and "no checkpoint yet" in last, last
    assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, r.stderr[-3000:]
    logged = _logged_steps(tmp_path)
    assert 50 <= logged[-1] < 100, logged[-1]
    assert os.listdir(tmp_path / "checkpoints") == [] or 50 not in [
        int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()
    ]


class _FakeKV:
    """The jax distributed key-value client, in memory: what PeerWatch calls on it."""

    def __init__(self):
        import threading

        self.kv, self.lock = {}, threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            assert allow_overwrite or key not in self.kv, key
            self.kv[key] = value

    def key_value_dir_get(self, prefix):
        with self.lock:
            return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]

    def blocking_key_value_get(self, key, timeout_ms):
        import time

        deadline = time.monotonic() + timeout_ms / 1000
        while time.monotonic() < deadline:
            with self.lock:
                if key in self.kv:
                    return self.kv[key]
            time.sleep(0.01)
        raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")


@pytest.fixture
def two_processes(monkeypatch):
    """This process as process 0 of 2, on a fake key-value store; fire() records, not exits."""
    import threading

    from jax._src import distributed

    from llama_jax.trainer.control import PeerWatch

    kv, fired = _FakeKV(), []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(distributed.global_state, "client", kv)

    def fire(self, found):
        fired.append((found, threading.current_thread().name))
        raise SystemExit(PeerWatch.EXIT)  # as os._exit would: nothing after it runs

    monkeypatch.setattr(PeerWatch, "fire", fire)
    return kv, fired


def test_a_late_peer_is_waited_for_and_then_named_when_lost(two_processes):
    """Process 1 reaches the loop 2.5 s after process 0 (it compiled slower), with a 1 s peer
    timeout; it beats for 2 s, then goes silent. It used to be named lost, as 'host unknown',
    1 s after process 0 started; now process 0 waits for it, does not fire while it beats, and
    fires once, naming its host and pid, only after the silence."""
    import threading
    import time

    from llama_jax.trainer.control import PeerWatch

    kv, fired = two_processes
    key = PeerWatch.KEY
    t0 = time.monotonic()
    last_beat = []

    def peer():
        time.sleep(2.5)
        kv.key_value_set(f"{key}who/1", "hostB pid 42")
        for b in range(10):  # 2 s of beats, 0.2 s apart (as PeerWatch's at timeout 1 s)
            kv.key_value_set(f"{key}beat/1", str(b), allow_overwrite=True)
            beat_at = time.monotonic() - t0
            time.sleep(0.2)
        last_beat.append(beat_at)

    threading.Thread(target=peer, daemon=True).start()
    watch = PeerWatch(timeout_s=1.0)
    watch.start()
    met = time.monotonic() - t0
    assert met >= 2.5, met  # start() returned only once process 1 had registered
    deadline = time.monotonic() + 10
    while not fired and time.monotonic() < deadline:
        time.sleep(0.05)
    lost_at = time.monotonic() - t0
    watch.close()
    assert len(fired) == 1 and fired[0][0].startswith("process 1 (hostB pid 42) sent no"), fired
    # fired at least the 1 s timeout after process 1's last beat, not while it was beating
    assert last_beat and lost_at >= last_beat[0] + 1.0, (last_beat, lost_at)


def test_a_peer_that_never_comes_is_named(two_processes, monkeypatch):
    """Process 1 never reaches the loop: start() waits max(MEET_S, 10 x timeout) for it, then
    fires once, on the main thread, naming it."""
    from llama_jax.trainer.control import PeerWatch

    _, fired = two_processes
    monkeypatch.setattr(PeerWatch, "MEET_S", 0.5)
    with pytest.raises(SystemExit):
        PeerWatch(timeout_s=0.01).start()
    want = ("process 1 did not reach the training loop within 0.5 s", "MainThread")
    assert fired == [want], fired


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_a_lost_peer_is_named(tmp_path, tiny_dataset, sig):
    """Two processes started by hand (no launcher to stop the other): process 1 is SIGKILLed
    or SIGSTOPped after step 5. Process 0 used to wait ~100 s, then abort with a C++ stack
    about an unhealthy 'task 1'. Now it ends with exit 3 and one error line naming process 1,
    its host and pid, within distributed.peer_timeout_s (8 s here) plus a heartbeat."""
    import socket
    import time

    from launch.local_cluster import free_port

    args = [f"--config.{o}" for o in [*SMALL, f"data.path={tiny_dataset[0]}", "train.steps=100000",
            "distributed.peer_timeout_s=8", f"distributed.coordinator=127.0.0.1:{free_port()}",
            "distributed.num_processes=2"]]  # fmt: skip
    procs = []
    try:
        for i in range(2):
            env = {**os.environ, "JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}  # fmt: skip
            if i == 1:
                env["LLAMA_JAX_SIGNAL_AT_STEP"] = f"{int(sig)}:5"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "launch.train", f"--config={ROOT}/configs/tiny.py",
                 f"--workdir={tmp_path}", *args, f"--config.distributed.process_id={i}"],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            ))  # fmt: skip
        t0 = time.time()
        _, err = procs[0].communicate(timeout=240)
        assert procs[0].returncode == 3, err[-3000:]
        last = err.strip().splitlines()[-1]
        host = socket.gethostname()
        assert last.startswith(f"error: PeerLost: process 1 ({host} pid {procs[1].pid})"), last
        assert time.time() - t0 < 90  # jax alone: its 100 s heartbeat timeout, then an abort
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()
