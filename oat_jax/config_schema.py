"""The experiment configuration: every field with its default, and the checks run before any training.

Config files in ``configs/`` start from ``base_config()`` and change what their experiment needs, so a typo
in a field name is caught here instead of being silently ignored.
"""
from __future__ import annotations

import ast
import math
import re

import ml_collections
from ml_collections import config_dict

from oat_jax import data, models, oat, objectives, sharding
from oat_jax.names import CE, OAT

NORMALISATIONS = ("dataset", "imagenet")
INITS = ("torch", "flax")


class ConfigError(ValueError):
    """A configuration a run cannot start with; the message names the field and the problem."""


def base_config() -> ml_collections.ConfigDict:
    """Defaults: the paper's protocol (Sec. 3.4) on the lightweight CNN and Fashion-MNIST."""
    config = ml_collections.ConfigDict()
    config.dataset = "fashion_mnist"  # fashion_mnist, cifar10, ucf101, era, bar or image_folder (oat_jax.data)
    config.data_dir = ""             # local dataset folder; "" = $OAT_DATA_DIR, system copies, then tfds
    config.model = "lightweight"     # lightweight, wrn28_10, resnet18, wide_resnet50_2 or vit_l16
    config.init = "torch"            # "torch" = PyTorch's default for conv and dense layers, as the paper's
                                     # code had (oat_jax.models.torch_init); "flax" = the model's own initialisers
    config.dropout_rate = 0.0        # for models with dropout (wrn28_10, vit_l16)
    config.pretrained_weights = ""   # "" = random init; a .pth/.safetensors/.npz file or "torchvision:<model>"
    config.image_size = 0            # resize images to image_size x image_size when loading (0 = as stored)
    config.normalisation = "dataset" # "dataset" = the training set's channel statistics, or "imagenet"
    config.num_epochs = 100          # total, pre-training included
    config.pretrain_epochs = 10      # cross-entropy epochs before OAT starts
    config.batch_size = 32           # the training batch, whose anchor OAT regresses against
    config.eval_batch_size = 32      # the test anchor is computed per batch of this size
    config.shuffle_eval = True       # the paper's test loader is shuffled; a fixed seeded order here
    config.learning_rate = 0.001     # optax SGD with momentum
    config.momentum = 0.9            # SGD momentum
    config.reset_momentum = True     # fresh optimiser when OAT starts, as the released code does (IDT-ITI/OAT,
                                     # oat_efficientnet.py, builds a new optimiser for OAT)
    config.arms = "ce,oat"           # objectives trained from one shared pre-training (oat_jax.objectives)
    config.variant = "released"      # OAT anchor: "released" (double softmax) or "paper" (eq. 1)
    config.square_k = 1.0            # the "square" arm: weight k of the label's term (Hui & Belkin)
    config.square_m = 1.0            # the "square" arm: target M of the label's output
    config.label_smoothing = 0.1     # the "ce_smooth" arm: optax.smooth_labels' alpha
    config.logit_adjustment_tau = 1.0  # the "ce_logit_adjusted" arm: cross-entropy on z + tau * log(prior)
    config.anchor_gradient = config_dict.placeholder(bool)  # None = the variant's own behaviour
    config.seed = 0                  # initialisation and the per-epoch data order
    config.num_seeds = 1             # replicas trained side by side in one program, seeds seed..seed+K-1
    config.train_limit = 0           # use only the first N training samples (0 = all)
    config.test_limit = 0            # use only the first N test samples (0 = all)
    config.validation_size = 0.0     # training samples held out for validation, stratified by class: a count,
                                     # or a fraction below 1 (0 = none, the paper's protocol)
    config.validation_seed = 0       # which samples are held out; apart from seed, so every seed holds out the same
    config.train_imbalance = 1.0     # long-tailed training set: n_max / n_min of an exponential profile over the
                                     # labels in order (1 = unchanged); drawn after the validation split
    config.imbalance_seed = 0        # which images each class keeps under train_imbalance
    config.fused_epoch = config_dict.placeholder(bool)  # one compiled loop per epoch, data on the device;
                                     # None = on accelerators, off on XLA:CPU (slower there: oat_jax.experiment)
    config.anchor_scope = "global"   # on several devices: "global" = the anchor of the whole batch, as on one
                                     # device; "device" = each device's slice has its own (oat_jax.sharding)
    config.progress = True           # progress bar on a terminal
    config.compilation_cache = ""    # XLA's compiled programs kept on disk for the next run: "" = the user's cache
                                     # (${XDG_CACHE_HOME:-~/.cache}/oat_jax/xla), a folder, or "off"
    config.steps_in_flight = 2       # steps dispatched ahead of the devices (0 = unbounded; see oat_jax.dispatch)
    config.stall_timeout_seconds = 30.0  # with several devices: end a run whose devices stop answering (0 = never)
    # The paper's figures for this experiment (table "" = the paper has none), printed beside ours and
    # used by ``python -m oat_jax.report`` to place the run in the paper's table.
    config.paper = ml_collections.ConfigDict({"table": "", "setting": "", CE: 0.0, OAT: 0.0})
    # A run over several processes (hosts), see oat_jax.distributed; each field falls back to an environment
    # variable (OAT_COORDINATOR_ADDRESS, OAT_NUM_PROCESSES, OAT_PROCESS_ID). Not part of the run's identity:
    # a run may resume on another number of processes.
    config.distributed = ml_collections.ConfigDict({
        "coordinator_address": "",   # "host:port" of process 0, "auto" = the cluster's own, "" = one process
        "num_processes": 0,          # 0 = from the environment
        "process_id": -1,            # -1 = from the environment
        "timeout_seconds": 300,      # how long to wait for every process to join
    })
    return config


