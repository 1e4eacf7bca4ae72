"""What steers a training loop from outside: stop signals, the profiler's step range, the
watchdogs, fault injection for tests, and the lock that keeps a second run out of a workdir.
Constructing any of them does nothing; start()/install() (called by the loop) does."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopFlag:
    """Set by SIGTERM, SIGINT or SIGUSR1 (SLURM's --signal=USR1@<seconds> warning before a
    time limit); the loop finishes its step, saves and exits with cli.RESUME_EXIT."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def install(self):
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)

    def any_process(self) -> bool:
        """True when any process was signalled (all must stop at the same step)."""
        return bool(gather_flags(self.signal is not None)[:, 0].any())


def gather_flags(*flags: bool) -> np.ndarray:
    """[process, flag]: every process's flags (every process must call this, in step)."""
    local = np.array(flags, np.int32)[None]
    if jax.process_count() == 1:
        return local
    return np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(flags))


class Profiler:
    """A jax.profiler trace of steps a..b (train.profile_steps) into <workdir>/profile."""

    def __init__(self, step_range: tuple[int, int] | None, workdir: str):
        self.range, self.active = step_range, False
        self.dir = os.path.join(workdir, "profile", f"process_{jax.process_index()}")

    def before(self, step: int) -> None:
        if self.range and step == self.range[0]:
            jax.profiler.start_trace(self.dir)
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step == self.range[1]:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def fault_hooks(environ) -> tuple:
    """Fault injection for tests, as after-step hooks (Services.hooks) that the launchers
    install from the environment: LLAMA_JAX_SIGNAL_AT_STEP="SIGNUM:STEP" sends this process a
    real signal after that step, e.g. 9:12 (SIGKILL) or 15:5 (SIGTERM);
    LLAMA_JAX_HANG_AT_STEP=STEP hangs after that step (a stuck read or collective). () when
    neither is set: the loop then runs no hook at all."""
    hooks = []
    if spec := environ.get("LLAMA_JAX_SIGNAL_AT_STEP"):
        signum, at = (int(x) for x in spec.split(":"))
        hooks.append(lambda step: os.kill(os.getpid(), signum) if step == at else None)
    if hang := environ.get("LLAMA_JAX_HANG_AT_STEP"):
        hooks.append(lambda step: threading.Event().wait() if step == int(hang) else None)
    return tuple(hooks)


