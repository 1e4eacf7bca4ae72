"""python -m launch.local_cluster --num-processes 2 [--devices-per-process 2] -- <launch.train args>

Runs N training processes on localhost, each with simulated CPU devices, joined by
jax.distributed (gloo collectives): multi-host training on one machine, without SLURM.
Output lines are prefixed with the process index; if one process fails, the rest are stopped.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading

RESUME_EXIT = 75  # llama_jax.cli.RESUME_EXIT (not imported: this launcher starts no jax)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(i: int, stream, out):
    for line in iter(stream.readline, ""):
        out.write(f"[{i}] {line}")
        out.flush()


def _die_with_parent() -> None:
    """In a worker, before exec: the kernel sends it SIGKILL when the launcher dies (Linux
    PR_SET_PDEATHSIG), so a killed launcher leaves no worker blocked in a collective for
    minutes. Elsewhere a no-op."""
    if sys.platform != "linux":
        return
    import ctypes

    PR_SET_PDEATHSIG = 1  # noqa: N806 - the kernel's name
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def launch(
    num_processes: int, devices_per_process: int, args: list[str], module: str = "launch.train"
) -> int:
    """Starts the processes, waits for all, returns the first non-zero exit status (or 0)."""
    port = free_port()
    procs, pumps = [], []
    for i in range(num_processes):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        )
        cmd = [
            sys.executable,
            "-m",
            module,
            *args,
            f"--config.distributed.coordinator=127.0.0.1:{port}",
            f"--config.distributed.num_processes={num_processes}",
            f"--config.distributed.process_id={i}",
        ]
        p = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_die_with_parent,
        )
        procs.append(p)
        t = threading.Thread(target=_pump, args=(i, p.stdout, sys.stdout), daemon=True)
        t.start()
        pumps.append(t)

    def forward(signum, frame):  # SIGTERM/SIGINT/SIGUSR1 reach every process: they save, exit
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, forward)
    status = _wait_all(procs)
    for t in pumps:
        t.join(timeout=5)
    return status or next((p.returncode for p in procs if p.returncode), 0)


def _wait_all(procs) -> int:
    """Waits for every process; on the first failure (not 0, not a clean RESUME_EXIT stop)
    kills the rest, since a lone survivor would wait for its peers forever. Returns it (or 0)."""
    status = 0
    while any(p.poll() is None for p in procs):
        for i, p in enumerate(procs):
            try:
                rc = p.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            if rc not in (0, RESUME_EXIT) and status == 0:
                status = rc
                how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited {rc}"
                print(f"local_cluster: process {i} (pid {p.pid}) {how}; stopping the others",
                      file=sys.stderr, flush=True)  # fmt: skip
                for q in procs:
                    if q.poll() is None:
                        q.kill()
    return status


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    p = argparse.ArgumentParser(prog="python -m launch.local_cluster", description=__doc__)
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=1)
    p.add_argument("--module", default="launch.train", help="python module each process runs")
    a = p.parse_args(ours)
    sys.exit(launch(a.num_processes, a.devices_per_process, rest, a.module))


if __name__ == "__main__":
    main()
