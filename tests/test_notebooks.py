"""Both notebooks execute top to bottom, so they cannot rot."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient
from omegaconf import OmegaConf

from conftest import ROOT
from mnistlab.train import train


def execute(name: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "commit it cleared"
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()  # fmt: skip
    return notebook


def pictures(notebook) -> int:
    return sum(
        "image/png" in out.get("data", {}) for cell in notebook.cells for out in cell.get("outputs", [])
    )


@pytest.mark.slow  # a kernel and the real 60k images: about 18 s
def test_the_data_notebook_runs_on_the_real_mnist(monkeypatch):
    monkeypatch.setenv("MNISTLAB_DATA_DIR", str(ROOT / "data"))  # fetched once, as in test_data
    notebook = execute("01_data.ipynb")
    assert pictures(notebook) >= 5  # label shares, stored digits, three augmentations


@pytest.mark.integration  # a Jupyter kernel
def test_the_runs_notebook_reads_a_run_and_builds_the_table(compose_train, tmp_path, monkeypatch):
    run_dir = tmp_path  # compose_train's run directory
    cfg = compose_train("debug=limit")
    train(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    monkeypatch.setenv("MNISTLAB_LOGS", str(run_dir))
    notebook = execute("02_runs.ipynb")
    assert pictures(notebook) == 1
    table = notebook.cells[-1].outputs[0]["data"]["text/markdown"]
    assert "| `default` | 19,348 |" in table
