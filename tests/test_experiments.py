"""Every cell of the paper's Tables 1-7 (and its single-test-sample figure) has one shipped config."""
import importlib.util
import pathlib

import pytest

from oat_jax import train
from oat_jax.config_schema import validate_config
from oat_jax.paper_figures import FIGURES
from conftest import write_cifar_archive, write_image, write_official

CONFIG_DIR = pathlib.Path(__file__).parent.parent / "configs"
SWEEPS = {"table1_learning_rate": ["0.01", "0.001", "0.0001"], "table2_batch_size": ["32", "64", "128"],
          "table3_pretrain_epochs": ["0", "5", "10", "20"]}


def load(stem, *args):
    spec = importlib.util.spec_from_file_location(stem, CONFIG_DIR / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def experiments():
    """(config file stem, argument or None) of every shipped experiment."""
    for path in sorted(CONFIG_DIR.glob("*.py")):
        for arg in SWEEPS.get(path.stem, [None]):
            yield path.stem, arg


def _config(stem, arg):
    return load(stem, *([arg] if arg is not None else []))


def test_every_paper_cell_has_exactly_one_config():
    cells = [(c.paper.table, c.paper.setting) for c in (_config(*e) for e in experiments()) if c.paper.table]
    assert sorted(cells) == sorted(FIGURES)


@pytest.mark.parametrize("stem,arg", list(experiments()), ids=lambda v: str(v))
def test_every_experiment_is_valid(stem, arg):
    validate_config(_config(stem, arg))


def test_sweeps_change_only_their_own_field():
    base = load("ucf101_resnet18").to_dict()
    for stem, arg, field, value in [("table1_learning_rate", "0.01", "learning_rate", 0.01),
                                    ("table2_batch_size", "128", "batch_size", 128),
                                    ("table3_pretrain_epochs", "0", "pretrain_epochs", 0),
                                    ("ucf101_resnet18_single_test_sample", None, "eval_batch_size", 1)]:
        config = _config(stem, arg).to_dict()
        changed = {k for k in base if base[k] != config[k]} - {"paper"}
        expected = {field, "eval_batch_size"} if field == "batch_size" else {field}
        assert changed == expected and config[field] == value, stem


def test_pretrained_cells_follow_the_papers_protocol():
    for dataset in ("ucf101", "era", "bar"):
        for model in ("resnet18", "wide_resnet50_2", "vit_l16"):
            config = load(f"{dataset}_{model}")
            assert (config.image_size, config.normalisation, config.pretrained_weights) == (
                224, "imagenet", f"torchvision:{model}")
            assert (config.learning_rate, config.batch_size, config.num_epochs, config.pretrain_epochs) == (
                0.001, 32, 100, 10)


@pytest.mark.parametrize("stem,arg", [("table1_learning_rate", "0.1"), ("table2_batch_size", "48"),
                                      ("table3_pretrain_epochs", "x")])
def test_a_sweep_value_the_paper_lacks_is_refused(stem, arg):
    with pytest.raises(ValueError, match="has"):
        load(stem, arg)


# ---------------------------------------------------------------- every experiment runs, on stand-ins

# The experiments' datasets, as tiny stand-ins in each real on-disk format; the two Fashion-MNIST configs run
# on the real data in test_cli.py.
STANDIN_COUNTS = {"cifar10": (10, 3), "ucf101": (4, 3), "era": (25, 25), "bar": (6, 6)}  # train, test


@pytest.fixture(scope="session")
def standin_data(tmp_path_factory):

    root = tmp_path_factory.mktemp("standins")
    (root / "cifar10").mkdir()
    write_cifar_archive(root / "cifar10" / "cifar-10-python.tar.gz")
    write_official(root / "ucf101")
    for name, classes in (("era", 25), ("bar", 6)):
        for split in ("train", "test"):
            for k in range(classes):
                write_image(root / name / split / f"class{k:02d}" / "image.jpg", size=(30 + k, 40), seed=k)
    return root


@pytest.mark.parametrize("stem,arg", [e for e in experiments() if _config(*e).dataset in STANDIN_COUNTS],
                         ids=lambda v: str(v))
def test_every_experiment_runs_a_few_steps_on_standins(stem, arg, standin_data, tmp_path, monkeypatch):
    """The config's own dataset loader, image size, normalisation, test batch size, learning rate and
    pre-training length, through the whole two-phase loop for two epochs; the large networks (minutes a
    step on a CPU) are replaced by a tiny one with BatchNorm and dropout, without pretrained weights."""
    from conftest import STANDIN_MODEL

    monkeypatch.setenv("OAT_CACHE_DIR", str(standin_data / "cache"))
    config = _config(stem, arg)
    if config.model != "lightweight":
        config.model, config.pretrained_weights, config.dropout_rate = STANDIN_MODEL, "", 0.5
    config.data_dir = str(standin_data / config.dataset)
    config.num_epochs, config.pretrain_epochs = 2, min(config.pretrain_epochs, 1)
    # A training batch larger than the training set is refused: the stand-ins hold only a few samples.
    config.batch_size = min(config.batch_size, STANDIN_COUNTS[config.dataset][0])
    config.progress = False
    validate_config(config)
    summary = train.train_and_evaluate(config, str(tmp_path / "run"), report=lambda record: None)
    assert (summary["dataset"]["train_samples"], summary["dataset"]["test_samples"]) == STANDIN_COUNTS[config.dataset]
    for arm in ("ce", "oat"):
        assert summary["arms"][arm]["final_epoch"] == 2
        assert 0 <= summary["arms"][arm]["final_test_accuracy"] <= 100
