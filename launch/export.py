"""python -m launch.export --workdir DIR [--step N] --output DIR [--dtype bfloat16]
    [--merge-lora] [--peft DIR]

Writes the params of a training checkpoint (no optimizer state) plus the model config, in the
format launch.generate, launch.eval and launch.convert read (llama_jax.checkpoint.export).
A LoRA run: --merge-lora writes its base with the adapters merged; --peft DIR writes a Hugging
Face PEFT adapter (adapter_config.json + adapter_model.safetensors).
"""

import argparse

from llama_jax import cli


def run(c: cli.Command):
    from llama_jax.checkpoint import export

    a = c.args
    out = export(a.workdir, a.output, a.step, a.dtype, merge_lora=a.merge_lora, peft=a.peft)
    print(f"exported to {out}" + (f" and {a.peft}" if a.peft and a.output else ""))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__)
    p.add_argument("--workdir", required=True, help="training run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--output", default=None, help="directory to write params to")
    p.add_argument("--merge-lora", action="store_true", help="LoRA: merge into the base")
    p.add_argument("--peft", default=None, help="LoRA: write a PEFT adapter to this directory")
    p.add_argument("--dtype", default=None, help="cast params, e.g. bfloat16 (default: as trained)")
    return p


def main(argv=None):
    cli.run(run, parser(), argv, config="none")


if __name__ == "__main__":
    main()
