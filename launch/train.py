"""python -m launch.train --config configs/<name>.py [--config.group.field=value ...] [--workdir DIR]

Trains (or resumes, when the workdir holds checkpoints) the configured model. Multi-host:
under SLURM it finds its peers by itself; elsewhere pass --coordinator host:port
--num_processes N --process_id i (or use python -m launch.local_cluster).
"""

from llama_jax import xla_flags  # before jax is imported: XLA reads XLA_FLAGS once

xla_flags.setup()
import argparse
import dataclasses
import logging
import os

from llama_jax import cli


def run(c: cli.Command):
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    for noisy in ("absl", "jax"):  # orbax's per-save chatter, jax's backend probing
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from llama_jax import trainer  # after flag parsing: importing jax is slow

    a, cfg = c.args, c.run
    given = {
        k: v
        for k, v in (
            ("coordinator", a.coordinator),
            ("num_processes", a.num_processes),
            ("process_id", a.process_id),
        )
        if v is not None
    }
    cfg = dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed, **given))
    name = os.path.splitext(os.path.basename(c.config_path.split(":")[0]))[0]
    workdir = a.workdir or os.path.join("runs", name)
    trainer.train(cfg, workdir, config_diff=c.diff, config_path=c.config_path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", help="run directory; default runs/<config name>")
    p.add_argument("--coordinator", help="host:port of process 0 (multi-host)")
    p.add_argument("--num_processes", "--num-processes", type=int, help="processes in the job")
    p.add_argument("--process_id", "--process-id", type=int, help="index of this process")
    return p


def main(argv=None):
    cli.run(run, parser(), argv)


if __name__ == "__main__":
    main()
