"""Running a recipe's stages as datatrove jobs: locally (N tasks over W worker processes) or on
SLURM (one job array per stage, each depending on the one before), resumable, in one output
directory that belongs to one run.

Each stage logs to DIR/logs/<stage>/ (datatrove's stats/, completions/ and logs/ per task). A
task that finished leaves a completion marker and is not run again, so a killed or timed-out
curation is finished by running the same command: the unfinished tasks rewrite their own
files from the start. DIR/curation.json records the recipe, the input files and the options;
a run with other ones into the same DIR is refused, so two curations never mix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from datatrove.pipeline.readers import JsonlReader

MANIFEST = "curation.json"


@dataclasses.dataclass
class Stage:
    name: str
    pipeline: list
    tasks: int


@dataclasses.dataclass(frozen=True)
class Slurm:
    """A SLURM run: the partition, and what each array task asks for."""

    partition: str
    time: str = "24:00:00"  # per task
    cpus_per_task: int = 1
    mem_per_cpu: str = "4G"  # the filter stage holds its duplicate list, the find stage a shard
    timeout_s: float = 7 * 24 * 3600  # how long curate() waits for the last stage


class Reader(JsonlReader):
    """datatrove's JsonlReader, except for the lines it drops with a warning: a line orjson
    refuses (a lone surrogate escaped in JSON, "\\udc80", which Python's json reads) is read by
    json; a line neither reads is counted (stat unreadable_lines, in the data card) and named
    in the log; a file that is not UTF-8 is an error naming it (datatrove skipped its rest)."""

    def read_file(self, filepath: str):
        import orjson
        from loguru import logger

        with self.data_folder.open(filepath, "r", compression=self.compression) as f:
            try:
                for li, line in enumerate(f):
                    with self.track_time():
                        try:
                            data = orjson.loads(line)
                        except orjson.JSONDecodeError:
                            try:
                                data = json.loads(line)
                            except ValueError as e:
                                self.stat_update("unreadable_lines")
                                logger.warning(f"{filepath} line {li + 1}: not JSON ({e})")
                                continue
                        document = self.get_document_from_dict(data, filepath, li)
                    if document:
                        yield document
            except UnicodeDecodeError as e:
                raise ValueError(f"{filepath} is not UTF-8 text ({e})") from None


class RankReader(Reader):
    """Reads the one file a task of the stage before wrote (DIR/<rank>.jsonl.gz), if it wrote one:
    the carried documents of task r go to task r, in their order."""

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        name = f"{rank:05d}.jsonl.gz"
        if self.data_folder.exists(name):
            for doc in self.read_files_shard([name]):
                self.update_doc_stats(doc)
                yield doc


def claim(output: str, manifest: dict) -> None:
    """Writes DIR/curation.json, or checks that the one there describes this run."""
    path = os.path.join(output, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != manifest:
            diff = sorted(k for k in {*old, *manifest} if old.get(k) != manifest.get(k))
            raise ValueError(
                f"--output {output} holds a curation of recipe {old.get('recipe')!r} on "
                f"{old.get('input')!r} (it differs in {', '.join(diff)}): use another --output"
            )
        return
    if os.path.isdir(output) and os.listdir(output):
        raise ValueError(f"--output {output} is not empty and holds no {MANIFEST}: use another")
    os.makedirs(output, exist_ok=True)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)


def run(stages: list[Stage], logs: str, workers: int = 1, slurm: Slurm | None = None) -> None:
    """Runs the stages in order, each after the one before has finished all its tasks."""
    if slurm:
        return _run_on_slurm(stages, logs, slurm)
    from datatrove.executor.local import LocalPipelineExecutor

    executor = None
    for st in stages:
        executor = LocalPipelineExecutor(
            st.pipeline, tasks=st.tasks, workers=min(workers, st.tasks),
            logging_dir=os.path.join(logs, st.name), depends=executor,
        )  # fmt: skip
    executor.run()


def _run_on_slurm(stages: list[Stage], logs: str, s: Slurm) -> None:
    """datatrove's SLURM executor: a job array per stage, run with this Python on PATH; the
    stats are summed by the data card (not by datatrove's separate merge job). Waits for the
    last stage's completion markers."""
    from datatrove.executor.slurm import SlurmPipelineExecutor

    class Executor(SlurmPipelineExecutor):
        def launch_merge_stats(self):  # write_card sums the per-task stats itself
            pass

    executor = None
    for st in stages:
        executor = Executor(
            st.pipeline, tasks=st.tasks, time=s.time, partition=s.partition, depends=executor,
            cpus_per_task=s.cpus_per_task, job_name=f"llama_jax_curate_{st.name}",
            logging_dir=os.path.join(logs, st.name), qos="", requeue=False,
            sbatch_args={"mem-per-cpu": s.mem_per_cpu},
            env_command=f"export PATH={os.path.dirname(sys.executable)}:$PATH",
        )  # fmt: skip
    executor.run()
    last = stages[-1]
    done = os.path.join(logs, last.name, "completions")
    deadline = time.time() + s.timeout_s
    while (
        sum(os.path.exists(os.path.join(done, f"{r:05d}")) for r in range(last.tasks)) < last.tasks
    ):
        if time.time() > deadline:
            raise TimeoutError(f"the SLURM curation did not finish in {s.timeout_s:.0f} s: {logs}")
        time.sleep(1)
