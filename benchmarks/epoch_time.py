"""Whole epochs of the default workload as the CLI runs it, JAX against an independent PyTorch eager loop.

    python -m benchmarks.epoch_time [--datasets fashion_mnist,cifar10] [--model lightweight] [--epochs 3]
                                    [--train-limit 0] [--test-limit 0] [--eval-repeats 3] [--no-fused]
                                    [--no-torch] [--torch-device auto] [--out benchmarks/results/FILE.json]

Per dataset found on this machine (others are listed under "skipped", with the reason): the lightweight CNN,
batch 32, evaluation batch 32, SGD with learning rate 0.001 and momentum 0.9, trained for ``--epochs`` whole
epochs per arm. An epoch is what the CLI does per epoch (``oat_jax.train``, less its checkpoint and log
writes): a full training pass, then the evaluation of the whole test set with the arm's decoding (argmax
for cross-entropy, each test batch's own anchor for OAT).

Arms:
- JAX ``ce`` and ``oat``: the training loop's own ``train.train_epoch`` and ``evaluation.evaluate`` on an
  ``Experiment`` built from ``base_config()``, step by step from host memory (``fused_epoch=False``, what
  the default chooses on CPU); ``ce_fused`` and ``oat_fused`` (unless ``--no-fused``): the same epochs fused
  into one compiled loop over device-resident data (``fused_epoch=True``). On XLA:CPU the fused loop is the
  slower one (XLA:CPU runs the convolutions inside a while loop through a slower generic path); it is measured
  to show by how much.
- PyTorch ``torch_ce`` and ``torch_oat`` (when torch is importable, unless ``--no-torch``; on the GPU where JAX
  runs on one and PyTorch sees it, else on the CPU, as ``--torch-device`` says):
  ``torch_reference.lightweight_cnn`` in eager mode with torch's default thread count, the same batch sizes and
  epochs, a new shuffled order each epoch, ``torch_reference.make_train_step`` (images scaled by 1/255 and then
  standardised with the training set's per-channel mean and std, exactly as the JAX steps do), and the whole
  test set evaluated in batches of 32 under ``torch.no_grad()``: argmax for ce; for oat the released decoding,
  anchor = softmax(mean softmax(z)) of the test batch, prediction argmax(anchor * (z + 1)).

The measurement is interleaved, so that all arms share the machine's noise: the outer loop runs over
epochs, the inner one over the arms, and epoch e of every arm is measured close in time to the others'. The
first epoch of a JAX arm compiles its steps: JAX's own compile events (``train.CompileClock``) give how much,
and the steady epochs (2..N) are the ones compared. After the last epoch, the final OAT state (JAX, step by
step) is evaluated ``--eval-repeats`` times three ways: argmax, OAT with each test batch's anchor, and the
paper's slower alternative, per-class anchors precomputed over the training set with the nearest one chosen
for each test sample (the paper's 4.391 s / 4.219 s / 9.116 s comparison). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, torch_reference
from oat_jax import data, evaluation, input_pipeline, oat, objectives, steps, train
from oat_jax.config_schema import base_config
from oat_jax.experiment import Experiment

BATCH_SIZE = EVAL_BATCH_SIZE = 32
LEARNING_RATE, MOMENTUM = 0.001, 0.9
DECODES = {objective: objectives.get(objective).decode for objective in ("ce", "oat")}


def _parse():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.epoch_time", description=__doc__.split("\n")[0],
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("--datasets", default="fashion_mnist,cifar10",
                        help="datasets to time, each where found on this machine (others are listed as skipped)")
    parser.add_argument("--model", default="lightweight", help="a model name of oat_jax.models")
    parser.add_argument("--epochs", type=int, default=3, help="whole epochs per arm; 2..N are the steady ones")
    parser.add_argument("--train-limit", type=int, default=0, help="first N training samples (0 = all)")
    parser.add_argument("--test-limit", type=int, default=0, help="first N test samples (0 = all)")
    parser.add_argument("--eval-repeats", type=int, default=3,
                        help="repetitions of the evaluation comparison after the last epoch")
    parser.add_argument("--no-fused", action="store_true", help="skip the fused JAX arms")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch arms")
    parser.add_argument("--torch-device", default="auto", choices=torch_reference.DEVICES,
                        help="the PyTorch arms' device: auto = CUDA where JAX runs on a GPU and PyTorch sees one")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error(f"--epochs must be at least 2 (the first epoch compiles; 2..N are compared), got {args.epochs}")
    if args.eval_repeats < 1:
        parser.error(f"--eval-repeats must be at least 1, got {args.eval_repeats}")
    return args


# The paper's class-anchor alternative, on one model (one replica's state).

@functools.partial(jax.jit, static_argnames=("variant",))
def _class_anchor_sums(state, images, labels, mask, mean, std, *, variant):
    """Per-class sums of each sample's own anchor (a batch of one), for the class-anchor alternative."""
    outputs = state.apply_fn(state.variables(), steps.normalise(images, mean, std), train=False)
    own = jax.vmap(lambda z: oat.batch_anchor(z[None], variant=variant))(outputs)
    onehot = jax.nn.one_hot(labels, outputs.shape[-1]) * mask[:, None]
    return onehot.T @ own, onehot.sum(axis=0)


