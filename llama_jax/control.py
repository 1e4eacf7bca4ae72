"""What steers a training loop from outside: stop signals, the profiler's step range, and
fault injection for tests."""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes its step, saves and exits cleanly."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def install(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)

    def any_process(self) -> bool:
        """True when any process was signalled (all must stop at the same step)."""
        local = np.array([self.signal is not None], np.int32)
        if jax.process_count() == 1:
            return bool(local[0])
        return bool(np.max(multihost_utils.process_allgather(local)))


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


def inject_fault(step: int) -> None:
    """Fault injection for tests: LLAMA_JAX_SIGNAL_AT_STEP="SIGNUM:STEP" sends this process a
    real signal after that step, e.g. 9:12 (SIGKILL) or 15:5 (SIGTERM)."""
    spec = os.environ.get("LLAMA_JAX_SIGNAL_AT_STEP")
    if spec and int(spec.split(":")[1]) == step:
        os.kill(os.getpid(), int(spec.split(":")[0]))
