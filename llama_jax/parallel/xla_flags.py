"""XLA flags that pay for this workload, set before jax is imported unless the user set them.

XLA reads XLA_FLAGS once, when the backend starts, and aborts the process on a flag it does not
know. So setup() runs before `import jax` (launch/train.py, launch/benchmark.py): GPU_FLAGS on a
machine with a CUDA plugin and an NVIDIA device, CPU_FLAGS elsewhere, and only flags that this
jaxlib's shared objects name (tests/test_benchmark.py also starts a backend with each table, as
a name in the binary is not proof that the parser registers it); a flag already in XLA_FLAGS
(either value) is left as the user set it. LLAMA_JAX_XLA_DEFAULTS=0 turns the defaults off.
README.md ("XLA flags") explains each; BENCHMARKS.md has the CPU candidates measured.
"""

from __future__ import annotations

import glob
import importlib.util
import mmap
import os

# name -> (value, why). FSDP all-gathers each scanned layer's weights and reduce-scatters its
# gradients; these flags let XLA overlap that traffic with the neighbouring layers' matmuls.
GPU_FLAGS: dict[str, tuple[str, str]] = {
    "xla_gpu_enable_latency_hiding_scheduler": (
        "true",
        "schedule async collectives early/late so they overlap compute",
    ),
    "xla_gpu_enable_pipelined_all_gather": (
        "true",
        "prefetch layer i+1's FSDP weight all-gather during layer i (scan loop pipelining)",
    ),
    "xla_gpu_enable_pipelined_reduce_scatter": (
        "true",
        "overlap each layer's gradient reduce-scatter with the next layer's backward",
    ),
    "xla_gpu_enable_pipelined_all_reduce": (
        "true",
        "the same for all-reduces inside the layer loop (data-parallel gradients)",
    ),
    "xla_gpu_enable_while_loop_double_buffering": (
        "true",
        "double-buffer the scanned layer loop so the pipelined collectives have room to run",
    ),
    "xla_gpu_enable_highest_priority_async_stream": (
        "true",
        "run collectives on a high-priority stream so they are not starved by compute",
    ),
}

# XLA:CPU flags that measurably speed up the training step on CPU. None does on this jaxlib:
# oneDNN matmuls, XNNPACK off, YNNPACK eltwise/reduce fusions (+38% temp memory, slower),
# XNN graph fusion, the concurrency-optimized scheduler, 512-bit vectors and fast min/max all
# measured within the noise or slower (BENCHMARKS.md, "XLA:CPU flags"); the table stays, so
# that a flag which pays on a later jaxlib goes here and is checked like the GPU ones.
CPU_FLAGS: dict[str, tuple[str, str]] = {}

_CUDA_PLUGINS = (
    "jax_plugins.xla_cuda12",
    "jax_plugins.xla_cuda13",
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
)


def _find_spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _package_dirs(names) -> list[str]:
    dirs = []
    for name in names:
        spec = _find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs += list(spec.submodule_search_locations)
    return dirs


def gpu_machine(environ=os.environ) -> bool:
    """A CUDA jax plugin is installed, an NVIDIA device is present, JAX_PLATFORMS allows it."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and not any(p in platforms for p in ("cuda", "gpu")):
        return False
    has_device = os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia")
    return has_device and bool(_package_dirs(_CUDA_PLUGINS))


def known_flags(names, dirs=None) -> set[str]:
    """The names that every XLA flag parser shipped with jaxlib (and the CUDA plugin) knows.

    A shared object that parses XLA_FLAGS holds each flag name as a NUL-terminated string;
    one that holds "xla_dump_to" parses them, so a name must appear in each of those.
    """
    dirs = dirs if dirs is not None else _package_dirs(("jaxlib", *_CUDA_PLUGINS))
    files = [f for d in dirs for f in glob.glob(os.path.join(d, "**", "*.so*"), recursive=True)]
    known = set(names)
    parsers = 0
    for path in files:
        try:
            with (
                open(path, "rb") as f,
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m,
            ):
                if m.find(b"xla_dump_to\0") < 0:
                    continue
                parsers += 1
                known = {n for n in known if m.find(n.encode() + b"\0") >= 0}
        except (OSError, ValueError):
            continue
    return known if parsers else set()


def user_flag_names(xla_flags: str) -> set[str]:
    return {f.lstrip("-").split("=", 1)[0] for f in xla_flags.split() if f.startswith("--")}


def setup(environ=os.environ, *, force: str = "", dirs=None) -> list[str]:
    """Adds the defaults of this machine (GPU_FLAGS on a CUDA machine, else CPU_FLAGS) that
    the user has not set to environ["XLA_FLAGS"]; returns them.

    Call before jax is imported. force="gpu" or "cpu" picks the table (tests); no-op under
    LLAMA_JAX_XLA_DEFAULTS=0.
    """
    if environ.get("LLAMA_JAX_XLA_DEFAULTS", "1") == "0":
        return []
    table = {"gpu": GPU_FLAGS, "cpu": CPU_FLAGS}[
        force or ("gpu" if gpu_machine(environ) else "cpu")
    ]
    current = environ.get("XLA_FLAGS", "")
    wanted = [n for n in table if n not in user_flag_names(current)]
    known = known_flags(wanted, dirs)
    added = [f"--{n}={table[n][0]}" for n in wanted if n in known]
    if added:
        environ["XLA_FLAGS"] = " ".join([*current.split(), *added])
    return added
