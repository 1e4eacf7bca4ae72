"""python -m launch.export --workdir DIR [--step N] --output DIR [--dtype bfloat16]
    [--merge-lora] [--peft DIR [--peft-base NAME_OR_DIR]]

Writes the params of a training checkpoint (no optimizer state) plus the model config, in the
format launch.generate, launch.eval and launch.convert read (llama_jax.checkpoint.export.export).
A LoRA run: --merge-lora writes its base with the adapters merged in float32 (stored in float32
unless --dtype says otherwise; the merge error is printed); --peft DIR writes a Hugging Face
PEFT adapter (adapter_config.json + adapter_model.safetensors) whose base is --peft-base, or
the run's train.init_from directory when that is hf:DIR.
"""

import argparse

from llama_jax import cli


def execute(c: cli.Command):
    from llama_jax.checkpoint.export import export

    a = c.args
    out = export(a.workdir, a.output, a.step, a.dtype, merge_lora=a.merge_lora, peft=a.peft,
                 peft_base=a.peft_base, report=cli.say)  # fmt: skip
    print(f"exported to {out}" + (f" and {a.peft}" if a.peft and a.output else ""))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__)
    p.add_argument("--workdir", required=True, help="training run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--output", default=None, help="directory to write params to")
    p.add_argument("--merge-lora", action="store_true", help="LoRA: merge into the base")
    p.add_argument("--peft", default=None, help="LoRA: write a PEFT adapter to this directory")
    p.add_argument("--peft-base", default=None,
                   help="PEFT: the base model's name or directory (default: hf:DIR's DIR)")  # fmt: skip
    p.add_argument("--dtype", default=None,
                   help="cast params, e.g. bfloat16 (default: as trained; float32 for a merge)")  # fmt: skip
    return p


def main(argv=None):
    cli.call(execute, parser(), argv, config="none")


if __name__ == "__main__":
    main()
