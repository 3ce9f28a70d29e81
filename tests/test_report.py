"""python -m oat_jax.report: the paper's layout, pooled seeds, flagged partial runs, clear errors."""
import json

import numpy as np
import pytest

from oat_jax import report, train
from oat_jax.paper_figures import paper_cell


def _fake_run(path, table, setting, ce, oat, *, num_epochs=100, final_epoch=100, train_limit=0):
    """A workdir as a finished run leaves it: summary.json (per-seed final accuracies) and config.json."""
    path.mkdir(parents=True)
    paper = paper_cell(table, setting).to_dict()

    def arm(values):
        return {"final_epoch": final_epoch,
                "seeds": {str(k): {"final_test_accuracy": v, "final_epoch": final_epoch} for k, v in enumerate(values)}}

    summary = {"arms": {"ce": arm(ce), "oat": arm(oat)}, "paper": paper,
               "dataset": {"name": "ucf101", "source": "a folder", "train_samples": 9537, "test_samples": 3783}}
    config = {"dataset": "ucf101", "model": "resnet18", "num_epochs": num_epochs, "train_limit": train_limit,
              "test_limit": 0, "pretrained_weights": "torchvision:resnet18", "normalisation": "imagenet"}
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_cells_pool_seeds_across_workdirs_and_sit_in_the_papers_tables(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", "Table 5", "UCF-101, ResNet-18", [70.0, 71.0], [73.0, 75.5])
    b = _fake_run(tmp_path / "b", "Table 5", "UCF-101, ResNet-18", [72.5], [74.0])
    c = _fake_run(tmp_path / "c", "Table 1", "learning rate 0.01", [69.5], [60.25])
    assert report.main([str(c), str(a), str(b)]) == 0
    text = capsys.readouterr().out
    # Table 1 comes before Table 5, as in the paper, whatever the order of the workdirs.
    assert text.index("## Table 1") < text.index("## Table 5")
    ce, oat = [70.0, 71.0, 72.5], [73.0, 75.5, 74.0]
    row = next(line for line in text.splitlines() if line.startswith("| UCF-101, ResNet-18"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "72.403" and cells[3] == "74.253"  # the paper's Table 5 figures
    assert cells[2] == f"{np.mean(ce):.3f} ± {np.std(ce, ddof=1):.3f}"
    assert cells[4] == f"{np.mean(oat):.3f} ± {np.std(oat, ddof=1):.3f}"
    assert cells[5] == "3" and cells[6] == ""
    assert "| learning rate 0.01 | 70.288 | 69.500 | 59.397 | 60.250 | 1 |" in text


def test_partial_runs_are_flagged_not_passed_off_as_results(tmp_path, capsys):
    run = _fake_run(tmp_path / "short", "Table 6", "ERA, ViT-L/16", [50.0], [51.0], final_epoch=12,
                    train_limit=100)
    out = tmp_path / "report.md"
    assert report.main([str(run), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_text() == text
    assert "short: subset" in text and "short: ce at epoch 12 of 100" in text


def test_a_real_run_is_reported(tmp_path, synthetic_config, capsys):
    synthetic_config.num_epochs, synthetic_config.pretrain_epochs, synthetic_config.num_seeds = 2, 1, 2
    synthetic_config.paper = paper_cell("Table 4", "CIFAR-10, lightweight CNN")
    summary = train.train_and_evaluate(synthetic_config, str(tmp_path / "run"), report=lambda record: None)
    assert report.main([str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    ce = [s["final_test_accuracy"] for s in summary["arms"]["ce"]["seeds"].values()]
    assert f"{np.mean(ce):.3f} ± {np.std(ce, ddof=1):.3f}" in text
    assert "stand-in data, not a result" in text


def test_a_folder_without_a_summary_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "summary.json is missing" in err and "Traceback" not in err


def test_unknown_paper_cells_are_refused_with_the_known_ones():
    with pytest.raises(KeyError, match="Table 5: UCF-101, ResNet-18"):
        paper_cell("Table 5", "UCF-101, ResNet-19")
