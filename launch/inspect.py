"""python -m launch.inspect --config configs/<name>.py [--config.group.field=value] [--json] [--memory]

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
    """--devices, else the product of the positive --config.mesh.{data,fsdp,tensor,context}
    given."""
    if _argv_value(argv, "devices"):
        return int(_argv_value(argv, "devices"))
    n = 1
    for axis in ("data", "fsdp", "tensor", "context"):
        v = _argv_value(argv, f"config.mesh.{axis}")
        if v is not None and v.isdigit() and int(v) > 0:  # a bad value: the config's error
            n *= int(v)
    return n


def _simulate_devices(n: int) -> None:
    """CPU platform with n devices; must run before jax is imported."""
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__" and "--memory" in sys.argv:
    _simulate_devices(simulated_devices(sys.argv))

import argparse
import json

from llama_jax import cli
from llama_jax.model import stats


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:,.2f} {suffix}{unit}".strip()
        n /= 1000
    return f"{n:.2f} E{unit}"


def _memory(c: cli.Command) -> dict:
    import jax

    from llama_jax.parallel import sharding as shd
    from llama_jax.train import memory

    cfg, a = c.cfg, c.args
    mesh = shd.make_mesh(*cfg.mesh.sizes)
    if "train.batch_size" not in c.overrides:
        batch = a.rows_per_device * shd.batch_shards(mesh)
        cfg = cfg.replace({"train.batch_size": batch, "train.grad_accum_steps": 1})
    if jax.default_backend() != "cpu":
        print(
            f"note: compiling on {jax.default_backend()} ({len(jax.devices())} devices)",
            file=sys.stderr,
        )
    policies = [p for p in a.policies.split(",") if p] or None

    def progress(r):
        print(f"compiled {r['policy']} in {r['compile_s']:.1f}s", file=sys.stderr)

    return memory.analyze(cfg, mesh, policies, log=None if a.json else progress)


def execute(c: cli.Command):
    cfg, a = c.cfg, c.args
    info = stats.summary(cfg.model, cfg.train.seq_len)
    if a.memory:
        from llama_jax.train import memory

        result = _memory(c)
        if a.json:
            print(json.dumps({**info, "memory": result}))
        else:
            print(memory.format_report(result, a.device_gib * 2**30))
        return
    if a.json:
        print(json.dumps(info))
        return
    print(f"parameters           {info['parameters']:,}")
    print(
        f"FLOPs/token (train)  {_human(info['flops_per_token'])} "
        f"(6N {_human(info['flops_per_token_6n'])} + causal attention "
        f"{_human(info['flops_per_token_attention'])} at seq {info['seq_len']})"
    )
    print(
        f"FLOPs/token (PaLM)   {_human(info['flops_per_token_palm'])} (6 x non-embedding params "
        "+ 12 L D T: the MFU basis of PaLM and MaxText)"
    )
    for key in ("params", "adamw", "grads"):
        print(f"{key + ' bytes':<21}{_human(info[key + '_bytes'], 'B')}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.inspect",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--memory", action="store_true", help="compile the step per remat policy: will it fit?"
    )
    p.add_argument(
        "--devices", type=int, default=None, help="simulated devices; default: mesh product"
    )
    p.add_argument(
        "--rows_per_device", type=int, default=1, help="sequences per device for --memory"
    )
    p.add_argument("--policies", default="", help="remat policies for --memory; '' = all")
    p.add_argument(
        "--device_gib", type=float, default=80.0, help="device memory to mark fits/OOM against"
    )
    return p


def main(argv=None):
    cli.call(execute, parser(), argv)


if __name__ == "__main__":
    main()
