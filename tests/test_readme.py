"""The README's quickstart commands are the ones CI and users run."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "pip install -e '.[test]' && python -m pytest -q -n 2 tests"
    assert command in readme
    assert any(line.strip() == command for line in ci.splitlines())


def test_readme_main_command_trains_tiny():
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e . && python -m launch.train --config configs/tiny.py" in readme
