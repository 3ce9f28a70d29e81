"""An experiment, built once from its config: the dataset and its normalisation, the model, the device mesh,
the replicas' initial states, and each arm's jitted steps bound to these (``Experiment.bind_steps``)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np

from oat_jax import config_schema, data, input_pipeline, models, objectives, sharding, steps
from oat_jax.data import longtail
from oat_jax import state as state_lib
from oat_jax.objectives import LossSettings

# ImageNet's per-channel mean and standard deviation, for models pretrained on it (torchvision's values).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalisation_statistics(config, dataset: data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    if config.normalisation == "imagenet":
        if dataset.train_images.shape[-1] != 3:
            raise data.DatasetError(f"normalisation 'imagenet' needs RGB images; {dataset.name} has "
                                    f"{dataset.train_images.shape[-1]} channel(s)")
        return IMAGENET_MEAN, IMAGENET_STD
    return input_pipeline.channel_statistics(dataset.train_images)


def check_inputs(config, dataset: data.Dataset) -> None:
    """What the config asks of this dataset and model, checked before anything is written or built."""
    samples = len(dataset.train_labels)
    if config.batch_size > samples:
        raise config_schema.ConfigError(
            f"batch_size {config.batch_size} is larger than the training set ({samples} samples); "
            f"use --config.batch_size={samples} or less")
    shape = dataset.train_images.shape[1:]
    problem = models.input_problem(config.model, dataset.num_classes, config.dropout_rate, shape)
    if problem:
        raise config_schema.ConfigError(
            f"model '{config.model}' cannot take {'x'.join(map(str, shape))} images: {problem}; "
            + ("choose another --config.image_size" if config.image_size else "set --config.image_size to a size "
               "it takes"))


def fused_epochs(config) -> bool:
    """Whether epochs run as one compiled loop: as ``fused_epoch`` says, by default not on XLA:CPU, where a
    compiled loop takes the convolutions' gradients down a slower path (about 2x, benchmarks/README.md)."""
    return config.fused_epoch if config.fused_epoch is not None else jax.default_backend() != "cpu"


class ArmSteps(NamedTuple):
    """An arm's jitted steps, bound to its objective, loss settings, normalisation and mesh, called with host
    batches: ``train(states, metrics, batch)``; ``train_on_device(states, metrics, orders, first_step)``, the
    rest of an epoch as one compiled loop (None unless the training set is on the devices); and
    ``evaluate(states, batch, train_anchors, decodes=, with_loss=)`` (``steps.eval_step_replicas``)."""
    objective: str | None
    train: Callable
    train_on_device: Callable | None
    evaluate: Callable


