"""The Colab notebooks run top to bottom on a CPU (nbclient), with their small parameters."""

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_notebook(name: str, parameter_lines: str) -> str:
    """Runs colab/NAME with parameter_lines appended to its "parameters" cell; -> all it printed.

    Any failing cell raises CellExecutionError, with the cell's traceback."""
    notebook = nbformat.read(os.path.join(REPO, "colab", name), as_version=4)
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    parameters.source += f"\n{parameter_lines}\n"
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    return "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow
def test_quickstart_notebook_trains_decodes_and_evaluates(tmp_path):
    printed = _run_notebook("quickstart.ipynb", f"MODEL_DIR = {str(tmp_path / 'run')!r}\nTRAIN_STEPS = 20")
    assert printed.count("prediction:") == 3
    assert "wikitext2_span_corruption" in printed and "token_accuracy" in printed
    assert os.path.exists(tmp_path / "run" / "eval" / "step_20.json")


@pytest.mark.slow
def test_finetune_notebook_adds_a_task_fine_tunes_and_evaluates(tmp_path):
    printed = _run_notebook("finetune_new_task.ipynb",
                            f"WORK_DIR = {str(tmp_path / 'work')!r}\nPRETRAIN_STEPS = 5\nFINETUNE_STEPS = 10")
    assert "train: " in printed and "validation: " in printed
    assert f"fine-tuning from {tmp_path / 'work' / 'pretrain' / 'checkpoints' / '5'}" in printed
    # fine-tuning steps count on from the checkpoint's: 5 + 10
    with open(tmp_path / "work" / "finetune" / "eval" / "step_15.json") as f:
        results = json.load(f)["tasks"]["animal_or_fruit"]
    assert 0.0 <= results["accuracy"] <= 100.0 and results["loss"] > 0
