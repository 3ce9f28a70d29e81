import importlib.util
import pathlib

import pytest

from oat_jax import config_schema
from oat_jax.config_schema import ConfigError, base_config, validate_config

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.py"))


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_shipped_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"default", "fashion_mnist_lightweight", "cifar10_lightweight"}


def test_paper_protocol_is_the_default():
    config = _load(pathlib.Path(__file__).parent.parent / "configs" / "fashion_mnist_lightweight.py")
    assert (config.learning_rate, config.momentum, config.batch_size, config.num_epochs, config.pretrain_epochs) == (
        0.001, 0.9, 32, 100, 10)
    assert config.variant == "released" and config.anchor_gradient is None and config.reset_momentum


def _with(**changes):
    config = base_config()
    config.unlock()
    for key, value in changes.items():
        config[key] = value
    return config


@pytest.mark.parametrize("changes, message", [
    ({"pretrain_epochs": 11, "num_epochs": 10}, "pretrain_epochs"),
    ({"pretrain_epochs": 10, "num_epochs": 10}, "leaves no epoch for the arms"),
    ({"arms": "ce,oat,softmax_typo"}, "unknown objective 'softmax_typo' in arms; known objectives: ce, oat"),
    ({"arms": "oat,oat"}, "arms names an objective twice"),
    ({"arms": " , "}, "arms names no objective"),
    ({"method": "oat", "arms": "ce"}, "method 'oat' and arms 'ce' disagree; set only arms"),
    ({"dataset": "mnist_typo"}, "unknown dataset 'mnist_typo'"),
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"method": "all"}, "method"),
    ({"variant": "eq1"}, "variant"),
    ({"batch_size": 0}, "batch_size"),
    ({"learning_rate": -0.1}, "learning_rate"),
    ({"momentum": 1.0}, "momentum"),
    ({"train_limit": -5}, "train_limit"),
    ({"num_epochs": 0}, "num_epochs"),
])
def test_impossible_values_are_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_with(**changes))


def test_ce_alone_may_spend_every_epoch_pretraining():
    validate_config(_with(method="ce", pretrain_epochs=10, num_epochs=10))
    validate_config(_with(arms="ce", pretrain_epochs=10, num_epochs=10))


@pytest.mark.parametrize("changes, arms", [
    ({}, ["ce", "oat"]), ({"arms": "oat, ce"}, ["oat", "ce"]), ({"method": "both"}, ["ce", "oat"]),
    ({"method": "oat"}, ["oat"]), ({"method": "ce", "arms": "ce"}, ["ce"]),
])
def test_arms_are_named_by_arms_or_by_the_older_method(changes, arms):
    config = _with(**changes)
    validate_config(config)
    assert config_schema.arms_of(config) == arms


def test_unknown_field_is_refused():
    config = base_config()
    config.learning_rat = 0.1
    with pytest.raises(ConfigError, match="unknown config field 'learning_rat'"):
        validate_config(config)


def test_wrong_type_is_refused():
    config = base_config().to_dict()
    config["num_epochs"] = "ten"
    import ml_collections
    with pytest.raises(ConfigError, match="num_epochs.*int"):
        validate_config(ml_collections.ConfigDict(config))


def test_int_accepted_for_float_field_and_bool_for_anchor_gradient():
    validate_config(_with(learning_rate=1))
    config = base_config()
    config.anchor_gradient = False
    validate_config(config)
