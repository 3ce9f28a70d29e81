"""Data parallelism over all devices with ``jax.sharding``: parameters replicated, each batch split along its
batch axis, and XLA's SPMD partitioner inserting the cross-device reductions. With several processes
(``oat_jax.distributed``) the mesh spans every process's devices and each process places its own slices.

Because the steps are written for the whole batch, every reduction over the batch axis stays global under
sharding: the OAT anchor is the centre of the global batch, so a run on N devices computes what one device
computes (up to float summation order). ``anchor_scope="device"`` instead gives each device the anchor of its
own slice (``anchor_groups``). With a single device nothing here changes placement.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ANCHOR_SCOPES = ("global", "device")


class ShardingError(ValueError):
    """A configuration the devices cannot split; the message says what to change."""


def data_mesh() -> Mesh | None:
    """A one-axis ("data") mesh over all devices of all processes, or None on a single device."""
    devices = jax.devices()
    return Mesh(np.array(devices), ("data",)) if len(devices) > 1 else None


def check_batch_sizes(config, mesh: Mesh | None) -> None:
    """The training batch must split evenly over the devices (its size is the global batch)."""
    if mesh is not None and config.batch_size % mesh.size:
        raise ShardingError(f"batch_size {config.batch_size} does not divide over the {mesh.size} devices; "
                            f"use a multiple of {mesh.size}")


def anchor_groups(config, mesh: Mesh | None) -> int:
    """Into how many equal groups the training steps split each batch, each with its own OAT anchor: one
    (the global batch) unless ``anchor_scope`` is "device", then one per device."""
    return mesh.size if config.anchor_scope == "device" and mesh is not None else 1


def place_states(states, mesh: Mesh | None):
    """The replicas' states (or any arrays every device needs whole) replicated on every device, or on the
    one device."""
    if mesh is None:
        return jax.device_put(states, jax.local_devices()[0])
    # Through host memory: with several processes, each one's copy becomes its devices' part of one array.
    return jax.device_put(jax.device_get(states), NamedSharding(mesh, PartitionSpec()))


def batch_sharding(mesh: Mesh | None) -> NamedSharding | None:
    """How a batch (K, B, ...) lies on the devices: split along B."""
    return None if mesh is None else NamedSharding(mesh, PartitionSpec(None, "data"))


def place_batch(arrays, mesh: Mesh | None):
    """Batches (K, B, ...) split along B over the devices where B divides evenly, else replicated (an
    evaluation batch of one, say); unchanged on a single device. Every process holds the whole global batch
    and hands each of its devices that device's slice."""
    if mesh is None:
        return arrays
    placed = []
    for array in arrays:
        spec = PartitionSpec(None, "data") if array.shape[1] % mesh.size == 0 else PartitionSpec()
        placed.append(jax.make_array_from_callback(array.shape, NamedSharding(mesh, spec),
                                                   lambda index, array=array: array[index]))
    return tuple(placed)


def to_host(tree):
    """The values of (possibly sharded, possibly multi-process) arrays as NumPy arrays on every process."""
    def fetch(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and not leaf.is_fully_replicated:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)
    return jax.tree.map(fetch, tree)