@functools.partial(jax.jit, static_argnames=("variant",))
def _nearest_class_anchor_correct(state, images, labels, mask, mean, std, class_anchors, *, variant):
    """Decodes each test sample with the precomputed class anchor nearest to its own anchor."""
    outputs = state.apply_fn(state.variables(), steps.normalise(images, mean, std), train=False)
    own = jax.vmap(lambda z: oat.batch_anchor(z[None], variant=variant))(outputs)
    distances = jnp.sum(jnp.square(own[:, None, :] - class_anchors[None]), axis=-1)
    anchors = class_anchors[jnp.argmin(distances, axis=-1)]
    predictions = jnp.argmax(oat.decode(outputs, anchors), axis=-1)
    return jnp.sum(mask & (predictions == labels))


def _class_anchor_evaluation(state, exp: Experiment, dataset: data.Dataset | None = None):
    """Precomputes class anchors over the training set, then evaluates the test set with them, in batches of
    the experiment's eval batch size: (precompute seconds, evaluation seconds, accuracy %). ``state`` is one
    replica's state; ``dataset`` (default the experiment's) only to compile on a small one."""
    dataset, config = dataset or exp.dataset, exp.config
    started = time.perf_counter()
    sums, counts = 0.0, 0.0
    order = np.arange(len(dataset.train_labels))
    for images, labels, mask in input_pipeline.batches(dataset.train_images, dataset.train_labels, order,
                                                      config.eval_batch_size):
        batch_sums, batch_counts = _class_anchor_sums(state, images, labels, mask, exp.mean, exp.std,
                                                      variant=config.variant)
        sums, counts = sums + batch_sums, counts + batch_counts
    class_anchors = jax.block_until_ready(sums / jnp.maximum(counts, 1)[:, None])
    precompute = time.perf_counter() - started
    started = time.perf_counter()
    order = input_pipeline.eval_order(len(dataset.test_labels), config.seed, config.shuffle_eval)
    correct = [_nearest_class_anchor_correct(state, images, labels, mask, exp.mean, exp.std, class_anchors,
                                             variant=config.variant)
               for images, labels, mask in input_pipeline.batches(dataset.test_images, dataset.test_labels, order,
                                                                  config.eval_batch_size)]
    accuracy = 100.0 * int(sum(jax.device_get(correct))) / len(order)
    return precompute, time.perf_counter() - started, accuracy


# The arms: each holds its own model and runs one epoch (training, then evaluation) when called.

class _JaxArm:
    framework = "jax"

    def __init__(self, exp: Experiment, objective: str):
        self.exp, self.objective, self.decode = exp, objective, DECODES[objective]
        self.steps, self.fused = exp.bind_steps(objective), exp.on_device is not None
        # A copy: the steps donate their input states, and every arm starts from the same template.
        self.states = jax.tree.map(lambda leaf: leaf.copy(), exp.template)

    def run_epoch(self, epoch: int) -> dict:
        with train.CompileClock() as clock:
            started = time.perf_counter()
            self.states, _ = train.train_epoch(self.exp, self.steps, self.states, epoch, self.objective)
            trained = time.perf_counter()
            accuracy = evaluation.evaluate(self.exp, self.states, decodes=(self.decode,),
                                           batch_size=EVAL_BATCH_SIZE)[self.decode][0]
            ended = time.perf_counter()
        return {"epoch_s": ended - started, "train_s": trained - started, "eval_s": ended - trained,
                "compile_s": clock.seconds, "test_accuracy": accuracy}


class _TorchArm:
    framework = "torch"
    fused = False

    def __init__(self, dataset: data.Dataset, tensors: dict, objective: str, mean, std, seed: int, device: str):
        import torch
        self.objective, self.decode, self.tensors, self.seed = objective, DECODES[objective], tensors, seed
        self.mean, self.std = mean, std
        torch.manual_seed(seed)
        height, width, channels = dataset.train_images.shape[1:]
        self.model = torch_reference.lightweight_cnn(channels, height, width, dataset.num_classes).to(device)
        self.step = torch_reference.make_train_step(self.model, objective, LEARNING_RATE, MOMENTUM, mean, std)

    def run_epoch(self, epoch: int) -> dict:
        started = time.perf_counter()
        torch_reference.train_epoch(self.step, *self.tensors["train"], BATCH_SIZE, self.seed, epoch)
        trained = time.perf_counter()
        accuracy = torch_reference.evaluate(self.model, *self.tensors["test"], self.objective, EVAL_BATCH_SIZE,
                                            self.mean, self.std)
        ended = time.perf_counter()
        return {"epoch_s": ended - started, "train_s": trained - started, "eval_s": ended - trained,
                "test_accuracy": accuracy}


