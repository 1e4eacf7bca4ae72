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
    section = parser.parse_known_args(argv)[0].section
    names = list(SECTIONS) if section == "all" else [section]
    modules = [importlib.import_module(SECTIONS[name]) for name in names]
    for module in modules:
        module.add_args(parser)
    args = parser.parse_args(argv)
    for name, module in zip(names, modules):
        print_table(name, module.run(args), as_json=args.json)


if __name__ == "__main__":
    main()
