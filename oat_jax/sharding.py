"""Data parallelism over the local devices with ``jax.sharding``: parameters replicated, each batch split
along its batch axis, and XLA's SPMD partitioner inserting the cross-device reductions.

Because the steps are written for the whole batch, every reduction over the batch axis stays global under
sharding: the OAT anchor is the centre of the global batch, so a run on N devices computes what one device
computes (up to float summation order). With a single device nothing here changes placement.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class ShardingError(ValueError):
    """A configuration the devices cannot split; the message says what to change."""


def data_mesh() -> Mesh | None:
    """A one-axis ("data") mesh over all devices, or None on a single device."""
    devices = jax.devices()
    return Mesh(np.array(devices), ("data",)) if len(devices) > 1 else None


def check_batch_sizes(config, mesh: Mesh | None) -> None:
    """The training batch must split evenly over the devices (its size is the global batch)."""
    if mesh is not None and config.batch_size % mesh.size:
        raise ShardingError(f"batch_size {config.batch_size} does not divide over the {mesh.size} devices; "
                            f"use a multiple of {mesh.size}")


def place_states(states, mesh: Mesh | None):
    """The replicas' states on every device (replicated), or on the one device."""
    if mesh is None:
        return jax.device_put(states, jax.devices()[0])
    return jax.device_put(states, NamedSharding(mesh, PartitionSpec()))


def place_batch(arrays, mesh: Mesh | None):
    """Batches (K, B, ...) split along B over the devices where B divides evenly, else replicated (an
    evaluation batch of one, say); unchanged on a single device."""
    if mesh is None:
        return arrays
    return tuple(jax.device_put(a, NamedSharding(mesh, PartitionSpec(None, "data") if a.shape[1] % mesh.size == 0
                                                 else PartitionSpec())) for a in arrays)
