"""python -m launch.inspect --config configs/<name>.py [--config.x=y] [--json] [--memory]

Parameter count, FLOPs per token and state bytes from abstract shapes: works for 65B on a laptop.

--memory ("will it fit?") compiles the real training step ahead of time for each remat policy
on simulated CPU devices of the requested mesh and prints per-device bytes of parameters,
optimizer state, gradients and activations beside the analytic estimate; nothing is allocated:

  python -m launch.inspect --config configs/llama_65b.py --config.mesh.fsdp=64 --memory

The simulated device count is --devices, else the product of the --config.mesh.* sizes given
on the command line. It has to be set before jax is imported (XLA_FLAGS), which is why this
module reads sys.argv at import time. Activations are for --rows_per_device sequences per
device (global batch = rows x data x fsdp, grad_accum 1) unless --config.train.batch_size is
given; they scale with it.
"""

import os
import sys


def _argv_value(argv, name):
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def simulated_devices(argv) -> int:
    """--devices, else the product of the positive --config.mesh.{data,fsdp,tensor} given."""
    if _argv_value(argv, "devices"):
        return int(_argv_value(argv, "devices"))
    n = 1
    for axis in ("data", "fsdp", "tensor"):
        v = _argv_value(argv, f"config.mesh.{axis}")
        if v is not None and int(v) > 0:
            n *= int(v)
    return n


def _simulate_devices(n: int) -> None:
    """CPU platform with n devices; must run before jax is imported."""
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    os.environ["XLA_FLAGS"] = " ".join(
        [*flags, f"--xla_force_host_platform_device_count={n}"]
    )
    os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__" and ("--memory" in sys.argv or "--memory=true" in sys.argv):
    _simulate_devices(simulated_devices(sys.argv))

import json

from absl import flags
from ml_collections import config_flags

from llama_jax import cli, stats
from llama_jax.config import ModelConfig

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file", lock_config=True
)
_JSON = flags.DEFINE_bool("json", False, "print one JSON object")
_MEMORY = flags.DEFINE_bool(
    "memory", False, "compile the step per remat policy: will it fit?"
)
_DEVICES = flags.DEFINE_integer(
    "devices", None, "simulated devices; default: mesh product"
)
_ROWS = flags.DEFINE_integer("rows_per_device", 1, "sequences per device for --memory")
_POLICIES = flags.DEFINE_string("policies", "", "remat policies for --memory; '' = all")
_DEVICE_GIB = flags.DEFINE_float(
    "device_gib", 80.0, "device memory to mark fits/OOM against"
)


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:,.2f} {suffix}{unit}".strip()
        n /= 1000
    return f"{n:.2f} E{unit}"


def _memory(cfg) -> dict:
    import jax

    from llama_jax import memory
    from llama_jax import sharding as shd

    mesh = shd.make_mesh(cfg.mesh)
    if "--config.train.batch_size" not in " ".join(sys.argv):
        cfg.train.batch_size = _ROWS.value * mesh.shape["data"] * mesh.shape["fsdp"]
        cfg.train.grad_accum_steps = 1
    if jax.default_backend() != "cpu":
        print(
            f"note: compiling on {jax.default_backend()} ({len(jax.devices())} devices)",
            file=sys.stderr,
        )
    policies = [p for p in _POLICIES.value.split(",") if p] or None
    log = (
        None
        if _JSON.value
        else (
            lambda r: print(
                f"compiled {r['policy']} in {r['compile_s']:.1f}s", file=sys.stderr
            )
        )
    )
    return memory.analyze(cfg, mesh, policies, log=log)


def main(argv):
    del argv
    cfg = _CONFIG.value
    info = stats.summary(ModelConfig.from_config(cfg.model), cfg.train.seq_len)
    if _MEMORY.value:
        from llama_jax import memory

        result = _memory(cfg)
        if _JSON.value:
            print(json.dumps({**info, "memory": result}))
        else:
            print(memory.format_report(result, _DEVICE_GIB.value * 2**30))
        return
    if _JSON.value:
        print(json.dumps(info))
        return
    print(f"parameters           {info['parameters']:,}")
    print(
        f"FLOPs/token (train)  {_human(info['flops_per_token'])} "
        f"(6N {_human(info['flops_per_token_6n'])} + causal attention "
        f"{_human(info['flops_per_token_attention'])} at seq {info['seq_len']})"
    )
    for key in ("params", "adamw", "grads"):
        print(f"{key + ' bytes':<21}{_human(info[key + '_bytes'], 'B')}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    cli.run(main)
