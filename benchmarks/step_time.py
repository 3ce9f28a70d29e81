"""Milliseconds per training and evaluation step, OAT against cross-entropy, JAX against PyTorch.

    python -m benchmarks.step_time [--model lightweight] [--image-shape 32,32,3] [--batch-size 32]
                                   [--steps 100] [--repeats 5] [--out benchmarks/results/FILE.json]

Everything is measured in one process, so the ratios compare like with like. The JAX steps are the
training loop's own jitted steps (``steps.train_step_replicas`` / ``eval_step_replicas``, one replica; and
K replicas for several seeds); the PyTorch loop (when torch is installed) is the same
model and the same equations in eager mode. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks import common, torch_reference
from oat_jax import state as state_lib
from oat_jax import steps
from oat_jax.objectives import LossSettings
from oat_jax.config_schema import base_config


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="lightweight")
    parser.add_argument("--image-shape", default="32,32,3", help="H,W,C (default: CIFAR-10's)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variant", default="released")
    parser.add_argument("--steps", type=int, default=100, help="steps per timed repetition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", default="1,4,8",
                        help="replica counts K for the several-seeds figure (cross-entropy steps)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch loop")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    try:
        args.seeds = [int(k) for k in args.seeds.split(",") if k]
        args.image_shape = tuple(int(v) for v in args.image_shape.split(","))
        assert len(args.image_shape) == 3
    except (ValueError, AssertionError):
        parser.error(f"--image-shape must be H,W,C, got {args.image_shape!r}")
    return args


def _batch(args, replicas):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (replicas, args.batch_size) + args.image_shape, dtype=np.uint8)
    labels = rng.integers(0, args.num_classes, (replicas, args.batch_size)).astype(np.int32)
    return images, labels, np.ones((replicas, args.batch_size), dtype=bool)


def _time_train_steps(args, config, model, objective, replicas):
    """(first call seconds, ms per step) of the training loop's step for K replicas."""
    config.num_seeds = replicas
    images, labels, masks = _batch(args, replicas)
    mean = np.full(args.image_shape[-1], 0.5, np.float32)
    std = np.full(args.image_shape[-1], 0.25, np.float32)
    states = state_lib.create_replicas(model, args.image_shape, config)
    metrics, sample_at = steps.new_metrics(replicas, args.num_classes), steps.sampled_steps(args.steps)
    settings = LossSettings(variant=args.variant)
    return common.time_training_steps(
        states, lambda states: steps.train_step_replicas(states, metrics, images, labels, masks, sample_at, mean, std,
                                                         objective=objective, settings=settings),
        args.steps, args.repeats)


def _jax_figures(args) -> dict:
    config = base_config()
    config.variant = args.variant
    model = state_lib.cached_model(args.model, args.num_classes)
    figures = {"train_ms": {}, "eval_ms": {}, "first_call_s": {}, "seeds": {}}
    for objective in ("ce", "oat"):
        first, stats, states = _time_train_steps(args, config, model, objective, replicas=1)
        figures["first_call_s"][f"train_{objective}"] = first
        figures["train_ms"][objective] = stats

    images, labels, masks = _batch(args, 1)
    mean = np.full(args.image_shape[-1], 0.5, np.float32)
    std = np.full(args.image_shape[-1], 0.25, np.float32)
    train_anchors = np.full((1, args.num_classes), 1 / args.num_classes, np.float32)  # used by no decoding here
    for key, decode in (("ce", "argmax"), ("oat", "anchor")):  # keyed by the arm whose decoding it is
        def evals(count):
            out = None
            for _ in range(count):
                out = steps.eval_step_replicas(states, images, labels, masks, train_anchors, mean, std,
                                               variant=args.variant, decodes=(decode,))
            jax.block_until_ready(out)

        started = time.perf_counter()
        evals(1)
        figures["first_call_s"][f"eval_{key}"] = time.perf_counter() - started
        evals(10)
        stats = common.timed_repeats(lambda: evals(args.steps), args.repeats)
        figures["eval_ms"][key] = common.scaled(stats, 1e3 / args.steps)

    # Several seeds in one program: K replicas per step; what matters is the time per seed.
    for replicas in args.seeds:
        _, stats, _ = _time_train_steps(args, config, model, "ce", replicas)
        per_seed = stats["median"] / replicas
        figures["seeds"][str(replicas)] = {"train_ms": stats, "per_seed_ms": per_seed,
                                           "per_seed_samples_per_s": 1e3 * args.batch_size / per_seed}
    return figures


def _torch_figures(args) -> dict:
    import torch
    height, width, channels = args.image_shape
    images, labels = torch_reference.random_batch(args.batch_size, channels, height, width, args.num_classes)
    figures = {"train_ms": {}, "threads": torch.get_num_threads(), "version": torch.__version__}
    for objective in ("ce", "oat"):
        torch.manual_seed(0)
        model = torch_reference.lightweight_cnn(channels, height, width, args.num_classes)
        step = torch_reference.make_train_step(model, objective)

        def run_steps(count):
            for _ in range(count):
                loss = step(images, labels)
            loss.item()

        run_steps(10)
        stats = common.timed_repeats(lambda: run_steps(args.steps), args.repeats)
        figures["train_ms"][objective] = common.scaled(stats, 1e3 / args.steps)
    return figures


def main():
    args = _parse()
    result = {"benchmark": "step_time", "environment": common.environment(),
              "setup": {"model": args.model, "image_shape": list(args.image_shape), "batch_size": args.batch_size,
                        "num_classes": args.num_classes, "variant": args.variant, "steps": args.steps,
                        "seeds": args.seeds,
                        "repeats": args.repeats}}
    result["jax"] = _jax_figures(args)
    ratios = {
        "oat_over_ce_train": common.ratio(result["jax"]["train_ms"]["oat"], result["jax"]["train_ms"]["ce"]),
        "oat_over_ce_eval": common.ratio(result["jax"]["eval_ms"]["oat"], result["jax"]["eval_ms"]["ce"]),
    }
    if not args.no_torch and torch_reference.available() and args.model == "lightweight":
        result["torch"] = _torch_figures(args)
        for objective in ("ce", "oat"):
            ratios[f"jax_over_torch_train_{objective}"] = common.ratio(result["jax"]["train_ms"][objective],
                                                                       result["torch"]["train_ms"][objective])
    result["ratios"] = ratios
    result["peak_rss_mb"] = common.peak_rss_mb()
    common.emit(result, args.out)


if __name__ == "__main__":
    main()
