"""python -m launch.curate --recipe NAME --input GLOB --output DIR [--workers N]
    [--slurm-partition P]
    [--reference PAGES.jsonl --random PAGES.jsonl]   (commoncrawl)

NAME: commoncrawl, c4, github, wikipedia, books, arxiv or stackexchange.

The paper's per-source cleaning on HF datatrove (llama_jax.data.curate.recipes): cleaned JSONL shards in DIR,
what each step removed in DIR/removed/<step>/, and DIR/data_card.json + data_card.md with the
documents and bytes each step took in, kept and removed. Needs the curate extra:
pip install -e '.[curate]'.
"""

import argparse

from llama_jax import cli


def execute(c: cli.Command):
    from llama_jax.data.curate.recipes import curate

    a = c.args
    card = curate(a.recipe, a.input, a.output, a.workers, reference=a.reference,
                  random=a.random, slurm_partition=a.slurm_partition)  # fmt: skip
    last = card["steps"][-1]
    print(f"{a.recipe}: kept {last['docs_kept']} of {card['steps'][0]['docs_in']} documents -> "
          f"{a.output} (data card: {a.output}/data_card.md)")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.curate", description=__doc__)
    p.add_argument("--recipe", required=True, help="commoncrawl, c4, github, wikipedia, books, "
                   "arxiv or stackexchange")  # fmt: skip
    p.add_argument("--reference", help="commoncrawl: JSONL reference pages (e.g. cited sources)")
    p.add_argument("--random", help="commoncrawl: JSONL random pages (the classifier's negatives)")
    p.add_argument("--input", required=True, help="JSONL files: a glob or a directory")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--workers", type=int, default=1, help="datatrove worker processes")
    p.add_argument(
        "--slurm-partition",
        default=None,
        help="run as a SLURM job in this partition (datatrove's SLURM executor)",
    )
    return p


def main(argv=None):
    cli.call(execute, parser(), argv, config="none")


if __name__ == "__main__":
    main()
