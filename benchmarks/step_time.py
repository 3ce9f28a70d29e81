"""Milliseconds per training and evaluation step, OAT against cross-entropy, JAX against PyTorch.

    python -m benchmarks.step_time [--model lightweight] [--image-shape 32,32,3] [--batch-size 32]
                                   [--steps 100] [--repeats 5] [--seeds 1,4,8] [--quick]
                                   [--torch-device auto] [--out benchmarks/results/FILE.json]

Everything is measured in one process, so the ratios compare like with like. The JAX steps are the
training loop's own jitted steps (``steps.train_step_replicas`` / ``eval_step_replicas``, one replica; and
K replicas for several seeds); the PyTorch loop (when torch is installed) is the same
model and the same equations in eager mode, on the GPU where JAX runs on one and PyTorch sees it (CUDA), else
on the CPU. ``--quick`` times fewer steps and repetitions (a run of a few seconds once compiled) for a first
look; figures for the README come from the defaults. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import ast
import time

import jax
import numpy as np

from benchmarks import common, torch_reference
from oat_jax import state as state_lib
from oat_jax import objectives, steps
from oat_jax.objectives import LossSettings
from oat_jax.config_schema import base_config

_INITIAL: dict = {}  # K -> the initial states of K replicas (one model per run)

# Timing sizes: the defaults, and what --quick uses instead; an option given explicitly wins over both.
DEFAULTS = {"steps": 100, "repeats": 5, "seeds": "1,4,8"}
QUICK = {"steps": 10, "repeats": 2, "seeds": "1,4"}


def _parse():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_time", description=__doc__.split("\n")[0],
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("--model", default="lightweight", help="a model name of oat_jax.models")
    parser.add_argument("--model-override", default="",
                        help="module fields to change, e.g. depth=10,widen_factor=1: a large model's code path at "
                             "a small size, for quick checks")
    parser.add_argument("--image-shape", default="32,32,3", help="H,W,C (default: %(default)s, CIFAR-10's)")
    parser.add_argument("--num-classes", type=int, default=10, help="outputs of the model's head")
    parser.add_argument("--batch-size", type=int, default=32, help="training and evaluation batch")
    parser.add_argument("--variant", default="released", help="OAT's anchor: released or paper")
    parser.add_argument("--steps", type=int, help=f"steps per timed repetition (default: {DEFAULTS['steps']}; "
                                                  f"{QUICK['steps']} with --quick)")
    parser.add_argument("--repeats", type=int, help=f"timed repetitions (default: {DEFAULTS['repeats']}; "
                                                    f"{QUICK['repeats']} with --quick)")
    parser.add_argument("--seeds", help="replica counts K for the several-seeds figure, cross-entropy steps; '' = "
                                        f"none (default: {DEFAULTS['seeds']}; {QUICK['seeds']} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a first look in a few seconds: --steps {QUICK['steps']} --repeats {QUICK['repeats']} "
                             f"--seeds {QUICK['seeds']} unless given")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch loop")
    parser.add_argument("--torch-device", default="auto", choices=torch_reference.DEVICES,
                        help="the PyTorch loop's device: auto = CUDA where JAX runs on a GPU and PyTorch sees one")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    for name, default in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    try:
        args.seeds = [int(k) for k in args.seeds.split(",") if k]
    except ValueError:
        parser.error(f"--seeds must be counts separated by commas, got {args.seeds!r}")
    args.image_shape = common.image_shape(parser, args.image_shape)
    try:
        args.model_override = _fields(args.model_override)
        _model(args)  # a field the model does not have is refused here (building a module computes nothing)
    except (ValueError, SyntaxError, TypeError) as error:
        parser.error(f"--model-override must be FIELD=VALUE pairs of the model's fields, got "
                     f"{args.model_override!r} ({error})")
    if args.steps < 1 or args.repeats < 1:
        parser.error(f"--steps and --repeats must be at least 1, got {args.steps} and {args.repeats}")
    return args


def _fields(text: str) -> dict:
    """"depth=10,widen_factor=1" -> {"depth": 10, "widen_factor": 1} (values as Python literals)."""
    fields = {}
    for pair in filter(None, text.split(",")):
        name, value = pair.split("=", 1)
        fields[name.strip()] = ast.literal_eval(value.strip())
    return fields


def _model(args):
    """The registered model, with ``--model-override``'s fields changed (the same module class and code)."""
    model = state_lib.cached_model(args.model, args.num_classes)
    return model.clone(**args.model_override) if args.model_override else model


def _batch(args, replicas):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (replicas, args.batch_size) + args.image_shape, dtype=np.uint8)
    labels = rng.integers(0, args.num_classes, (replicas, args.batch_size)).astype(np.int32)
    return images, labels, np.ones((replicas, args.batch_size), dtype=bool)


