"""python -m launch.export --workdir DIR [--step N] --output DIR [--dtype bfloat16]

Writes the params of a training checkpoint (no optimizer state) plus the model config, in the
format launch.generate, launch.eval and launch.convert read (llama_jax.checkpoint.export).
"""

import argparse

from llama_jax import cli


def run(c: cli.Command):
    from llama_jax.checkpoint import export

    a = c.args
    print(f"exported step to {export(a.workdir, a.output, a.step, a.dtype)}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__)
    p.add_argument("--workdir", required=True, help="training run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--dtype", default=None, help="cast params, e.g. bfloat16 (default: as trained)")
    return p


def main(argv=None):
    cli.run(run, parser(), argv, config="none")


if __name__ == "__main__":
    main()