def field_help() -> list[tuple[str, object, str]]:
    """(field, default, meaning) of every top-level field, the meaning read from ``base_config``'s own comments
    (so the help cannot drift from the schema); groups such as ``paper`` are listed as one field."""
    import inspect
    import re
    meanings, last = {}, None
    for line in inspect.getsource(base_config).splitlines():
        assignment = re.match(r"\s*config\.(\w+) = [^#]*(?:#\s*(.*))?$", line)
        if assignment:
            last = assignment.group(1)
            meanings[last] = assignment.group(2) or ""
        elif last and re.match(r"\s*#", line) and line.index("#") > 20:  # a comment continued on the next line
            meanings[last] += " " + line.strip().lstrip("#").strip()
        else:
            last = None
    defaults = base_config()
    group_meanings = {"paper": "the paper's table cell and figures, printed beside ours (oat_jax.paper_figures)",
                      "distributed": "a run over several processes (hosts): see oat_jax.distributed"}
    names = [name for name in meanings if name in defaults] + [n for n in defaults.keys() if n not in meanings]
    return [(name, defaults[name].to_dict() if isinstance(defaults[name], ml_collections.ConfigDict)
             else defaults[name], meanings.get(name) or group_meanings.get(name, "")) for name in names]


def _check_fields(config, reference, prefix=""):
    for key in config.keys():
        if key not in reference:
            known = ", ".join(sorted(reference.keys()))
            raise ConfigError(f"unknown config field '{prefix}{key}'; known fields: {known}")
    for key in reference.keys():
        if key not in config:
            raise ConfigError(f"config field '{prefix}{key}' is missing (start config files from base_config())")
        value, default = config[key], reference[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config field '{prefix}{key}' must be a group of fields")
            _check_fields(value, default, prefix=f"{prefix}{key}.")
            continue
        expected = reference.get_type(key)
        if value is None:
            if default is None:  # an optional field left unset
                continue
            raise ConfigError(f"config field '{prefix}{key}' must not be None")
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
            raise ConfigError(f"config field '{prefix}{key}' must be of type {expected.__name__}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # NaN and inf pass every comparison below
            raise ConfigError(_not_finite(prefix + key, value, default))


def _not_finite(name: str, value: float, default) -> str:
    """The error line of a float field set to NaN or inf, with the fix: its default, and its "0 = ..." meaning
    where the schema gives one (stall_timeout_seconds' "0 = never", say)."""
    meaning = dict((field, text) for field, _, text in field_help()).get(name, "")
    convention = re.search(r"\((0 = [^)]*)\)", meaning)
    return (f"{name} must be a finite number, got {value}; pass a finite value, e.g. the default "
            f"--config.{name}={default}" + (f" ({convention.group(1)})" if convention else ""))


def unknown_field(error: BaseException) -> str:
    """The field an override names that the config lacks, as one plain line: absl raises an AttributeError
    around the repr of a KeyError's message (perhaps twice over), which may add ml_collections' "Did you mean"."""
    text = str(error.args[0] if error.args else error)
    for _ in range(3):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            break
        if not isinstance(value, str):
            break
        text = value
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError on the first problem: unknown or missing fields, wrong types, impossible values."""
    _check_fields(config, base_config())

    def require(condition, message):
        if not condition:
            raise ConfigError(message)

    require(config.dataset in data.dataset_names(),
            f"unknown dataset '{config.dataset}'; known datasets: {', '.join(data.dataset_names())}")
    require(config.model in models.model_names(),
            f"unknown model '{config.model}'; known models: {', '.join(models.model_names())}")
    try:
        arms = objectives.parse_arms(config.arms)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    require(config.variant in oat.VARIANTS,
            f"variant must be one of {', '.join(oat.VARIANTS)}, got '{config.variant}'")
    require(config.init in INITS, f"init must be one of {', '.join(INITS)}, got '{config.init}'")
    require(config.normalisation in NORMALISATIONS,
            f"normalisation must be one of {', '.join(NORMALISATIONS)}, got '{config.normalisation}'")
    require(config.square_k > 0, f"square_k must be positive, got {config.square_k}")
    require(config.square_m > 0, f"square_m (the label's target output) must be positive, got {config.square_m}")
    require(0 <= config.label_smoothing < 1, f"label_smoothing must lie in [0, 1), got {config.label_smoothing}")
    require(0 <= config.dropout_rate < 1, f"dropout_rate must lie in [0, 1), got {config.dropout_rate}")
    require(config.image_size >= 0, f"image_size must be non-negative (0 = as stored), got {config.image_size}")
    require(config.num_epochs >= 1, f"num_epochs must be at least 1, got {config.num_epochs}")
    require(0 <= config.pretrain_epochs <= config.num_epochs,
            f"pretrain_epochs must lie in 0..num_epochs ({config.num_epochs}), got {config.pretrain_epochs}; set "
            f"--config.pretrain_epochs too (e.g. --config.pretrain_epochs={config.num_epochs // 2})")
    require(arms == [objectives.PRETRAINING] or config.pretrain_epochs < config.num_epochs,
            f"pretrain_epochs ({config.pretrain_epochs}) leaves no epoch for the arms after the pre-training "
            f"(num_epochs {config.num_epochs})")
    require(config.batch_size >= 1, f"batch_size must be at least 1, got {config.batch_size}")
    require(config.eval_batch_size >= 1, f"eval_batch_size must be at least 1, got {config.eval_batch_size}")
    require(config.learning_rate > 0, f"learning_rate must be positive, got {config.learning_rate}")
    require(0 <= config.momentum < 1, f"momentum must lie in [0, 1), got {config.momentum}")
    require(config.seed >= 0, f"seed must be non-negative, got {config.seed}")
    require(config.num_seeds >= 1, f"num_seeds must be at least 1, got {config.num_seeds}")
    # JAX's keys take 32 bits of a seed: seed 2**32 would train seed 0 again.
    require(config.seed + config.num_seeds <= 2 ** 32, f"seed + num_seeds must be at most 2**32 (JAX's keys take "
                                                      f"32 bits of a seed), got {config.seed} + {config.num_seeds}; "
                                                      "pass a smaller seed")
    for arm in (CE, OAT):
        require(0 <= config.paper[arm] <= 100, f"paper.{arm} must be a test accuracy in % (0..100, 0 = the paper "
                                               f"has none), got {config.paper[arm]}")
    require(config.anchor_scope in sharding.ANCHOR_SCOPES,
            f"anchor_scope must be one of {', '.join(sharding.ANCHOR_SCOPES)}, got '{config.anchor_scope}'")
    group = config.distributed
    require(group.num_processes >= 0, f"distributed.num_processes must be non-negative, got {group.num_processes}")
    require(group.process_id >= -1, f"distributed.process_id must be -1 (from the environment) or a process "
                                    f"number, got {group.process_id}")
    require(group.num_processes == 0 or group.process_id < group.num_processes,
            f"distributed.process_id {group.process_id} is not below num_processes {group.num_processes}")
    require(group.timeout_seconds >= 1, f"distributed.timeout_seconds must be at least 1, got {group.timeout_seconds}")
    require(config.steps_in_flight >= 0, f"steps_in_flight must be non-negative (0 = unbounded), got "
                                         f"{config.steps_in_flight}")
    require(config.stall_timeout_seconds >= 0, f"stall_timeout_seconds must be non-negative (0 = never), got "
                                               f"{config.stall_timeout_seconds}")
    require(config.train_limit >= 0, f"train_limit must be non-negative (0 = all), got {config.train_limit}")
    require(config.test_limit >= 0, f"test_limit must be non-negative (0 = all), got {config.test_limit}")
    size = config.validation_size
    require(math.isfinite(size) and size >= 0 and (size < 1 or size == int(size)),
            f"validation_size must be 0 (none), a fraction below 1 or a whole count, got {size}")
    require(config.validation_seed >= 0, f"validation_seed must be non-negative, got {config.validation_seed}")
    require(math.isfinite(config.train_imbalance) and config.train_imbalance >= 1,
            f"train_imbalance must be a ratio n_max / n_min of at least 1 (1 = balanced), got {config.train_imbalance}")
    require(config.imbalance_seed >= 0, f"imbalance_seed must be non-negative, got {config.imbalance_seed}")
    require(math.isfinite(config.logit_adjustment_tau) and config.logit_adjustment_tau >= 0,
            f"logit_adjustment_tau must be a finite non-negative number, got {config.logit_adjustment_tau}")


def finetune_config(dataset: str, model: str) -> ml_collections.ConfigDict:
    """The paper's Tables 5-7 protocol: an ImageNet-pretrained torchvision model with a new linear head,
    fine-tuned on images resized to 224x224 and standardised with ImageNet's statistics."""
    config = base_config()
    config.dataset = dataset
    config.model = model
    config.pretrained_weights = f"torchvision:{model}"
    config.image_size = 224
    config.normalisation = "imagenet"
    return config