class WorkdirLock:
    """One run per workdir: <workdir>/run.lock, created atomically by process 0, holding the
    holder's host and pid; removed when the run ends. A lock whose pid is gone on this host is
    stale (a killed run) and is taken over with a warning; a live holder, or one on another
    host (whose pid cannot be checked from here), is a one-line error naming it."""

    NAME = "run.lock"

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, self.NAME)
        self.held = False

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%F %T")}
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(me["host"])
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RuntimeError(f"could not take {self.path}")

    def _take_over_if_stale(self, host: str) -> None:
        try:
            with open(self.path) as f:
                holder = json.load(f)
        except (OSError, ValueError):  # torn by a kill while it was written: stale
            holder = {"host": host, "pid": -1}
        pid, where = holder.get("pid", -1), holder.get("host", "?")
        if where != host or _alive(pid):
            raise RuntimeError(
                f"{os.path.dirname(self.path)} is in use by pid {pid} on host {where} since "
                f"{holder.get('since', '?')}: one run per workdir. If that run is dead, delete "
                f"{self.path}"
            )
        logging.getLogger(__name__).warning(
            "taking over the stale lock of dead pid %s (%s)", pid, self.path
        )
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class PeerWatch:
    """Names the process that died. On several processes, a thread beats in the jax distributed
    key-value store every few seconds and watches the others' beats. When a peer has not beaten
    for timeout_s (killed, stopped, its host gone), says it failed, or the coordinator cannot be
    reached, it prints one error line naming that process, its host and pid, and exits with
    status 3 (jax alone aborts ~100 s later with a C++ stack about an unhealthy 'task'). Off on
    one process or when timeout_s is 0. start() first waits for every process to reach the
    loop, so the clock runs from each one's first beat. close() tells the others this process
    finished (they stop watching it) or failed (they stop within seconds instead of waiting in
    a collective)."""

    EXIT = 3  # as StepWatchdog's: a watchdog ended the run
    KEY = "llama_jax/peer/"
    MEET_S = 300.0  # the least wait for the others to reach the loop (jax's own init timeout)

    def __init__(self, timeout_s: float):
        self.timeout_s, self.seen, self.who, self.found = timeout_s, {}, {}, None
        self._stop, self._hold = threading.Event(), threading.Event()
        self._thread = None

    def start(self) -> None:
        if self.timeout_s <= 0 or jax.process_count() == 1:
            return
        from jax._src import distributed  # the client orbax's barriers use too

        self.client, self.me = distributed.global_state.client, jax.process_index()
        self.client.key_value_set(
            f"{self.KEY}who/{self.me}", f"{socket.gethostname()} pid {os.getpid()}"
        )
        self._meet()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="peer-watch")
        self._thread.start()

    def _meet(self) -> None:
        """Waits until every process has reached the loop, so each one's heartbeat clock starts
        at its first beat: a host that compiles or loads data slower is late, not lost (it was
        named lost after timeout_s, as 'host unknown'). One that never comes is named lost."""
        wait_s = max(self.MEET_S, 10 * self.timeout_s)
        deadline = time.monotonic() + wait_s
        for rank in range(jax.process_count()):
            key = f"{self.KEY}who/{rank}"
            left_ms = max(1, int((deadline - time.monotonic()) * 1000))
            try:
                self.who[key] = self.client.blocking_key_value_get(key, left_ms)
            except Exception:  # noqa: BLE001 - deadline exceeded (or the coordinator is gone)
                self.fire(f"process {rank} did not reach the training loop within {wait_s:g} s")

    def _watch(self) -> None:
        beat = 0
        while not self._stop.wait(min(2.0, self.timeout_s / 5)):
            beat += 1
            try:
                lost = self._beat(str(beat))
            except Exception as e:  # noqa: BLE001 - the coordinator (process 0) is unreachable
                lost = (0, f"is unreachable (the coordinator; {type(e).__name__})")
            if lost is None or self._stop.is_set():
                continue
            rank, why = lost
            self.found = self.found or f"process {rank} ({self._who(rank)}) {why}"
            # a failed peer: this process may be failing too and will say why itself
            if not self._hold.is_set() and not (why.startswith("failed") and self._stop.wait(5)):
                self.fire(self.found)

    def _beat(self, value: str) -> tuple[int, str] | None:
        """Beats; returns (rank, why) of a peer that failed or was silent for timeout_s."""
        self.client.key_value_set(f"{self.KEY}beat/{self.me}", value, allow_overwrite=True)
        now = time.monotonic()
        beats = dict(self.client.key_value_dir_get(f"{self.KEY}beat/"))
        for rank in range(jax.process_count()):
            value = beats.get(f"{self.KEY}beat/{rank}", "")  # "": not beating yet
            if rank not in self.seen or self.seen[rank][0] != value:
                self.seen[rank] = (value, now)
            if value == "failed":
                return rank, "failed (see its log)"
            if value != "done" and now - self.seen[rank][1] > self.timeout_s:
                return rank, f"sent no heartbeat for {self.timeout_s:g} s"
        return None

    def _who(self, rank: int) -> str:
        return self.who.get(f"{self.KEY}who/{rank}", "host unknown")

    def lost_peer(self) -> str | None:
        """After a collective failed: waits up to timeout_s (+ a beat) for a peer to turn out
        lost, without exiting; says which, or None."""
        if self._thread is None:
            return None
        self._hold.set()
        deadline = time.monotonic() + self.timeout_s + 5
        while self.found is None and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.found

    def fire(self, found: str) -> None:
        """Prints the error line and exits at once: a save or jax's shutdown barrier would wait
        minutes for the lost peer."""
        import sys

        print(  # after a newline: a progress bar may be mid-line
            f"\nerror: PeerLost: {found}; process {self.me} stops too (exit {self.EXIT}). Rerun "
            "the job to resume from the last checkpoint",
            file=sys.stderr,
            flush=True,
        )
        os._exit(self.EXIT)

    def close(self, failed: bool = False) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        outcome = "failed" if failed else "done"
        with contextlib.suppress(Exception):
            self.client.key_value_set(f"{self.KEY}beat/{self.me}", outcome, allow_overwrite=True)


class StepWatchdog:
    """train.step_timeout_s: a thread that ends the process when the loop stops making
    progress (a stuck data read or collective): if no beat() comes for max(timeout_s, factor x
    the recent median beat interval), it prints every thread's stack (faulthandler) and one
    `error:` line, then exits with status 3. Off when timeout_s is 0."""

    EXIT = 3

    def __init__(self, timeout_s: float, factor: float = 10.0, window: int = 20):
        self.timeout_s, self.factor, self.window = timeout_s, factor, window
        self.intervals: list[float] = []
        self.last = float("inf")  # the clock starts at the first beat: compilation is before it
        self.step = 0
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> None:
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, daemon=True, name="step-watchdog")
            self._thread.start()

    def beat(self, step: int) -> None:
        now = time.monotonic()
        if self.last != float("inf"):
            self.intervals = (self.intervals + [now - self.last])[-self.window :]
        self.last, self.step = now, step

    def pause(self) -> None:
        """Before work that is not a step (evaluation, a save): the next beat restarts the clock."""
        self.last = float("inf")

    def resume(self) -> None:
        self.last = time.monotonic()

    def limit(self) -> float:
        recent = sorted(self.intervals)
        median = recent[len(recent) // 2] if recent else 0.0
        return max(self.timeout_s, self.factor * median)

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            waited = time.monotonic() - self.last
            if waited > self.limit():
                self._fire(waited)

    def _fire(self, waited: float) -> None:
        import faulthandler
        import sys

        faulthandler.dump_traceback(all_threads=True)
        print(
            f"error: StepWatchdog: no progress for {waited:.0f} s after step {self.step} "
            f"(limit {self.limit():.0f} s = max(train.step_timeout_s, {self.factor:g} x the "
            "recent median step)); the stacks of all threads are above",
            file=sys.stderr,
            flush=True,
        )
        os._exit(self.EXIT)

    def close(self) -> None:
        self._stop.set()