def _summary(arm, epochs: list[dict]) -> dict:
    """Every epoch's figures, the first epoch's, and the steady epochs' (2..N) spread."""
    record = {"framework": arm.framework, "objective": arm.objective, "decode": arm.decode, "fused": arm.fused}
    for key in ("epoch_s", "train_s", "eval_s", "test_accuracy") + (("compile_s",) if arm.framework == "jax" else ()):
        record[key] = [e[key] for e in epochs]
    record["first_epoch_s"] = epochs[0]["epoch_s"]
    record["steady_epoch_s"] = common.spread(record["epoch_s"][1:])
    record["steady_train_s"] = common.spread(record["train_s"][1:])
    record["steady_eval_s"] = common.spread(record["eval_s"][1:])
    if arm.framework == "jax":
        record["first_epoch_compile_s"] = epochs[0]["compile_s"]
        record["steady_compile_s"] = common.spread(record["compile_s"][1:])
    record["final_test_accuracy"] = epochs[-1]["test_accuracy"]
    return record


def _evaluation_comparison(exp: Experiment, states, repeats: int) -> dict:
    """Whole-test-set evaluations of one trained state: argmax, OAT's batch anchors, class anchors
    (precomputed over the training set); interleaved repeats, each decoding compiled beforehand."""
    state = jax.tree.map(lambda leaf: leaf[0], states)  # the class-anchor evaluator takes one model
    # Two training batches: the sums' first addition and the later ones are different operations.
    warm = data.Dataset(exp.dataset.name, exp.dataset.train_images[:2 * BATCH_SIZE],
                        exp.dataset.train_labels[:2 * BATCH_SIZE], exp.dataset.test_images[:1],
                        exp.dataset.test_labels[:1], exp.dataset.num_classes, exp.dataset.source)
    _class_anchor_evaluation(state, exp, warm)  # compiles; argmax and anchor compiled in the epochs
    seconds = {"ce": [], "oat": [], "oat_class_anchors": []}
    precompute, accuracies = [], {}
    for _ in range(repeats):
        for key, decode in DECODES.items():
            started = time.perf_counter()
            accuracies[key] = evaluation.evaluate(exp, states, decodes=(decode,),
                                                  batch_size=EVAL_BATCH_SIZE)[decode][0]
            seconds[key].append(time.perf_counter() - started)
        anchors_s, eval_s, accuracies["oat_class_anchors"] = _class_anchor_evaluation(state, exp)
        precompute.append(anchors_s)
        seconds["oat_class_anchors"].append(eval_s)
    return {"of": "the JAX oat arm (step by step) after the last epoch",
            "eval_s": {key: common.spread(values) for key, values in seconds.items()},
            "class_anchor_precompute_s": common.spread(precompute),
            "test_accuracy": accuracies}


def _ratio(arms, numerator, denominator, key="steady_epoch_s"):
    return common.ratio(arms[numerator][key], arms[denominator][key])


def _paired(arms, numerator, denominator) -> dict:
    """The quotients of the two arms' steady epochs measured side by side (epoch e with epoch e)."""
    return common.spread([a / b for a, b in zip(arms[numerator]["epoch_s"][1:], arms[denominator]["epoch_s"][1:])])


def _ratios(arms: dict, evals: dict) -> tuple[dict, dict]:
    """The ratios of steady-epoch medians, and the spread of the same quotients epoch by epoch."""
    pairs = {"oat_over_ce_epoch": ("oat", "ce")}
    for objective in ("ce", "oat"):
        if f"torch_{objective}" in arms:
            pairs[f"jax_over_torch_epoch_{objective}"] = (objective, f"torch_{objective}")
        if f"{objective}_fused" in arms:
            pairs[f"fused_over_stepwise_epoch_{objective}"] = (f"{objective}_fused", objective)
    ratios = {name: _ratio(arms, *pair) for name, pair in pairs.items()}
    paired = {name: _paired(arms, *pair) for name, pair in pairs.items()}
    for objective in ("ce", "oat"):
        arm = arms[objective]
        ratios[f"first_over_steady_{objective}"] = ((arm["first_epoch_s"] - arm["first_epoch_compile_s"])
                                                    / arm["steady_epoch_s"]["median"])
    ratios["oat_over_ce_eval"] = common.ratio(evals["eval_s"]["oat"], evals["eval_s"]["ce"])
    ratios["class_anchors_over_batch_anchor_eval"] = common.ratio(evals["eval_s"]["oat_class_anchors"],
                                                                  evals["eval_s"]["oat"])
    return ratios, paired


