import importlib.util
import pathlib

import pytest

from oat_jax import config_schema, objectives
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
    ({"method": "both"}, "unknown config field 'method'"),  # the older shorthand for arms is gone
    ({"dataset": "mnist_typo"}, "unknown dataset 'mnist_typo'"),
    ({"model": "resnet"}, "unknown model 'resnet'"),
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
    validate_config(_with(arms="ce", pretrain_epochs=10, num_epochs=10))


@pytest.mark.parametrize("changes, arms", [({}, ["ce", "oat"]), ({"arms": "oat, ce"}, ["oat", "ce"])])
def test_arms_name_the_objectives_in_order(changes, arms):
    config = _with(**changes)
    validate_config(config)
    assert objectives.parse_arms(config.arms) == arms


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


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("field, value, message", [
    ("learning_rate", INF, "learning_rate must be a finite number, got inf; pass a finite value, e.g. the default "
                           "--config.learning_rate=0.001"),
    ("learning_rate", NAN, "learning_rate must be a finite number, got nan"),
    ("learning_rate", -INF, "learning_rate must be a finite number, got -inf"),
    ("square_k", INF, "square_k must be a finite number"),
    ("square_k", NAN, "square_k must be a finite number"),
    ("square_m", NAN, "square_m must be a finite number"),
    ("square_m", INF, "square_m must be a finite number"),
    ("square_m", 0.0, "square_m .* must be positive, got 0.0"),
    ("square_m", -1.0, "square_m .* must be positive, got -1.0"),
    ("label_smoothing", NAN, "label_smoothing must be a finite number"),
    ("momentum", NAN, "momentum must be a finite number"),
    ("momentum", -INF, "momentum must be a finite number"),
    ("dropout_rate", NAN, "dropout_rate must be a finite number"),
    ("stall_timeout_seconds", INF, r"stall_timeout_seconds must be a finite number, got inf; .*\(0 = never\)"),
    ("stall_timeout_seconds", NAN, "stall_timeout_seconds must be a finite number"),
    ("seed", 2 ** 32, r"seed \+ num_seeds must be at most 2\*\*32"),
    ("arms", "ce,,oat", "arms 'ce,,oat' has an empty name .*; separate the objectives by single commas, e.g. ce,oat"),
    ("arms", "ce,oat,", "arms 'ce,oat,' has an empty name"),
    ("arms", ",oat", "arms ',oat' has an empty name"),
])
def test_non_finite_and_out_of_range_values_are_named(field, value, message):
    """NaN passes no comparison and inf passes most, so a range check alone let them through (issue 24)."""
    with pytest.raises(ConfigError, match=message):
        validate_config(_with(**{field: value}))


@pytest.mark.parametrize("group, field, value, message", [
    ("paper", "ce", NAN, "paper.ce must be a finite number"),
    ("paper", "oat", INF, "paper.oat must be a finite number"),
    ("paper", "oat", 101.0, r"paper.oat must be a test accuracy in % \(0..100"),
    ("distributed", "timeout_seconds", INF, "distributed.timeout_seconds"),
    ("distributed", "timeout_seconds", 0, "distributed.timeout_seconds must be at least 1"),
])
def test_non_finite_and_out_of_range_values_in_groups_are_named(group, field, value, message):
    config = base_config().to_dict()  # a plain dict: ConfigDict refuses a float for an int field itself
    config[group][field] = value
    import ml_collections
    with pytest.raises(ConfigError, match=message):
        validate_config(ml_collections.ConfigDict(config))


def test_every_float_field_is_checked_for_finiteness():
    """A float field added later is covered too: NaN in any of them is refused, naming it."""
    floats = [name for name, default, _ in config_schema.field_help() if isinstance(default, float)]
    assert {"learning_rate", "square_k", "square_m", "label_smoothing", "momentum", "dropout_rate",
            "stall_timeout_seconds"} <= set(floats)
    for name in floats:
        with pytest.raises(ConfigError, match=f"{name} must be a finite number, got nan"):
            validate_config(_with(**{name: NAN}))
