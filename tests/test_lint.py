"""Code health the review checks by hand, checked here: ruff lint and format, McCabe
complexity <= 12, no long functions without a reason, the library's layers (direction, no
cycle, imports at the top), no file over 500 lines, the README's layout."""

import ast
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TREES = ["llama_jax", "launch", "configs", "tests"]
MAX_FUNCTION_LINES = 60
# A function longer than that carries this comment in its first lines, saying why.
LONG_REASON = "# long:"


def _ruff(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=cwd, capture_output=True, text=True
    )


def test_ruff_clean():
    r = _ruff("check", *TREES)
    assert r.returncode == 0, r.stdout[-4000:]


def test_ruff_format_clean():
    r = _ruff("format", "--check", *TREES)
    assert r.returncode == 0, r.stdout[-4000:]


def test_complexity_rule_is_live(tmp_path):
    """Negative control: the project's ruff config rejects a function of complexity 13."""
    branches = "\n".join(f"    if x == {i}:\n        return {i}" for i in range(12))
    (tmp_path / "too_complex.py").write_text(f"def f(x):\n{branches}\n    return -1\n")
    r = _ruff("check", "--config", str(ROOT / "pyproject.toml"), str(tmp_path / "too_complex.py"))
    assert r.returncode != 0 and "C901" in r.stdout and "(13 > 12)" in r.stdout, r.stdout


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_long_function_without_a_reason():
    long = []
    for path in sorted((ROOT / "llama_jax").rglob("*.py")) + sorted((ROOT / "launch").glob("*.py")):
        lines = path.read_text().splitlines()
        for f in _functions(ast.parse("\n".join(lines))):
            n = f.end_lineno - f.lineno + 1
            head = "\n".join(lines[f.lineno - 1 : f.lineno + 5])
            if n > MAX_FUNCTION_LINES and LONG_REASON not in head:
                long.append(f"{path.relative_to(ROOT)}:{f.lineno} {f.name} ({n} lines)")
    assert not long, long


# The library's layers, bottom to top: a package imports only from its own layer and the layers
# below it. Each entry is the set of top-level names (package or module) in llama_jax/ forming a
# layer; the README's layout lists them in this order.
LAYERS = [
    {"config", "config_fields", "cli"},  # the schema and the command line: no jax model code
    {"data"},  # sources, tokenizer, prepare, loader; data/curate's recipes
    {"model"},  # the decoder, attention kernels, ops, loss, remat, counts
    {"parallel"},  # meshes and the axis rule table, distributed start-up, XLA flags
    {"adapters"},  # LoRA, wrapping any model from outside
    {"weights"},  # params files, Hugging Face / Meta / PEFT conversion, init_from
    {"inference"},  # sampling, offline evaluation
    {"train"},  # state, step, optimizer, the compiled step's memory
    {"checkpoint"},  # orbax manager, resume checks, export
    {"trainer"},  # the loop and its services
    {"experiments"},  # ablation sweeps
    {"bench"},  # benchmark sections
]


def _module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, modules) -> list[tuple[ast.stmt, set[str]]]:
    """(statement, the library modules it imports) for every import statement in the tree."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from llama_jax import x" imports the module llama_jax.x when it is one
            targets = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                for a in node.names
            ]
        else:
            continue
        found.append((node, {t for t in targets if t in modules}))
    return found


def _library(root: pathlib.Path, package: str = "llama_jax") -> dict[str, ast.Module]:
    return {_module_name(p, root): ast.parse(p.read_text()) for p in (root / package).rglob("*.py")}


def import_graph(root: pathlib.Path = ROOT, package: str = "llama_jax") -> dict[str, set[str]]:
    """library module -> the library modules it imports anywhere (functions included)."""
    trees = _library(root, package)
    return {
        name: {t for _, ts in _imports(tree, trees) for t in ts} - {name}
        for name, tree in trees.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m) :] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def layer_violations(root: pathlib.Path = ROOT, package: str = "llama_jax", layers=LAYERS):
    """Every import against the layer table, every import of a library module that is not at a
    module's top, and an import cycle if there is one; [] for a clean tree."""
    rank = {name: i for i, layer in enumerate(layers) for name in layer}
    trees = _library(root, package)
    bad = []
    for name, tree in sorted(trees.items()):
        top = set(map(id, tree.body))
        top_name = name.split(".")[1] if "." in name else None
        for node, targets in _imports(tree, trees):
            where = f"{name}:{node.lineno}"
            if targets and id(node) not in top:
                bad.append(f"{where} imports {sorted(targets)} inside a block, not at the top")
            for t in targets:
                dep = t.split(".")[1] if "." in t else None
                if top_name is None or dep is None or top_name == dep:
                    continue
                if top_name not in rank or dep not in rank:
                    unknown = top_name if top_name not in rank else dep
                    bad.append(f"{where}: {unknown!r} is in no layer of the table")
                elif rank[dep] > rank[top_name]:
                    bad.append(f"{where} imports {t}: {top_name!r} may not import the layer above")
    graph = {
        n: {t for _, ts in _imports(tree, trees) for t in ts} - {n} for n, tree in trees.items()
    }
    if cycle := find_cycle(graph):
        bad.append("import cycle: " + " -> ".join(cycle))
    return bad


