"""srun -n N python launch/slurm/check_jax.py: do the job's processes find each other?

Each task calls jax.distributed.initialize() with no arguments (JAX reads the coordinator,
process count and index from SLURM's environment), then all-gathers its process index and a
value from every local device. Prints one JSON line per task; exits non-zero if the gathered
values are not what N joined processes give. On CPU-only nodes gloo collectives are used.
"""

import json
import os
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize()

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

n, i = jax.process_count(), jax.process_index()
gathered = multihost_utils.process_allgather(np.array([i, 10 * i + 1], np.int32))
# A jitted cross-process reduction over every device of the job.
x = multihost_utils.host_local_array_to_global_array(
    np.full((jax.local_device_count(),), i + 1, np.float32),
    jax.sharding.Mesh(np.array(jax.devices()), ("d",)),
    jax.sharding.PartitionSpec("d"),
)
total = float(
    jax.jit(
        jnp.sum,
        out_shardings=jax.sharding.NamedSharding(
            jax.sharding.Mesh(np.array(jax.devices()), ("d",)), jax.sharding.PartitionSpec()
        ),
    )(x)
)
want_total = jax.local_device_count() * n * (n + 1) / 2
ok = (
    gathered.tolist() == [[p, 10 * p + 1] for p in range(n)]
    and total == want_total
    and jax.device_count() == n * jax.local_device_count()
)
print(
    json.dumps(
        {
            "process_index": i,
            "process_count": n,
            "slurm_procid": os.environ.get("SLURM_PROCID"),
            "local_devices": jax.local_device_count(),
            "global_devices": jax.device_count(),
            "allgather": gathered.tolist(),
            "psum": total,
            "ok": ok,
        }
    ),
    flush=True,
)
jax.distributed.shutdown()
sys.exit(0 if ok else 1)
