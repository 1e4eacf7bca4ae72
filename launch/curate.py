"""python -m launch.curate --recipe NAME --input PATH --output DIR [--tasks N --workers W]
    [--slurm-partition P --slurm-time T --slurm-mem-per-cpu M --slurm-cpus-per-task C]
    [--reference PAGES.jsonl --random PAGES.jsonl]   (commoncrawl)
    [--bad-words FILE]                               (c4)

NAME: commoncrawl, c4, github, wikipedia, books, arxiv or stackexchange. PATH: a JSONL file, a
directory of them or a glob.

The paper's per-source cleaning on HF datatrove (llama_jax.data.curate.recipes), as N parallel
tasks per stage (input files are split among them; a dedup runs as signatures -> find ->
filter stages, with the same result for any N): cleaned JSONL shards in DIR, what each step
removed in DIR/removed/<step>/, and DIR/data_card.json + data_card.md with the documents and
bytes each step took in, kept and removed. Run the same command again to finish a killed run.
Needs the curate extra: pip install -e '.[curate]'.
"""

import argparse

from llama_jax import cli


def execute(c: cli.Command):
    from llama_jax.data.curate.jobs import Slurm
    from llama_jax.data.curate.recipes import curate

    a = c.args
    slurm = a.slurm_partition and Slurm(a.slurm_partition, a.slurm_time, a.slurm_cpus_per_task,
                                        a.slurm_mem_per_cpu)  # fmt: skip
    card = curate(a.recipe, a.input, a.output, a.workers, slurm=slurm or None, tasks=a.tasks,
                  shards=a.shards, reference=a.reference, random=a.random,
                  bad_words=a.bad_words)  # fmt: skip
    last = card["steps"][-1]
    print(f"{a.recipe}: kept {last['docs_kept']} of {card['steps'][0]['docs_in']} documents -> "
          f"{a.output} (data card: {a.output}/data_card.md)")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.curate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--recipe", required=True, help="commoncrawl, c4, github, wikipedia, books, "
                   "arxiv or stackexchange")  # fmt: skip
    p.add_argument("--input", required=True, help="JSONL: a file, a directory or a glob")
    p.add_argument("--output", required=True, help="directory to write (one run's)")
    p.add_argument("--tasks", type=int, default=1, help="datatrove tasks per stage")
    p.add_argument("--workers", type=int, default=1, help="local worker processes")
    p.add_argument("--shards", type=int, default=0,
                   help="hash shards of line/exact dedup (its find stage's tasks); 0: --tasks")  # fmt: skip
    p.add_argument("--reference", help="commoncrawl: JSONL reference pages (e.g. cited sources)")
    p.add_argument("--random", help="commoncrawl: JSONL random pages (the classifier's negatives)")
    p.add_argument("--bad-words", help="c4: a file of bad words or phrases, one a line (LDNOOBW)")
    p.add_argument("--slurm-partition", help="run each stage as a SLURM job array there")
    p.add_argument("--slurm-time", default="24:00:00", help="SLURM time limit per task")
    p.add_argument("--slurm-mem-per-cpu", default="4G", help="SLURM memory per CPU")
    p.add_argument("--slurm-cpus-per-task", type=int, default=1, help="SLURM CPUs per task")
    return p


def main(argv=None):
    cli.call(execute, parser(), argv, config="none")


if __name__ == "__main__":
    main()