@dataclasses.dataclass
class Experiment:
    config: Any
    dataset: data.Dataset
    prior: np.ndarray  # the training set's class frequencies π (C,), the same for every arm
    mean: np.ndarray
    std: np.ndarray
    mesh: Any  # jax.sharding.Mesh over all devices, None on one device
    seeds: list[int]  # the replicas trained side by side
    arms: list[str]  # objective names, each trained from the shared pre-training
    template: Any  # the replicas' initial states (a restored checkpoint takes its structure)
    on_device: steps.OnDevice | None  # the training set on every device, for fused epochs
    loss: LossSettings

    @classmethod
    def build(cls, config, dataset: data.Dataset | None = None) -> Experiment:
        """Loads the dataset (unless given), checks the model can take it, creates the states; ConfigError,
        DatasetError or WeightsError in one line when it cannot."""
        mesh = sharding.data_mesh()
        sharding.check_batch_sizes(config, mesh)
        pretrained = state_lib.pretrained_path(config)
        if dataset is None:
            dataset = data.load_dataset(config.dataset, config.data_dir, config.train_limit, config.test_limit,
                                        image_size=config.image_size)
        dataset = data.hold_out_validation(dataset, config.validation_size, config.validation_seed)
        dataset = data.apply_long_tail(dataset, config.train_imbalance, config.imbalance_seed)
        check_inputs(config, dataset)
        model = state_lib.cached_model(config.model, dataset.num_classes, config.dropout_rate)
        mean, std = normalisation_statistics(config, dataset)
        template = state_lib.create_replicas(model, dataset.train_images.shape[1:], config, pretrained)
        # A fused epoch gathers its batches on the devices: every device holds the whole training set.
        on_device = (steps.OnDevice(*sharding.place_states((dataset.train_images, dataset.train_labels), mesh),
                                    len(dataset.train_labels), config.batch_size, sharding.batch_sharding(mesh))
                     if fused_epochs(config) else None)
        prior = longtail.class_prior(dataset.train_labels, dataset.num_classes)
        loss = LossSettings(config.variant, config.anchor_gradient, sharding.anchor_groups(config, mesh),
                            config.square_k, config.square_m, config.label_smoothing, tuple(float(p) for p in prior),
                            config.logit_adjustment_tau)
        return cls(config, dataset, prior, mean, std, mesh, state_lib.replica_seeds(config),
                   objectives.parse_arms(config.arms), template, on_device, loss)

    def bind_steps(self, objective: str | None = None) -> ArmSteps:
        """The steps of an arm of ``objective`` (None: evaluation alone, with the config's anchor variant)."""
        settings = steps.StepSettings(self.mean, self.std, steps.sampled_steps(self.steps_per_epoch()), objective,
                                      self.loss)
        place = functools.partial(sharding.place_batch, mesh=self.mesh)

        def train(states, metrics, batch):
            return steps.train_step_replicas(states, metrics, place(batch), settings)

        def train_on_device(states, metrics, orders, first_step):
            return steps.train_steps_on_device(states, metrics, (orders, first_step), settings, self.on_device,
                                               num_steps=self.steps_per_epoch() - first_step)

        def evaluate(states, batch, train_anchors, **options):
            return steps.eval_step_replicas(states, place(batch), train_anchors, settings, **options)

        return ArmSteps(objective, train, None if self.on_device is None else train_on_device, evaluate)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def steps_per_epoch(self) -> int:
        return input_pipeline.num_batches(len(self.dataset.train_labels), self.config.batch_size)

    def epoch_orders(self, epoch: int) -> np.ndarray:
        """Each replica's sample order of ``epoch``, padded to whole batches (K, S·B)."""
        size = len(self.dataset.train_labels)
        return np.stack([input_pipeline.padded_order(input_pipeline.epoch_order(size, seed, epoch),
                                                     self.config.batch_size) for seed in self.seeds]).astype(np.int32)

    def train_batches(self, orders: np.ndarray, first_step: int) -> Iterator[tuple]:
        """The host batches (images, labels, masks; (K, B, ...)) of ``orders`` from step ``first_step`` on."""
        batch, size = self.config.batch_size, len(self.dataset.train_labels)
        for start in range(first_step * batch, orders.shape[1], batch):
            index = orders[:, start:start + batch]
            masks = np.broadcast_to(start + np.arange(batch) < size, index.shape)
            yield self.dataset.train_images[index], self.dataset.train_labels[index].astype(np.int32), masks

    def test_batches(self, batch_size: int) -> Iterator[tuple]:
        """The test set in batches (K, B, ...), each replica in its own fixed order."""
        return self._held_out_batches(self.dataset.test_images, self.dataset.test_labels, batch_size,
                                      self.config.shuffle_eval, input_pipeline.TEST_STREAM)

    def validation_batches(self, batch_size: int) -> Iterator[tuple]:
        """The validation split in batches (K, B, ...), always shuffled (a class-sorted batch would hand OAT's
        batch anchor the label)."""
        return self._held_out_batches(self.dataset.validation_images, self.dataset.validation_labels, batch_size,
                                      True, input_pipeline.VALIDATION_STREAM)

    @property
    def has_validation(self) -> bool:
        return self.dataset.validation_labels is not None

    def _held_out_batches(self, images, labels, batch_size, shuffle, stream) -> Iterator[tuple]:
        orders = [input_pipeline.eval_order(len(labels), seed, shuffle, stream) for seed in self.seeds]
        per_replica = [input_pipeline.batches(images, labels, order, batch_size) for order in orders]
        for parts in zip(*per_replica):
            yield tuple(np.stack(arrays) for arrays in zip(*parts))

    def fresh_optimiser(self, states):
        """The states with momentum zeroed, as an arm starts with ``reset_momentum``."""
        return states.replace(opt_state=jax.vmap(states.tx.init)(states.params))
