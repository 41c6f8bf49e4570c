"""The Colab notebooks run top to bottom on a CPU (nbclient), with their small parameters."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_notebook_trains_decodes_and_evaluates(tmp_path):
    notebook = nbformat.read(os.path.join(REPO, "colab", "quickstart.ipynb"), as_version=4)
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    parameters.source += f"\nMODEL_DIR = {str(tmp_path / 'run')!r}\nTRAIN_STEPS = 20\n"
    # Any failing cell raises CellExecutionError, with the cell's traceback.
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert printed.count("prediction:") == 3
    assert "wikitext2_span_corruption" in printed and "token_accuracy" in printed
    assert os.path.exists(tmp_path / "run" / "eval" / "step_20.json")
