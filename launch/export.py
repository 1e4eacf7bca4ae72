"""python -m launch.export --workdir DIR [--step N] --output DIR [--dtype bfloat16]

Writes the params of a training checkpoint (no optimizer state) plus the model config, in the
format launch.generate, launch.eval and launch.convert read.
"""

import argparse
import os

from llama_jax import cli


def export(workdir: str, output: str, step: int | None = None, dtype: str | None = None) -> str:
    import jax
    from ml_collections import ConfigDict

    from llama_jax import params_io
    from llama_jax import train_step as ts
    from llama_jax.checkpoint import Checkpointer
    from llama_jax.sharding import make_mesh

    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints in {workdir} (expected {ckpt_dir})")
    ckpt = Checkpointer(ckpt_dir, ConfigDict({"keep": 1, "keep_period": 0, "async_save": False}),
                        read_only=True)
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.all_steps():
        raise FileNotFoundError(f"no checkpoint step {step} in {ckpt_dir}; have {ckpt.all_steps()}")
    cfg = ConfigDict(ckpt.restore_meta(step)["config"])
    # Restore onto this machine's devices whatever mesh wrote it: FSDP over all of them.
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
    abstract, _ = ts.abstract_train_state(cfg, make_mesh(cfg.mesh))
    state, _ = ckpt.restore(abstract, step)
    ckpt.close()
    params_io.save_params(output, jax.device_get(state.params), ts.model_config(cfg), dtype=dtype)
    return output


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__)
    p.add_argument("--workdir", required=True, help="training run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--dtype", default=None, help="cast params, e.g. bfloat16 (default: as trained)")
    a = p.parse_args(argv)
    try:
        print(f"exported step to {export(a.workdir, a.output, a.step, a.dtype)}")
    except cli.USER_ERRORS as e:
        cli.fail(e)


if __name__ == "__main__":
    main()
