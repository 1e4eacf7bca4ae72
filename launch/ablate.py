"""python -m launch.ablate --config configs/<name>.py --vary model.norm=rmsnorm,layernorm
    [--vary ...] --tokens 2M [--seeds 2] --workdir DIR [--grid] [--evals 8]
    [--config.group.field=value ...]

Trains the base config and its variants on the same data in the same order for the same token
budget, once per init seed, and writes DIR/results.csv, results.md and ablation.png. Each
--vary is one axis; the variants are the base config plus one run per other value of each axis
(one factor at a time), or every combination with --grid. Run the same command again to
resume an interrupted sweep: finished runs are skipped, a cut-short run resumes from its
checkpoint. See llama_jax/experiments/ablate.py.
"""

import argparse
import logging
import os
import sys

from llama_jax import cli


def execute(c: cli.Command):
    a = c.args
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    from llama_jax.experiments import ablate
    from llama_jax.trainer.control import fault_hooks

    try:
        axes = [ablate.parse_vary(v) for v in a.vary]
        ablate.sweep(
            c.cfg,
            axes,
            tokens=ablate.parse_tokens(a.tokens),
            seeds=a.seeds,
            workdir=a.workdir,
            grid=a.grid,
            evals=a.evals,
            hooks=fault_hooks(os.environ),  # tests' fault injection; () unless they set it
        )
    except ablate.SweepInterrupted as e:  # like launch.train: saved; rerunning resumes
        print(f"interrupted: {e}", flush=True)
        sys.exit(cli.RESUME_EXIT)
    with open(f"{a.workdir}/results.md") as f:
        print(f.read(), end="")
    print(f"wrote {a.workdir}/results.csv, results.md, ablation.png", flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.ablate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--vary",
        action="append",
        required=True,
        help="group.field=value[,value...]: one axis of the sweep (repeatable)",
    )
    p.add_argument("--tokens", required=True, help="training tokens per run, e.g. 2M, 500k, 1e6")
    p.add_argument("--seeds", type=int, default=2, help="init seeds per variant (default 2)")
    p.add_argument("--workdir", required=True, help="sweep directory (runs and results)")
    p.add_argument("--grid", action="store_true", help="every combination of the axes")
    p.add_argument("--evals", type=int, default=8, help="validation points per run (default 8)")
    return p


def main(argv=None):
    cli.call(execute, parser(), argv)


if __name__ == "__main__":
    main()
