"""Data-parallel scaling: milliseconds per training step and samples per second on 1, 2, 4, ... devices,
cross-entropy against OAT with the global anchor and with the per-device anchor.

    python -m benchmarks.scaling [--model lightweight] [--image-shape 32,32,3] [--per-device-batch 32]
                                 [--devices 1,2,4,8] [--steps 300] [--repeats 3] [--steps-in-flight 2]
                                 [--out benchmarks/results/FILE.json]

Weak scaling: each device keeps ``--per-device-batch`` samples, so the global batch grows with the device
count. The steps are the training loop's own (``steps.train_step_replicas``) on the loop's placement
(``oat_jax.sharding``), over a mesh of the first N devices. Efficiency at N devices = samples/s at N / (N x
samples/s on one). On a CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` makes N devices that
share the same cores: that measures the partitioning's overhead, not a speed-up. Prints one JSON object.
"""
from __future__ import annotations

import argparse

import jax
import numpy as np
from jax.sharding import Mesh

from benchmarks import common
from oat_jax import sharding, steps
from oat_jax import state as state_lib
from oat_jax.objectives import LossSettings
from oat_jax.config_schema import base_config

# (name, objective, per-device anchor)
ARMS = (("ce", "ce", False), ("oat", "oat", False), ("oat_device_anchor", "oat", True))


def _parse():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0],
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("--model", default="lightweight", help="a model name of oat_jax.models")
    parser.add_argument("--image-shape", default="32,32,3", help="H,W,C (default: %(default)s, CIFAR-10's)")
    parser.add_argument("--num-classes", type=int, default=10, help="outputs of the model's head")
    parser.add_argument("--per-device-batch", type=int, default=32, help="samples per device in each step")
    parser.add_argument("--devices", default="", help="device counts to time (default: 1, 2, 4, ... up to all)")
    parser.add_argument("--steps", type=int, default=300, help="steps per timed repetition")
    parser.add_argument("--steps-in-flight", type=int, default=base_config().steps_in_flight,
                        help="steps dispatched ahead of the devices, as the training loop's config field "
                             "(0 = unbounded: deadlocks XLA:CPU with several devices)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    available = jax.device_count()
    args.image_shape = common.image_shape(parser, args.image_shape)
    try:
        args.devices = ([int(n) for n in args.devices.split(",") if n] if args.devices
                        else [2 ** k for k in range(available.bit_length()) if 2 ** k <= available])
    except ValueError:
        parser.error(f"--devices must be counts separated by commas, got {args.devices!r}")
    if not args.devices or any(not 1 <= n <= available for n in args.devices):
        parser.error(f"--devices must lie in 1..{available} (the devices JAX sees), got {args.devices}")
    return args


def _time_arm(args, model, mesh, objective, per_device_anchor):
    """(first call seconds, ms per step) of one arm's training step over ``mesh``."""
    batch = args.per_device_batch * mesh.size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1, batch) + args.image_shape, dtype=np.uint8)
    labels = rng.integers(0, args.num_classes, (1, batch)).astype(np.int32)
    placed = sharding.place_batch((images, labels, np.ones((1, batch), bool)), mesh)
    mean = np.full(args.image_shape[-1], 0.5, np.float32)
    std = np.full(args.image_shape[-1], 0.25, np.float32)
    state = state_lib.create_train_state(model, args.image_shape, base_config(), 0)
    states = sharding.place_states(jax.tree.map(lambda leaf: leaf[None], state), mesh)  # one replica
    metrics = sharding.place_states(steps.new_metrics(1, args.num_classes), mesh)
    settings = steps.StepSettings(mean, std, steps.sampled_steps(args.steps), objective,
                                  LossSettings(anchor_groups=mesh.size if per_device_anchor else 1))
    first, stats, _ = common.time_training_steps(
        states, lambda states: steps.train_step_replicas(states, metrics, placed, settings),
        args.steps, args.repeats, args.steps_in_flight)
    return first, stats


def main():
    args = _parse()
    model = state_lib.cached_model(args.model, args.num_classes)
    result = {"benchmark": "scaling", "environment": common.environment(),
              "setup": {"model": args.model, "image_shape": list(args.image_shape), "num_classes": args.num_classes,
                        "per_device_batch": args.per_device_batch, "devices": args.devices, "steps": args.steps,
                        "steps_in_flight": args.steps_in_flight,
                        "repeats": args.repeats, "scaling": "weak (the global batch grows with the devices)"},
              "by_devices": {}}
    for count in args.devices:
        mesh = Mesh(np.array(jax.devices()[:count]), ("data",))
        figures = {"global_batch": args.per_device_batch * count, "train_ms": {}, "first_call_s": {},
                   "samples_per_s": {}}
        for name, objective, per_device_anchor in ARMS:
            first, stats = _time_arm(args, model, mesh, objective, per_device_anchor)
            figures["first_call_s"][name] = first
            figures["train_ms"][name] = stats
            figures["samples_per_s"][name] = 1e3 * figures["global_batch"] / stats["median"]
        figures["oat_over_ce"] = common.ratio(figures["train_ms"]["oat"], figures["train_ms"]["ce"])
        figures["oat_device_anchor_over_oat"] = common.ratio(figures["train_ms"]["oat_device_anchor"],
                                                             figures["train_ms"]["oat"])
        result["by_devices"][str(count)] = figures
    if "1" in result["by_devices"]:
        single = result["by_devices"]["1"]["samples_per_s"]
        for count, figures in result["by_devices"].items():
            figures["efficiency"] = {name: figures["samples_per_s"][name] / (int(count) * single[name])
                                     for name, _, _ in ARMS}
    result["peak_rss_mb"] = common.peak_rss_mb()
    common.emit(result, args.out)


if __name__ == "__main__":
    main()
