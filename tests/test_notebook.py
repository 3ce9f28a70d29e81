"""The anchor-dynamics notebook runs headless from top to bottom, on a small Fashion-MNIST subset."""
import pathlib

import nbformat
from nbclient import NotebookClient

from test_cli import needs_fashion_mnist

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "anchor_dynamics.ipynb"


def test_the_repository_keeps_the_notebook_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@needs_fashion_mnist
def test_the_notebook_runs_and_shows_its_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("OAT_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("OAT_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) >= 6 and all(len(o.data["image/png"]) > 5000 for o in images)
    text = "".join(o.text for o in outputs if o.output_type == "stream")
    assert "released: ce" in text and "fixed training anchor" in text
    assert "seed(s), arms [" in text  # section 5 found the study's records, or fell back to the notebook's run
    for name in ("accuracy", "anchor_heatmap", "anchor_entropy", "eval_batch_size"):
        assert (tmp_path / "runs" / "released" / "plots" / f"{name}.png").is_file()
