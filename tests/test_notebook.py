"""The anchor-dynamics notebook runs headless from top to bottom, on a small Fashion-MNIST subset."""
import pathlib
import re
import warnings

import nbformat
from nbclient import NotebookClient

from conftest import SYNTHETIC
from conftest import needs_fashion_mnist

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
    # Section 6 reads the committed long-tailed run: OAT's anchor lies near softmax(prior), squeezed from the prior.
    found = re.search(r"within (\S+) of softmax\(prior\); prior spans (\S+) to (\S+), the anchor only (\S+) to (\S+)",
                      text)
    assert found, text[-2000:]
    gap, prior_low, prior_high, anchor_low, anchor_high = map(float, found.groups())
    assert gap < 0.01 and prior_high / prior_low > 50 and 1 < anchor_high / anchor_low < 2.72
    for name in ("accuracy", "anchor_heatmap", "anchor_entropy", "eval_batch_size"):
        assert (tmp_path / "runs" / "released" / "plots" / f"{name}.png").is_file()


def _code_cell(marker: str) -> str:
    """The source of the notebook's code cell that contains ``marker``."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    return next(cell.source for cell in notebook.cells if cell.cell_type == "code" and marker in cell.source)


def test_the_training_cell_names_a_diverged_arm(tmp_path, capsys):
    """The training cell's code, run here on the tests' synthetic dataset at a learning rate at which the paper
    variant's OAT arm diverges in its first epoch while cross-entropy trains on (as the notebook's own settings do
    on Fashion-MNIST): each run gets its line, the diverged arm named with where it diverged. A diverged arm's
    summary entry has no final accuracy, and the cell stopped there with a KeyError."""
    namespace = {}
    exec(_code_cell("QUICK = "), namespace)  # the notebook's imports and parameters, then settings of our own
    namespace.update(RUNS_DIR=str(tmp_path), EXISTING_WORKDIR="",
                     SETTINGS=dict(dataset=SYNTHETIC, batch_size=16, eval_batch_size=16,
                                   learning_rate=0.5, pretrain_epochs=0, num_epochs=1, arms="ce,oat"))
    exec(_code_cell("def experiment("), namespace)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(r"released: ce \d+\.\d\d %, oat \d+\.\d\d %", lines[0]), lines
    step = re.fullmatch(r"   paper: ce \d+\.\d\d %, oat diverged \(seed 0 at epoch 1, step (\d+)\) before its first "
                        r"epoch ended", lines[1])
    assert step, lines
    summary = namespace["summaries"]["paper"]
    assert summary["arms"]["oat"]["diverged"] == {"0": {"epoch": 1, "step": int(step.group(1))}}
    assert namespace["main_workdir"] == str(tmp_path / "released")
    # Section 3 draws the OAT arm of both runs: the diverged one is named there too, and section 2's "seed",
    # which section 4 reads, survives it.
    namespace["seed"] = 0
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "FigureCanvasAgg is non-interactive")  # plt.show() outside Jupyter
            exec(_code_cell("section 3 compares the notebook's own two runs"), namespace)
    finally:
        namespace["plt"].close("all")
    assert capsys.readouterr().out.splitlines() == [f"paper: OAT diverged (seed 0) at epoch 1, step {step.group(1)}",
                                                    "paper: no finished OAT epoch to draw"]
    assert namespace["seed"] == 0
