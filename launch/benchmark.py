"""python -m launch.benchmark {attention,step,data,compile,peers,all} [...] [--config FILE]
    [--config.group.field=value ...] [--json]

One table format for every section (or one JSON object per section with --json); each timed
figure is a median over repeated runs after a warm-up, with min and max, and each section
ends with its physical limit (a matmul in the same dtype, host memcpy, ...). Several sections
may be named at once; the model sections use --config (default configs/tiny.py) with
--config.group.field=value overrides; --summary ends with one table of the headline numbers
(what launch/gpu_check.sh prints last). --json-out writes every row.
"""

from llama_jax.parallel import xla_flags  # before jax is imported: XLA reads XLA_FLAGS once

xla_flags.setup()

import argparse
import importlib
import json
import os
import sys

from llama_jax import cli
from llama_jax.bench import SECTIONS
from llama_jax.bench.common import print_table

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py"
)

# Columns of the --summary table per section (those a row has).
SUMMARY_COLUMNS = {
    "attention": (
        "impl",
        "T",
        "dtype",
        "ms",
        "tflops",
        "of_matmul",
        "temp_MiB",
        "error",
    ),
    "step": (
        "policy",
        "batch",
        "seq",
        "step_s",
        "tokens/s",
        "model_TFLOP/s/dev",
        "MFU_6n",
        "MFU_palm",
        "MFU_causal",
        "of_matmul",
        "mem_GiB",
        "hwm_GiB",
        "error",
    ),
    "data": ("what", "detail", "tokens/s", "MB/s"),
    "compile": ("layers", "compile_s", "vs_first"),
    "peers": ("peer", "tokens/s", "ours_vs"),
    "parallel": ("mesh", "ms", "tokens/s", "collective-permute MB", "ring K/V MB (analytic)"),
}


def summary_rows(results: dict[str, list[dict]]) -> list[dict]:
    """One row per benchmark row, a 'section' column first and the headline columns after."""
    out = []
    for name, rows in results.items():
        if name not in SUMMARY_COLUMNS:  # further tables (the step profile) stay out of it
            continue
        for r in rows:
            item = {"section": name, "what": ""}
            keys = [k for k in SUMMARY_COLUMNS.get(name, ()) if k in r]
            item["what"] = " ".join(str(r[k]) for k in keys[:1])
            for k in keys[1:]:
                item[k] = r[k]
            out.append(item)
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # The sections named decide which flags exist: find them first (all of them for --help).
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("section", nargs="*")
    sections = pre.parse_known_args(cli.split_config_args(argv)[2])[0].section
    names = [n for n in SECTIONS if "all" in sections or n in sections or not sections]
    parser = argparse.ArgumentParser(prog="python -m launch.benchmark", description=__doc__)
    parser.add_argument("section", nargs="+", choices=[*SECTIONS, "all"])
    parser.add_argument("--json", action="store_true", help="one JSON object per section")
    parser.add_argument("--summary", action="store_true", help="end with one summary table")
    parser.add_argument("--json-out", default="", help="write all rows to this JSON file")
    modules = [importlib.import_module(SECTIONS[name]) for name in names]
    for module in modules:
        module.add_args(parser)
    c = cli.parse(parser, argv, config="optional", default_config=DEFAULT_CONFIG)
    names = list(SECTIONS) if "all" in c.args.section else list(dict.fromkeys(c.args.section))
    modules = [importlib.import_module(SECTIONS[name]) for name in names]
    args = c.args
    args.cfg = c.cfg
    args.tables = {}  # further tables a section adds (the step's --profile breakdown)
    results = {}
    for name, module in zip(names, modules):
        results[name] = module.measure(args)
        print_table(name, results[name], as_json=args.json)
        for title, rows in args.tables.items():
            print_table(title, rows, as_json=args.json)
            results[title] = rows
        args.tables.clear()
    if args.summary:
        print_table("summary", summary_rows(results), as_json=args.json)
    if args.json_out:
        from llama_jax.bench.common import device_description

        with open(args.json_out, "w") as f:
            json.dump({"device": device_description(), "results": results}, f, default=str)
    return results


def print_summary_file(path: str) -> None:
    """The --summary table again, from a --json-out file (no jax backend is started)."""
    with open(path) as f:
        saved = json.load(f)
    print_table("summary", summary_rows(saved["results"]), device=saved["device"])


if __name__ == "__main__":
    main()
