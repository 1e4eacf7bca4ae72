"""python -m launch.benchmark {attention,step,data,compile,all} [--config ...] [--json]"""

import argparse
import importlib

from llama_jax.bench import SECTIONS
from llama_jax.bench.common import print_table


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m launch.benchmark", description=__doc__)
    parser.add_argument("section", choices=[*SECTIONS, "all"])
    parser.add_argument("--config", default="configs/tiny.py", help="config file for model sections")
    parser.add_argument("--json", action="store_true", help="one JSON object per section")
    names = list(SECTIONS)
    for name in names:
        importlib.import_module(SECTIONS[name]).add_args(parser)
    args = parser.parse_args(argv)
    for name in names if args.section == "all" else [args.section]:
        module = importlib.import_module(SECTIONS[name])
        print_table(name, module.run(args), as_json=args.json)


if __name__ == "__main__":
    main()
