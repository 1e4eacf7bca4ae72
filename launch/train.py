"""python -m launch.train --config configs/<name>.py [--config.field=value ...] [--workdir DIR]

Trains (or resumes, when the workdir holds checkpoints) the configured model. Multi-host:
under SLURM it finds its peers by itself; elsewhere pass --coordinator host:port
--num-processes N --process-id i (or use python -m launch.local_cluster).
"""

from llama_jax import xla_flags  # before jax is imported: XLA reads XLA_FLAGS once

xla_flags.setup()
import logging
import os

from absl import flags
from ml_collections import config_flags

from llama_jax import cli
from llama_jax.config import load_config_file

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory; default runs/<config name>")
_COORD = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host)")
_NPROC = flags.DEFINE_integer("num_processes", None, "processes in the job (multi-host)")
_PID = flags.DEFINE_integer("process_id", None, "index of this process (multi-host)")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "jax"):  # orbax's per-save chatter, jax's backend probing
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from llama_jax import trainer  # after flag parsing: importing jax is slow

    cfg = _CONFIG.value
    with cfg.unlocked():
        if _COORD.value:
            cfg.distributed.coordinator = _COORD.value
        if _NPROC.value is not None:
            cfg.distributed.num_processes = _NPROC.value
        if _PID.value is not None:
            cfg.distributed.process_id = _PID.value
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = _WORKDIR.value or os.path.join("runs", os.path.splitext(os.path.basename(path))[0])
    trainer.train(cfg, workdir, config_diff=trainer.config_diff(load_config_file(path), cfg))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    cli.run(main)
