"""Code health the review checks by hand, checked here: ruff lint and format, McCabe
complexity <= 12, no long functions without a reason, no import cycles, the README's layout."""

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


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """llama_jax module -> the llama_jax modules it imports anywhere (functions included)."""
    modules = {_module_name(p): p for p in (ROOT / "llama_jax").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from llama_jax import x" imports the module llama_jax.x when it is one
                targets = [
                    f"{node.module}.{a.name}"
                    if f"{node.module}.{a.name}" in modules
                    else node.module
                    for a in node.names
                ]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


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


def test_no_import_cycle_in_the_library():
    graph = import_graph()
    # both import forms are seen: "from llama_jax.config import ..." and "from llama_jax import
    # sharding as shd"
    assert {"llama_jax.config", "llama_jax.parallel.sharding"} <= graph["llama_jax.train.step"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # control
    assert find_cycle(graph) is None, find_cycle(graph)


def test_only_config_imports_ml_collections():
    users = [
        _module_name(p)
        for p in (ROOT / "llama_jax").rglob("*.py")
        if re.search(r"^\s*(from|import) ml_collections", p.read_text(), re.M)
    ]
    assert users == ["llama_jax.config"], users


def test_readme_layout_lists_every_module():
    """The README's layout block names every library module and package, and no others."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    named = set(re.findall(r"^\s+(\w+(?:\.py|/))", block, re.M))
    lib = ROOT / "llama_jax"
    have = {p.name for p in lib.glob("*.py") if p.name != "__init__.py"}
    have |= {f"{p.name}/" for p in lib.iterdir() if (p / "__init__.py").exists()}
    assert named >= have, sorted(have - named)
    assert not {n for n in named if n.endswith(".py")} - have, "README names a module that is gone"
