"""python -m launch.train --config configs/<name>.py [--config.group.field=value ...] [--workdir DIR]

Trains (or resumes, when the workdir holds checkpoints) the configured model. Multi-host:
under SLURM it finds its peers by itself; elsewhere set --config.distributed.coordinator=host:port
--config.distributed.num_processes=N --config.distributed.process_id=i on each process (or use
python -m launch.local_cluster, which does).
"""

from llama_jax.parallel import xla_flags  # before jax is imported: XLA reads XLA_FLAGS once

xla_flags.setup()
import argparse
import logging
import os
import shlex
import sys

from llama_jax import cli


def execute(c: cli.Command):
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    for noisy in ("absl", "jax"):  # orbax's per-save chatter, jax's backend probing
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from llama_jax.trainer import loop as trainer  # after flag parsing: importing jax is slow
    from llama_jax.trainer.control import fault_hooks

    name = os.path.splitext(os.path.basename(c.config_path.split(":")[0]))[0]
    workdir = c.args.workdir or os.path.join("runs", name)
    # The same command again resumes the run (the summary block suggests it).
    again = shlex.join(["python", "-m", "launch.train", *c.argv])
    hooks = fault_hooks(os.environ)  # tests' fault injection; () unless they set it
    last = trainer.train(c.cfg, workdir, config_diff=c.diff, command=again, hooks=hooks)
    if "stopped_by" in last:  # saved: the scheduler should run this again
        sys.exit(cli.RESUME_EXIT)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", help="run directory; default runs/<config name>")
    return p


def main(argv=None):
    cli.call(execute, parser(), argv)


if __name__ == "__main__":
    main()
