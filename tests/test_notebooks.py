"""Every notebook in notebooks/ runs top to bottom (at its LLAMA_JAX_NOTEBOOK_FAST size) and is
stored without outputs."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ["quickstart", "ablations", "memory", "finetune"]


def test_every_notebook_is_tested_and_stored_without_outputs():
    assert sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb")) == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (name, cell.source[:60])
        assert "LLAMA_JAX_NOTEBOOK_FAST" in nb.cells[1].source  # the size knob comes first


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """The kernel's environment: fast sizes, one CPU device, a corpus cache shared by the
    notebooks (built once), the repository importable without an install."""
    env = {
        "LLAMA_JAX_NOTEBOOK_FAST": "1",
        "LLAMA_JAX_CACHE": str(tmp_path_factory.mktemp("notebook_cache")),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "",  # not conftest's 8 simulated devices: one is faster for toy sizes
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return env


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")))
            out.append(str(o.get("data", {}).get("text/markdown", "")))
    return "\n".join(out)


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, kernel_env, monkeypatch):
    for k, v in kernel_env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any failure
    text = _text(nb)
    assert "fast mode" in text
    if name == "quickstart":
        assert "final validation loss" in text and "reloaded" in text and "===== greedy" in text
        assert _images(nb) >= 1
    elif name == "ablations":
        for variant in (
            "baseline",
            "norm=layernorm",
            "norm_placement=post",
            "mlp=gelu",
            "position=learned",
            "position=none",
        ):
            assert f"| {variant} |" in text
        assert _images(nb) >= 1
    elif name == "finetune":
        assert "| Name a fruit. | apple pie |" in text and "all answers learned: True" in text
        assert "adapter_model.safetensors" in text
    else:
        assert "reference" in text and "save_linear" in text
        assert _images(nb) == 2
