"""The sweep: its grid and seeds, the choice on validation accuracy by hand, and the command end to end on a
Fashion-MNIST subset (a kill and a rerun that resumes; the test labels permuted, the choice unchanged; the
confirmation on new seeds)."""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from oat_jax import sweep
from oat_jax.data import fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grid_and_seeds_parse_and_bad_ones_say_how():
    assert sweep.parse_grid(["learning_rate=3e-4,1e-3", "batch_size=16,32"]) == {
        "learning_rate": [3e-4, 1e-3], "batch_size": [16, 32]}
    assert sweep.points({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    assert sweep.parse_seeds("200-203") == [200, 201, 202, 203] and sweep.parse_seeds("1,5") == [1, 5]
    assert sweep.setting_name({"learning_rate": 0.001, "arms": "ce"}) == "arms=ce,learning_rate=0.001"
    for bad in (["learning_rate"], ["learning_rate=1,,2"], ["seed=1,2"], ["a=1", "a=2"], ["a=1,1"], []):
        with pytest.raises(sweep.SweepError):
            sweep.parse_grid(bad)
    for bad in ("x", "3-1", "1,1", "-2"):
        with pytest.raises(sweep.SweepError):
            sweep.parse_seeds(bad)


def _entry(lr, accuracy, diverged=False):
    return {"setting": {"learning_rate": lr}, "seed": 100, "workdir": f"lr{lr}", "validation_accuracy": accuracy,
            "selected_epoch": 5, "diverged": diverged}


def test_the_choice_by_hand():
    grid = {"learning_rate": [1e-3, 3e-3, 1e-2, 3e-2]}
    plain = sweep.choose([_entry(1e-3, 80.0), _entry(3e-3, 85.0), _entry(1e-2, 84.0), _entry(3e-2, 70.0)], grid)
    assert plain["chosen"] == {"learning_rate": 3e-3} and not plain["at_edge"] and plain["validation_accuracy"] == 85
    # Within 0.1 points of the best: the lower learning rate; a diverged point is never chosen.
    tie = sweep.choose([_entry(1e-3, 84.95), _entry(3e-3, 85.0), _entry(1e-2, 90.0, diverged=True)], grid)
    assert tie["chosen"] == {"learning_rate": 1e-3} and tie["at_edge"]
    apart = sweep.choose([_entry(1e-3, 84.8), _entry(3e-3, 85.0)], grid)
    assert apart["chosen"] == {"learning_rate": 3e-3}
    edge = sweep.choose([_entry(1e-3, 80.0), _entry(3e-2, 86.0)], grid)
    assert edge["chosen"] == {"learning_rate": 3e-2} and edge["at_edge"]
    nothing = sweep.choose([_entry(1e-3, None, diverged=True)], grid)
    assert nothing["chosen"] is None
    # Several seeds of a point: their mean decides.
    seeds = sweep.choose([_entry(1e-3, 80.0), _entry(1e-3, 90.0), _entry(3e-3, 84.0), _entry(3e-3, 84.0)], grid)
    assert seeds["chosen"] == {"learning_rate": 1e-3} and seeds["validation_accuracy"] == 85.0


def _permuted_copy(source, folder):
    """Fashion-MNIST's files with the test labels permuted: what the test set says, nothing else changes."""
    os.makedirs(folder)
    for name in fashion_mnist.FILES.values():
        found = [n for n in os.listdir(source) if n.startswith(name)][0]
        shutil.copy(os.path.join(source, found), os.path.join(folder, found))
    path = os.path.join(folder, [n for n in os.listdir(folder) if n.startswith(fashion_mnist.FILES["test_labels"])][0])
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = bytearray(f.read())
    labels = np.frombuffer(bytes(raw[8:]), np.uint8)
    raw[8:] = np.random.default_rng(0).permutation(labels).tobytes()
    with opener(path, "wb") as f:
        f.write(bytes(raw))


SMALL = ["--config.train_limit=600", "--config.test_limit=300", "--config.validation_size=100",
         "--config.num_epochs=2", "--config.pretrain_epochs=1", "--config.arms=ce,oat", "--config.batch_size=16"]


def _sweep(out, *extra, wait=True):
    command = [sys.executable, "-m", "oat_jax.sweep", "--config", "configs/default.py",
               "--grid", "learning_rate=0.003,0.03", "--seeds", "100", "--out", str(out), "--parallel", "1",
               *SMALL, *extra]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_the_sweep_chooses_on_validation_resumes_and_confirms(tmp_path):
    source = fashion_mnist.DEFAULT_DIR
    if not os.path.isdir(source):
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    done = _sweep(tmp_path / "plain", f"--config.data_dir={source}")
    assert done.returncode == 0, done.stderr
    plain = json.loads((tmp_path / "plain" / "selection.json").read_text())
    assert plain["complete"] and set(plain["arms"]) == {"ce", "oat"}

    # The same sweep on a copy whose test labels are permuted, killed part-way and run again.
    permuted = tmp_path / "permuted_data"
    _permuted_copy(source, permuted)
    process = _sweep(tmp_path / "permuted", f"--config.data_dir={permuted}", wait=False)
    metrics = tmp_path / "permuted" / "learning_rate=0.003" / "seed_100" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=300)
    assert process.returncode == 130, errors
    assert "rerun the same command to resume" in errors.strip().splitlines()[-1]
    assert not (tmp_path / "permuted" / "selection.json").exists()  # stopped before the grid was done
    resumed = _sweep(tmp_path / "permuted", f"--config.data_dir={permuted}")
    assert resumed.returncode == 0, resumed.stderr
    selection = json.loads((tmp_path / "permuted" / "selection.json").read_text())
    for arm in ("ce", "oat"):
        assert selection["arms"][arm]["chosen"] == plain["arms"][arm]["chosen"]
        assert ([p["validation_accuracy"] for p in selection["arms"][arm]["points"]]
                == [p["validation_accuracy"] for p in plain["arms"][arm]["points"]])
    summaries = [json.loads((tmp_path / name / "learning_rate=0.003" / "seed_100" / "summary.json").read_text())
                 for name in ("plain", "permuted")]
    assert summaries[0]["arms"]["oat"]["final_test_accuracy"] != summaries[1]["arms"]["oat"]["final_test_accuracy"]

    # A finished sweep reruns nothing; confirm trains the choices on new seeds, sharing runs where they agree.
    again = _sweep(tmp_path / "plain", f"--config.data_dir={source}")
    assert again.returncode == 0 and "running" not in again.stdout.replace("running: none", "")
    confirmed = subprocess.run([sys.executable, "-m", "oat_jax.sweep", "confirm", str(tmp_path / "plain"),
                                "--seeds", "200", "--parallel", "2"], cwd=REPO, capture_output=True, text=True,
                               timeout=600)
    assert confirmed.returncode == 0, confirmed.stderr
    runs = sorted(p.relative_to(tmp_path / "plain" / "confirm").as_posix()
                  for p in (tmp_path / "plain" / "confirm").glob("*/seed_*"))
    groups = {}
    for arm, choice in plain["arms"].items():
        groups.setdefault(sweep.setting_name(choice["chosen"]), []).append(arm)
    assert runs == sorted(f"{name}/seed_200" for name in groups)
    for name, arms in groups.items():
        summary = json.loads((tmp_path / "plain" / "confirm" / name / "seed_200" / "summary.json").read_text())
        assert sorted(summary["arms"]) == sorted(arms)


def test_a_sweep_without_validation_or_a_folder_to_write_is_refused_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "oat_jax.sweep", "--config", "configs/default.py",
                             "--grid", "learning_rate=0.01,0.1", "--out", str(tmp_path / "s")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "validation_size" in result.stderr
    assert not (tmp_path / "s").exists()

    (tmp_path / "a_file").write_text("")  # an --out that cannot be a folder: one line, not a traceback
    result = subprocess.run([sys.executable, "-m", "oat_jax.sweep", "--config", "configs/default.py",
                             "--grid", "learning_rate=0.01", "--out", str(tmp_path / "a_file" / "s"),
                             "--config.validation_size=0.1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: cannot write the sweep to {tmp_path / 'a_file' / 's'}: ")


def test_the_selection_names_the_score_its_runs_stopped_on(tmp_path):
    # An imbalanced training set's runs select their epoch on balanced validation accuracy; the choice reads it.
    jobs = []
    for rate, accuracy in ((0.001, 70.0), (0.01, 69.0)):
        workdir = tmp_path / f"learning_rate={rate}" / "seed_100"
        workdir.mkdir(parents=True)
        seed = {"selected_val_accuracy": accuracy, "selected_epoch": 7, "selected_on": "val_balanced_accuracy"}
        (workdir / "summary.json").write_text(json.dumps({"arms": {"ce": {"seeds": {"100": seed}}}}))
        jobs.append(sweep.Job(str(tmp_path), str(workdir), [], 10, {"learning_rate": rate}, 100, ["ce"]))
    selection = sweep.write_selection(str(tmp_path), jobs, {"learning_rate": [0.001, 0.01]})
    assert selection["score"] == "balanced validation accuracy"
    assert selection["rule"].startswith("highest balanced validation accuracy at the validation-selected epoch")
    assert selection["arms"]["ce"]["chosen"] == {"learning_rate": 0.001}


def test_a_grid_field_the_config_lacks_is_named_in_one_line():
    config = os.path.join(REPO, "configs", "default.py")
    for field, named in (("lr", ": lr"), ("lerning_rate", 'Did you mean "learning_rate"')):
        with pytest.raises(sweep.SweepError) as refused:
            sweep._load_config(config, [f"--config.{field}=0.01", "--config.seed=1"])
        message = str(refused.value)
        assert message.startswith("unknown config field in --grid") and named in message and "\n" not in message


def test_one_point_beyond_an_edge_where_a_choice_sits():
    grid = {"learning_rate": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]}
    selection = {"arms": {"a": {"chosen": {"learning_rate": 3e-2}}, "b": {"chosen": {"learning_rate": 3e-3}},
                          "c": {"chosen": {"learning_rate": 3e-4}}, "d": {"chosen": None}}}
    # 3e-2 * (3e-2 / 1e-2) = 9e-2 above; 3e-4 / (1e-3 / 3e-4) = 9e-5 below; an inner choice adds nothing.
    assert sweep.edge_extensions(selection, grid) == {"learning_rate": [0.09, 9e-05]}
    del selection["arms"]["a"], selection["arms"]["c"]
    assert sweep.edge_extensions(selection, grid) == {}