def _initial_states(args, config, model, replicas):
    """A fresh copy of the K replicas' initial states (the steps donate theirs), each K initialised once: the
    arms start from the same states, and initialising (op by op) costs more than the timing on a CPU."""
    if replicas not in _INITIAL:
        config.num_seeds = replicas
        _INITIAL[replicas] = state_lib.create_replicas(model, args.image_shape, config)
    return jax.tree.map(lambda leaf: leaf.copy(), _INITIAL[replicas])


def _normalisation(args) -> tuple[np.ndarray, np.ndarray]:
    """A per-channel mean and std to standardise the random images with."""
    return np.full(args.image_shape[-1], 0.5, np.float32), np.full(args.image_shape[-1], 0.25, np.float32)


def _time_train_steps(args, config, model, objective, replicas):
    """(first call seconds, ms per step) of the training loop's step for K replicas."""
    batch = _batch(args, replicas)
    states = _initial_states(args, config, model, replicas)
    metrics = steps.new_metrics(replicas, args.num_classes)
    settings = steps.StepSettings(*_normalisation(args), steps.sampled_steps(args.steps), objective,
                                  LossSettings(variant=args.variant))
    return common.time_training_steps(
        states, lambda states: steps.train_step_replicas(states, metrics, batch, settings), args.steps, args.repeats)


def _jax_figures(args) -> dict:
    config = base_config()
    config.variant = args.variant
    model = _model(args)
    figures = {"train_ms": {}, "eval_ms": {}, "first_call_s": {}, "seeds": {}}
    for objective in ("ce", "oat"):
        first, stats, states = _time_train_steps(args, config, model, objective, replicas=1)
        figures["first_call_s"][f"train_{objective}"] = first
        figures["train_ms"][objective] = stats

    batch = _batch(args, 1)
    settings = steps.StepSettings(*_normalisation(args), loss=LossSettings(variant=args.variant))
    train_anchors = np.full((1, args.num_classes), 1 / args.num_classes, np.float32)  # used by no decoding here
    for key in ("ce", "oat"):  # keyed by the arm whose decoding it is
        decode = objectives.get(key).decode

        def evals(count):
            out = None
            for _ in range(count):
                out = steps.eval_step_replicas(states, batch, train_anchors, settings, decodes=(decode,))
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


def _torch_figures(args, device: str) -> dict:
    figures = {"train_ms": {}, **torch_reference.device_description(device)}
    for objective in ("ce", "oat"):
        figures["train_ms"][objective] = torch_reference.time_train_steps(
            objective, args.image_shape, args.batch_size, args.num_classes, args.steps, args.repeats, device)
    return figures


def _torch_skipped(args) -> str | None:
    """Why the PyTorch loop is not run (None: it is); a missing torch is also said on stderr."""
    if args.no_torch:
        return "--no-torch"
    if args.model != "lightweight" or args.model_override:
        return f"the PyTorch reference has only the lightweight CNN, not '{args.model}'"
    if not torch_reference.available():
        return common.torch_skip_note()
    return None


def main():
    args = _parse()
    result = {"benchmark": "step_time", "environment": common.environment(),
              "setup": {"model": args.model, "image_shape": list(args.image_shape), "batch_size": args.batch_size,
                        "num_classes": args.num_classes, "variant": args.variant, "steps": args.steps,
                        "seeds": args.seeds,
                        "repeats": args.repeats}}
    if args.model_override:
        result["setup"]["model_override"] = args.model_override
    if args.quick:
        result["setup"]["quick"] = True
    skipped = _torch_skipped(args)
    result["jax"] = _jax_figures(args)
    ratios = {
        "oat_over_ce_train": common.ratio(result["jax"]["train_ms"]["oat"], result["jax"]["train_ms"]["ce"]),
        "oat_over_ce_eval": common.ratio(result["jax"]["eval_ms"]["oat"], result["jax"]["eval_ms"]["ce"]),
    }
    if skipped:
        result["setup"]["torch_skipped"] = skipped
    else:
        device = torch_reference.resolve_device(args.torch_device, jax.default_backend())
        result["torch"] = _torch_figures(args, device)
        for objective in ("ce", "oat"):
            ratios[f"jax_over_torch_train_{objective}"] = common.ratio(result["jax"]["train_ms"][objective],
                                                                       result["torch"]["train_ms"][objective])
    result["ratios"] = ratios
    result["peak_rss_mb"] = common.peak_rss_mb()
    common.emit(result, args.out)


if __name__ == "__main__":
    main()
