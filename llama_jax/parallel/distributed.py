"""Multi-process start-up: explicit coordinator, SLURM auto-detection, or a single process."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """Calls jax.distributed.initialize when the job has several processes.

    One process per node with all its GPUs is the documented mode. Explicit
    coordinator/num_processes/process_id win; otherwise SLURM is detected from its environment
    (jax's own cluster detection reads SLURM_* variables). CPU processes use gloo collectives.
    """
    explicit = bool(coordinator)
    if not explicit and not in_slurm_job():
        return
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        if num_processes < 1 or process_id < 0:
            raise ValueError(
                "distributed.coordinator is set: also set distributed.num_processes and "
                "distributed.process_id (or launch under SLURM)"
            )
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
