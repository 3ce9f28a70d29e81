"""Milliseconds per training and evaluation step, OAT against cross-entropy, JAX against PyTorch.

    python -m benchmarks.step_time [--model lightweight] [--image-shape 32,32,3] [--batch-size 32]
                                   [--steps 100] [--repeats 5] [--out benchmarks/results/FILE.json]

Everything is measured in one process, so the ratios compare like with like. The JAX steps are the
project's own jitted ``train_step`` / ``eval_step``; the PyTorch loop (when torch is installed) is the same
model and the same equations in eager mode. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks import common, torch_reference
from oat_jax import train
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
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch loop")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    try:
        args.image_shape = tuple(int(v) for v in args.image_shape.split(","))
        assert len(args.image_shape) == 3
    except (ValueError, AssertionError):
        parser.error(f"--image-shape must be H,W,C, got {args.image_shape!r}")
    return args


def _jax_figures(args) -> dict:
    config = base_config()
    config.variant = args.variant
    model = train._model(args.model, args.num_classes)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size,) + args.image_shape, dtype=np.uint8)
    labels = rng.integers(0, args.num_classes, args.batch_size).astype(np.int32)
    mask = np.ones(args.batch_size, dtype=bool)
    mean = np.full(args.image_shape[-1], 0.5, np.float32)
    std = np.full(args.image_shape[-1], 0.25, np.float32)
    figures = {"train_ms": {}, "eval_ms": {}, "first_call_s": {}}

    for objective in ("ce", "oat"):
        state = train.create_train_state(model, args.image_shape, config, seed=0)
        holder = {"state": state}

        def steps(count):
            state, loss = holder["state"], None
            for _ in range(count):
                state, loss, _ = train.train_step(state, images, labels, mask, mean, std, objective=objective,
                                                  variant=args.variant)
            jax.block_until_ready(loss)
            holder["state"] = state

        started = time.perf_counter()
        steps(1)  # compiles
        figures["first_call_s"][f"train_{objective}"] = time.perf_counter() - started
        steps(10)
        stats = common.timed_repeats(lambda: steps(args.steps), args.repeats)
        figures["train_ms"][objective] = common.scaled(stats, 1e3 / args.steps)

    state = holder["state"]
    for decode in ("ce", "oat"):
        def evals(count):
            out = None
            for _ in range(count):
                out = train.eval_step(state, images, labels, mask, mean, std, variant=args.variant,
                                      decodes=(decode,))
            jax.block_until_ready(out)

        started = time.perf_counter()
        evals(1)
        figures["first_call_s"][f"eval_{decode}"] = time.perf_counter() - started
        evals(10)
        stats = common.timed_repeats(lambda: evals(args.steps), args.repeats)
        figures["eval_ms"][decode] = common.scaled(stats, 1e3 / args.steps)
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

        def steps(count):
            for _ in range(count):
                loss = step(images, labels)
            loss.item()

        steps(10)
        stats = common.timed_repeats(lambda: steps(args.steps), args.repeats)
        figures["train_ms"][objective] = common.scaled(stats, 1e3 / args.steps)
    return figures


def main():
    args = _parse()
    result = {"benchmark": "step_time", "environment": common.environment(),
              "setup": {"model": args.model, "image_shape": list(args.image_shape), "batch_size": args.batch_size,
                        "num_classes": args.num_classes, "variant": args.variant, "steps": args.steps,
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