def _config(args, dataset_name: str, fused: bool):
    config = base_config()
    config.dataset, config.model, config.progress = dataset_name, args.model, False
    config.train_limit, config.test_limit, config.fused_epoch = args.train_limit, args.test_limit, fused
    config.batch_size, config.eval_batch_size = BATCH_SIZE, EVAL_BATCH_SIZE
    config.learning_rate, config.momentum = LEARNING_RATE, MOMENTUM
    return config


def _measure(dataset_name: str, args, torch_device: str | None) -> dict:
    config = _config(args, dataset_name, fused=False)
    dataset = data.load_dataset(dataset_name, config.data_dir, args.train_limit, args.test_limit)
    stepwise = Experiment.build(config, dataset)
    arms = {"ce": _JaxArm(stepwise, "ce"), "oat": _JaxArm(stepwise, "oat")}
    if not args.no_fused:
        fused = Experiment.build(_config(args, dataset_name, fused=True), dataset)
        arms.update({"ce_fused": _JaxArm(fused, "ce"), "oat_fused": _JaxArm(fused, "oat")})
    if torch_device:
        tensors = {"train": torch_reference.to_tensors(dataset.train_images, dataset.train_labels, torch_device),
                   "test": torch_reference.to_tensors(dataset.test_images, dataset.test_labels, torch_device)}
        for objective in ("ce", "oat"):
            arms[f"torch_{objective}"] = _TorchArm(dataset, tensors, objective, stepwise.mean, stepwise.std,
                                                   config.seed, torch_device)
    epochs = {name: [] for name in arms}
    for epoch in range(1, args.epochs + 1):  # interleaved: epoch e of every arm, then epoch e + 1
        for name, arm in arms.items():
            epochs[name].append(arm.run_epoch(epoch))
    records = {name: _summary(arm, epochs[name]) for name, arm in arms.items()}
    evals = _evaluation_comparison(stepwise, arms["oat"].states, args.eval_repeats)
    ratios, paired = _ratios(records, evals)
    return {"train_samples": len(dataset.train_labels), "test_samples": len(dataset.test_labels),
            "source": dataset.source, "steps_per_epoch": stepwise.steps_per_epoch(),
            "normalisation": {"mean": stepwise.mean.tolist(), "std": stepwise.std.tolist()},
            "arms": records, "evaluation": evals, "ratios": ratios, "paired_ratios": paired}


def main():
    args = _parse()
    load_start = common.load_average()
    with_torch = not args.no_torch and torch_reference.available() and args.model == "lightweight"
    environment = common.environment()
    environment["load_average_start"] = load_start
    setup = {"datasets": args.datasets.split(","), "model": args.model, "epochs": args.epochs,
             "train_limit": args.train_limit, "test_limit": args.test_limit, "eval_repeats": args.eval_repeats,
             "fused": not args.no_fused, "torch": with_torch, "batch_size": BATCH_SIZE,
             "eval_batch_size": EVAL_BATCH_SIZE, "learning_rate": LEARNING_RATE, "momentum": MOMENTUM,
             "variant": base_config().variant, "num_seeds": 1,
             "epoch": "training pass + whole-test-set evaluation with the arm's decoding (no checkpoint writes)",
             "interleaving": "outer loop over epochs, inner loop over arms",
             "torch_normalisation": "uint8 / 255, then the training set's per-channel mean and std (as JAX)"}
    torch_device = None
    if with_torch:
        torch_device = torch_reference.resolve_device(args.torch_device, jax.default_backend())
        described = torch_reference.device_description(torch_device)
        setup["torch_threads"] = described.pop("threads")
        setup["torch_version"] = described.pop("version")
        setup.update({f"torch_{key}": value for key, value in described.items()})
    elif not args.no_torch:
        setup["torch_skipped"] = (common.torch_skip_note() if not torch_reference.available() else
                                  f"the PyTorch reference has only the lightweight CNN, not '{args.model}'")
    result = {"benchmark": "epoch_time", "environment": environment, "setup": setup, "datasets": {}, "skipped": {}}
    for name in setup["datasets"]:
        try:
            result["datasets"][name] = _measure(name, args, torch_device)
        except data.DatasetError as e:
            result["skipped"][name] = str(e)
    result["peak_rss_mb"] = common.peak_rss_mb()
    result["environment"]["tensorflow_imported"] = common.environment()["tensorflow_imported"]
    result["environment"]["load_average_end"] = common.load_average()
    common.emit(result, args.out)


if __name__ == "__main__":
    main()
