"""The `slow` marker and the fast tier (`python -m pytest -q tests -m "not slow"`): the marker is
registered (and --strict-markers refuses a misspelt one), and the fast tier still checks every
test file not marked slow as a whole and every package of the library."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
WHOLE_FILE_SLOW = re.compile(r"^pytestmark = pytest\.mark\.slow\b", re.M)


def test_slow_marker_is_registered(pytestconfig):
    names = [line.split(":")[0].strip() for line in pytestconfig.getini("markers")]
    assert "slow" in names, names
    assert "--strict-markers" in pytestconfig.getini("addopts")


def test_fast_tier_covers_every_test_file_and_package():
    """One collection of the fast tier (a subprocess, ~8 s). Every test file has fast tests
    unless its module is marked slow (a file whose tests are all marked one by one should say
    so at its top), both tiers are non-empty, and every llama_jax package is imported by some
    file that has fast tests (a proxy: the import, not the call, is what this can see)."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-m", "not slow", "tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    summary = re.search(r"(\d+)/(\d+) tests collected \((\d+) deselected\)", r.stdout)
    assert summary, r.stdout[-2000:]
    fast, total, slow = map(int, summary.groups())
    assert fast == len(ids) and fast + slow == total and fast > 0 and slow > 0, summary.group(0)

    sources = {f"tests/{p.name}": p.read_text() for p in sorted((ROOT / "tests").glob("test_*.py"))}
    whole_slow = {f for f, text in sources.items() if WHOLE_FILE_SLOW.search(text)}
    with_fast = {i.split("::")[0] for i in ids}
    assert with_fast == set(sources) - whole_slow, (
        f"no fast tests (mark the module slow instead): {sorted(set(sources) - whole_slow - with_fast)}; "
        f"fast tests in a module marked slow: {sorted(with_fast & whole_slow)}"
    )  # fmt: skip

    packages = [
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in sorted((ROOT / "llama_jax").rglob("*/__init__.py"))
    ]
    named = lambda pkg, text: re.search(rf"\b{re.escape(pkg)}\b", text)  # llama_jax.data(.x)
    uncovered = [p for p in packages if not any(named(p, sources[f]) for f in with_fast)]
    assert len(packages) > 5 and not uncovered, f"packages no fast test file imports: {uncovered}"
