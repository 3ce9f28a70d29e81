"""The training state and its creation: parameters, optimiser state, BatchNorm statistics and the dropout
key of each replica, initialised from a seed and, where the config names them, from pretrained weights."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from oat_jax import models, sharding


class TrainState(train_state.TrainState):
    """A Flax TrainState plus the BatchNorm statistics ({} without BatchNorm) and the raw key data each step's
    dropout key is folded from."""
    batch_stats: Any = None
    dropout_key: jax.Array = None
    has_batch_stats: bool = struct.field(pytree_node=False, default=False)

    def variables(self, params=None) -> dict:
        """The variables to apply the model with: ``params`` (default the state's) and any BatchNorm statistics."""
        variables = {"params": self.params if params is None else params}
        if self.has_batch_stats:
            variables["batch_stats"] = self.batch_stats
        return variables


@functools.lru_cache(maxsize=None)
def sgd(learning_rate: float, momentum: float) -> optax.GradientTransformation:
    """One optimiser object per setting: a static part of the steps' signature (an equal new one recompiles)."""
    return optax.sgd(learning_rate, momentum=momentum)


# One module object per (name, classes, dropout): its apply method is a static part of the steps' signature.
cached_model = functools.lru_cache(maxsize=None)(models.create_model)


def replica_seeds(config) -> list[int]:
    """The seeds of the ``num_seeds`` replicas trained side by side: seed, seed + 1, ..."""
    return [config.seed + k for k in range(config.num_seeds)]


def pretrained_path(config) -> str:
    """The weights file the config names ("" = none), resolved; weights.WeightsError if missing."""
    if not config.pretrained_weights:
        return ""
    from oat_jax.models import weights  # reads torch and safetensors files: only imported when used
    return weights.resolve_weights_path(config.pretrained_weights)


def create_train_state(model, image_shape, config, seed: int, pretrained: str = "") -> TrainState:
    """One replica's state, initialised from ``seed`` as ``config.init`` says; with ``pretrained``, everything
    but the new head replaced by those weights."""
    seed_key = jax.random.key(seed)
    variables = dict(model.init(seed_key, jnp.zeros((1,) + tuple(image_shape), jnp.float32)))
    if config.init == "torch":  # before the pretrained weights: the new head keeps it
        from oat_jax.models.torch_init import torch_default_init
        variables["params"] = torch_default_init(variables["params"], jax.random.fold_in(seed_key, 2))
    dropout_key = jax.random.fold_in(seed_key, 1)  # a stream of its own, apart from the initialisation
    if pretrained:
        from oat_jax.models import weights
        variables = weights.load_torchvision_weights(config.model, pretrained, variables)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              tx=sgd(config.learning_rate, config.momentum),
                              batch_stats=variables.get("batch_stats", {}),
                              dropout_key=jax.random.key_data(dropout_key),
                              has_batch_stats="batch_stats" in variables)
    # Typed and placed like a restored checkpoint's arrays, or the steps would compile again after a restore.
    return jax.device_put(state.replace(step=jnp.asarray(0, jnp.int32)), jax.local_devices()[0])


def create_replicas(model, image_shape, config, pretrained: str = "") -> TrainState:
    """The states of all replicas stacked on a leading axis (K = num_seeds)."""
    states = [create_train_state(model, image_shape, config, seed, pretrained) for seed in replica_seeds(config)]
    return sharding.place_states(jax.tree.map(lambda *leaves: jnp.stack(leaves), *states), sharding.data_mesh())