def test_layers_direction_no_cycle_imports_at_the_top():
    """The library imports only downward in LAYERS, has no cycle, and imports its own modules
    at the top of each module (optional third-party packages may stay lazy)."""
    graph = import_graph()
    # both import forms are seen: "from llama_jax.config import ..." and "from llama_jax.parallel
    # import sharding as shd"
    assert {"llama_jax.config", "llama_jax.parallel.sharding"} <= graph["llama_jax.train.step"]
    packages = {p.name for p in (ROOT / "llama_jax").iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in (ROOT / "llama_jax").glob("*.py")} - {"__init__"}
    assert set().union(*LAYERS) == packages | modules, "LAYERS lists each top-level name once"
    assert layer_violations() == []


def test_no_import_cycle_in_the_library():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # control
    assert find_cycle(import_graph()) is None, find_cycle(import_graph())


MAX_FILE_LINES = 500


def test_no_library_file_over_500_lines():
    """One concern per module: a library file past 500 lines holds two (split it)."""
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for p in (ROOT / "llama_jax").rglob("*.py")
    }
    assert max(sizes.values()) > 100  # control: the sizes are read
    assert {f: n for f, n in sizes.items() if n > MAX_FILE_LINES} == {}


def _plant(tmp_path, files: dict[str, str]) -> pathlib.Path:
    """A small library "lib" with a base, a low and a high layer, plus the planted files."""
    base = {"lib/__init__.py": "", "lib/base.py": "X = 1\n", "lib/low/__init__.py": "",
            "lib/low/a.py": "from lib import base\n", "lib/high/__init__.py": "",
            "lib/high/b.py": "from lib.low import a\n"}  # fmt: skip
    for rel, text in {**base, **files}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


PLANT_LAYERS = [{"base"}, {"low"}, {"high"}]


def test_layer_check_catches_a_planted_upward_import(tmp_path):
    root = _plant(tmp_path, {"lib/low/up.py": "from lib.high import b\n"})
    assert layer_violations(root, "lib", PLANT_LAYERS) == [
        "lib.low.up:1 imports lib.high.b: 'low' may not import the layer above"
    ]
    clean = _plant(tmp_path / "clean", {})
    assert layer_violations(clean, "lib", PLANT_LAYERS) == []  # control: the plain tree passes


def test_layer_check_catches_a_planted_cycle(tmp_path):
    root = _plant(tmp_path, {"lib/low/c.py": "from lib.low import d\n",
                             "lib/low/d.py": "from lib.low import c\n"})  # fmt: skip
    assert layer_violations(root, "lib", PLANT_LAYERS) == [
        "import cycle: lib.low.c -> lib.low.d -> lib.low.c"
    ]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_layer_check_catches_a_planted_function_level_import(tmp_path):
    lazy = (
        "import json\n\n\ndef f():\n    import torch\n    from lib import base\n    return base\n"
    )
    root = _plant(tmp_path, {"lib/high/lazy.py": lazy})  # torch may stay lazy: optional, not ours
    assert layer_violations(root, "lib", PLANT_LAYERS) == [
        "lib.high.lazy:6 imports ['lib.base'] inside a block, not at the top"
    ]


def test_only_config_imports_ml_collections():
    users = [
        _module_name(p)
        for p in (ROOT / "llama_jax").rglob("*.py")
        if re.search(r"^\s*(from|import) ml_collections", p.read_text(), re.M)
    ]
    assert users == ["llama_jax.config"], users


def test_readme_layout_lists_every_module():
    """The README's layout block names every top-level library module and package, one line
    each in the order of LAYERS, and no others."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    named = re.findall(r"^  (\w+)(?:\.py|/)\s", block, re.M)  # two spaces: under llama_jax/
    lib = ROOT / "llama_jax"
    have = {p.stem for p in lib.glob("*.py") if p.name != "__init__.py"}
    have |= {p.name for p in lib.iterdir() if (p / "__init__.py").exists()}
    assert len(named) == len(set(named)), "a name is listed twice"
    assert set(named) == have, (sorted(have - set(named)), sorted(set(named) - have))
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    assert [rank[n] for n in named] == sorted(rank[n] for n in named), "not in layer order"
