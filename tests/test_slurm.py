"""Multi-host under a real SLURM: a one-node cluster (launch/slurm/local_cluster.sh: munged,
slurmctld, slurmd, no cgroups) started for this module and stopped after it.

`srun -n 2` processes find each other with jax.distributed.initialize() and no arguments, and
`sbatch launch/slurm/train.sbatch` with 2 tasks trains the tiny config to the same per-step
losses as one process with the same global batch and mesh.

Needs root (to start the daemons) or an already running cluster that `sinfo` reaches. With
CI=true the tests fail when SLURM cannot be set up (the script installs the Debian packages when
missing). Elsewhere they are skipped when srun is not installed, or when no cluster answers and
this is not root; a failing `local_cluster.sh up` as root fails them.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from test_train import ROOT, SMALL, losses, run_train

pytestmark = pytest.mark.slow  # a SLURM cluster and multi-process training runs

CLUSTER = os.path.join(ROOT, "launch", "slurm", "local_cluster.sh")
JOB_NAME = "llama_jax_test"


def _unavailable(msg):
    """No SLURM is a failure, not a skip: these tests are the SLURM path's only check (CI sets
    up the one-node cluster with .ci/slurm_setup.sh; locally: bash .ci/slurm_setup.sh)."""
    pytest.fail(f"SLURM unavailable: {msg} (bash .ci/slurm_setup.sh sets up the test cluster)")


def _sinfo_ok(env):
    try:
        r = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and any(s.startswith(("idle", "mix")) for s in r.stdout.split())


@pytest.fixture(scope="module")
def slurm_env():
    """The environment for srun/sbatch: this process's, less SLURM_* job variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    if shutil.which("srun") is None:
        _unavailable("srun is not installed")
    if shutil.which("srun") is not None and _sinfo_ok(env):  # a cluster is already running
        yield env
        return
    if os.geteuid() != 0:
        _unavailable("no SLURM cluster answers sinfo and starting one needs root")
    r = subprocess.run(["bash", CLUSTER, "up"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        subprocess.run(["bash", CLUSTER, "down"], capture_output=True, timeout=120)
        pytest.fail(f"{CLUSTER} up failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr[-5000:]}")
    export = [ln for ln in r.stdout.splitlines() if ln.startswith("export SLURM_CONF=")]
    env["SLURM_CONF"] = export[-1].split("=", 1)[1]
    try:
        yield env
    finally:
        subprocess.run(["scancel", f"--name={JOB_NAME}"], env=env, capture_output=True, timeout=60)
        r = subprocess.run(["bash", CLUSTER, "down"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr


def _cpu_env(env, devices):
    return {
        **env,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }


def test_srun_processes_find_each_other(slurm_env):
    r = subprocess.run(
        [
            "srun",
            "-n",
            "2",
            f"--job-name={JOB_NAME}",
            "--kill-on-bad-exit=1",
            "--time=5",
            sys.executable,
            "launch/slurm/check_jax.py",
        ],
        cwd=ROOT,
        env=_cpu_env(slurm_env, 2),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    reports = sorted(
        (json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")),
        key=lambda d: d["process_index"],
    )
    assert [d["process_index"] for d in reports] == [0, 1], r.stdout
    for d in reports:
        assert d["process_count"] == 2 and d["slurm_procid"] == str(d["process_index"])
        assert d["local_devices"] == 2 and d["global_devices"] == 4
        assert d["allgather"] == [[0, 1], [1, 11]] and d["psum"] == 6.0 and d["ok"]


def test_sbatch_two_tasks_match_one_process(tmp_path, tiny_dataset, slurm_env):
    short = ["mesh.fsdp=4", "train.steps=8", "train.eval_every=0", "checkpoint.every_steps=0"]
    opts = [*SMALL, f"data.path={tiny_dataset[0]}", *short]
    t0 = time.time()
    one = run_train(tmp_path / "one", tiny_dataset, *short, devices=4)
    t1 = time.time()
    assert one.returncode == 0
    env = {
        **slurm_env,
        "CPU_DEVICES_PER_TASK": "2",
        "PYTHON": sys.executable,
        "WORKDIR": str(tmp_path / "two"),
        "XLA_FLAGS": "",
    }
    env.pop("JAX_PLATFORMS", None)  # the script's CPU_DEVICES_PER_TASK sets it
    out = tmp_path / "slurm-%j.out"
    r = subprocess.run(
        [
            "sbatch",
            "--wait",
            "--parsable",
            f"--job-name={JOB_NAME}",
            f"--output={out}",
            "--ntasks=2",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            "--gpus-per-node=0",
            "--time=10",
            "launch/slurm/train.sbatch",
            f"{ROOT}/configs/tiny.py",
            *[f"--config.{o}" for o in opts],
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"1 process: {t1 - t0:.0f} s, sbatch 2 tasks: {time.time() - t1:.0f} s")
    job = r.stdout.strip().split(";")[0]
    log_path = str(out).replace("%j", job)
    log = ""
    if job and os.path.exists(log_path):
        with open(log_path) as f:
            log = f.read()
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}\n{log[-8000:]}"
    # Both tasks joined through SLURM's environment (no --coordinator was given).
    assert "process 0 of 2, 2 local / 4 global devices" in log, log[-5000:]
    assert "process 1 of 2, 2 local / 4 global devices" in log, log[-5000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)


def test_curation_on_slurm_matches_local(tmp_path, slurm_env, monkeypatch):
    """launch.curate's SLURM path: datatrove's SLURM executor runs the github recipe's three
    stages as job arrays of 2 tasks (each depending on the one before) on the test cluster and
    gives the same documents and data card counts as the local executor; the exact copy is in
    the other task's file."""
    import glob
    import gzip

    pytest.importorskip("datatrove")
    from test_curate import _check_card

    from llama_jax.data.curate import jobs
    from llama_jax.data.curate import recipes as cur

    for k in [k for k in os.environ if k.startswith("SLURM_") and k not in slurm_env]:
        monkeypatch.delenv(k)
    for k, v in slurm_env.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "in").mkdir()
    rows = [{"text": "def f():\n    return 1\n", "license": "MIT"},
            {"text": "def f():\n    return 1\n", "license": "MIT"},
            {"text": "x = 1\n", "license": "gpl-3.0"},
            {"text": "var a=" + "1+" * 900 + "1;", "license": "mit"}]  # fmt: skip
    for k in range(2):  # two files: one per task, and the copy in the other task's file
        (tmp_path / "in" / f"part-{k}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows[k::2])
        )

    def run(name, **kw):
        card = cur.curate("github", str(tmp_path / "in"), str(tmp_path / name), tasks=2, **kw)
        texts = []
        for path in sorted(glob.glob(str(tmp_path / name / "*.jsonl.gz"))):
            with gzip.open(path, "rt") as f:
                texts += [json.loads(line)["text"] for line in f]
        return card, texts

    local_card, local = run("local")
    try:
        slurm = jobs.Slurm("debug", time="00:10:00", mem_per_cpu="500M", timeout_s=240)
        slurm_card, on_slurm = run("slurm", slurm=slurm)
    except TimeoutError:
        logs = glob.glob(str(tmp_path / "slurm" / "logs" / "slurm_logs" / "*"))
        raise AssertionError("\n".join(open(p).read()[-3000:] for p in logs)) from None
    assert on_slurm == local == ["def f():\n    return 1\n"]
    _check_card(slurm_card, 4)
    assert [r["docs_kept"] for r in slurm_card["steps"]] == [
        r["docs_kept"] for r in local_card["steps"]
    ]
