"""The same training steps as a plain PyTorch eager loop, written from the paper's equations, so that both
frameworks are timed on identical work. Only the benchmarks import it; PyTorch is optional.

Everything runs on the CPU unless a device is named: ``resolve_device`` picks CUDA where PyTorch sees a GPU (and,
when comparing with JAX, where JAX runs on a GPU too), and the tensors and models are placed on it. Run alone,

    python -m benchmarks.torch_reference [--device auto] [--steps 100] [--repeats 5] [--epochs 2]
                                         [--out FILE.json]

it times the loop without JAX in the process: training steps on random data, then whole Fashion-MNIST epochs
(training pass + evaluation of the test set) when the dataset is found. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import importlib
import time

import numpy as np

DEVICES = ("auto", "cpu", "cuda")


def available() -> bool:
    try:
        importlib.import_module("torch")
    except ImportError:
        return False
    return True


def resolve_device(requested: str = "auto", jax_platform: str | None = None) -> str:
    """"cpu" or "cuda". ``auto`` is CUDA where PyTorch sees a GPU, unless ``jax_platform`` (the JAX side of a
    comparison) is not a GPU: JAX on the CPU is compared with PyTorch on the CPU."""
    if requested not in DEVICES:
        raise ValueError(f"unknown torch device {requested!r}; one of {', '.join(DEVICES)}")
    if requested != "auto":
        return requested
    import torch
    same_kind = jax_platform in (None, "gpu", "cuda")
    return "cuda" if same_kind and torch.cuda.is_available() else "cpu"


def device_description(device: str) -> dict:
    """Which PyTorch device the figures belong to, and the settings that change its speed."""
    import torch
    described = {"device": device, "version": torch.__version__, "threads": torch.get_num_threads()}
    if device == "cuda":
        described.update({"device_name": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                          "cudnn": torch.backends.cudnn.version(),
                          "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                          "tf32_cudnn": torch.backends.cudnn.allow_tf32})
    return described


def synchronize(device: str) -> None:
    """Waits for the device's queued work (CUDA runs asynchronously)."""
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def _device_of(model):
    return next(model.parameters()).device


def lightweight_cnn(channels: int, height: int, width: int, num_classes: int):
    """The paper's lightweight CNN (conv 6@5x5, conv 16@5x5, ReLU + 2x2 max-pool, FC 128 -> 64 -> C)."""
    import torch
    from torch import nn

    flat = 16 * (((height - 4) // 2 - 4) // 2) * (((width - 4) // 2 - 4) // 2)
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
        nn.Linear(64, num_classes)).to(torch.float32)


def normalise(images, mean=None, std=None):
    """uint8 NCHW images -> float32 on the [0, 1] scale, then standardised per channel when ``mean`` and
    ``std`` (C,) are given (as the JAX steps do: (x / 255 - mean) / std)."""
    scaled = images.float() / 255.0
    if mean is None:
        return scaled
    mean, std = _channel_tensors(mean, std, images.device)
    return (scaled - mean) / std


def _channel_tensors(mean, std, device):
    """Per-channel statistics (arrays or tensors) as float32 tensors shaped (1, C, 1, 1) on ``device``."""
    import torch
    return tuple(torch.as_tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)
                 for values in (mean, std))


def make_train_step(model, objective: str, learning_rate: float = 0.001, momentum: float = 0.9, mean=None, std=None):
    """One SGD-momentum step on a uint8 NCHW batch. "oat" follows the released code: anchor
    softmax(mean softmax(z)), targets onehot/a - 1 built from z without detaching, MSE. Images are scaled to
    [0, 1], and standardised per channel when ``mean`` and ``std`` are given (see ``normalise``). The batch
    is expected on the model's device."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    if mean is not None:  # built once, not at every step
        mean, std = _channel_tensors(mean, std, _device_of(model))

    def step(images, labels):
        optimizer.zero_grad()
        inputs = images.float() / 255.0
        if mean is not None:
            inputs = (inputs - mean) / std
        outputs = model(inputs)
        if objective == "ce":
            loss = F.cross_entropy(outputs, labels)
        else:
            anchor = torch.softmax(torch.softmax(outputs, dim=1).mean(dim=0), dim=0)
            targets = F.one_hot(labels, outputs.shape[1]).float() / anchor - 1.0
            loss = F.mse_loss(outputs, targets)
        loss.backward()
        optimizer.step()
        return loss

    return step


def to_tensors(images: np.ndarray, labels: np.ndarray, device: str = "cpu"):
    """A split of an ``oat_jax.data.Dataset`` (uint8 NHWC, int labels) as torch tensors on ``device``: uint8
    NCHW images and int64 labels, converted and copied once, outside any timing."""
    import torch
    return (torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2))).to(device),
            torch.from_numpy(np.asarray(labels).astype(np.int64)).to(device))


def train_epoch(step, images, labels, batch_size: int, seed: int, epoch: int) -> float:
    """One pass of ``step`` (``make_train_step``) over the training set in a shuffled order drawn for
    (seed, epoch), in batches of ``batch_size`` (the last one partial, as a DataLoader without drop_last
    gives it). Returns the last batch's loss."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    # Drawn on the CPU (the same order on every device), then moved once to where the data is.
    order = torch.randperm(len(labels), generator=generator).to(labels.device)
    loss = None
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        loss = step(images[index], labels[index])
    return float(loss.item())


def released_predict(outputs):
    """OAT's test-time decoding in the released variant, with the batch's own anchor:
    anchor = softmax(mean_b softmax(z_b)), prediction = argmax(anchor * (z + 1))."""
    import torch
    anchor = torch.softmax(torch.softmax(outputs, dim=1).mean(dim=0), dim=0)
    return torch.argmax(anchor * (outputs + 1.0), dim=1)


def evaluate(model, images, labels, objective: str, batch_size: int, mean=None, std=None) -> float:
    """Test accuracy (%) over the whole test set in its stored order, in batches of ``batch_size`` under
    ``torch.no_grad()``: argmax for "ce", ``released_predict`` (each test batch's own anchor) for "oat"."""
    import torch

    model.eval()
    correct = 0
    if mean is not None:  # moved to the device once, not at every batch
        mean, std = _channel_tensors(mean, std, images.device)
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            outputs = model(normalise(images[start:start + batch_size], mean, std))
            predicted = torch.argmax(outputs, dim=1) if objective == "ce" else released_predict(outputs)
            # Summed on the device and read once at the end: a read per batch would wait for each on a GPU.
            correct = correct + (predicted == labels[start:start + batch_size]).sum()
    model.train()
    return 100.0 * int(correct) / len(labels)


def random_batch(batch_size: int, channels: int, height: int, width: int, num_classes: int, seed: int = 0,
                 device: str = "cpu"):
    import torch
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (batch_size, channels, height, width), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, num_classes, batch_size).astype(np.int64))
    return images.to(device), labels.to(device)


def time_train_steps(objective: str, image_shape, batch_size: int, num_classes: int, steps: int, repeats: int,
                     device: str = "cpu") -> dict:
    """ms per ``make_train_step`` step of the lightweight CNN on one random batch (median, min, max over
    ``repeats`` runs of ``steps`` steps, after ten to warm up); each run ends by reading the loss, which waits
    for the device."""
    import torch
    from benchmarks import common
    height, width, channels = image_shape
    images, labels = random_batch(batch_size, channels, height, width, num_classes, device=device)
    torch.manual_seed(0)
    model = lightweight_cnn(channels, height, width, num_classes).to(device)
    step = make_train_step(model, objective)

    def run_steps(count):
        for _ in range(count):
            loss = step(images, labels)
        loss.item()

    run_steps(10)
    return common.scaled(common.timed_repeats(lambda: run_steps(steps), repeats), 1e3 / steps)


# The epoch workload of benchmarks.epoch_time (kept here so that running this module needs no JAX).
BATCH_SIZE = EVAL_BATCH_SIZE = 32
LEARNING_RATE, MOMENTUM = 0.001, 0.9


def time_epochs(dataset, objective: str, epochs: int, device: str, seed: int = 0) -> dict:
    """Whole epochs (training pass, then evaluation of the test set) of one objective on an
    ``oat_jax.data.Dataset``: seconds of each, the steady ones' (2..N) spread, and the accuracies."""
    import torch
    from benchmarks import common
    from oat_jax import input_pipeline
    mean, std = input_pipeline.channel_statistics(dataset.train_images)
    train = to_tensors(dataset.train_images, dataset.train_labels, device)
    test = to_tensors(dataset.test_images, dataset.test_labels, device)
    torch.manual_seed(seed)
    height, width, channels = dataset.train_images.shape[1:]
    model = lightweight_cnn(channels, height, width, dataset.num_classes).to(device)
    step = make_train_step(model, objective, LEARNING_RATE, MOMENTUM, mean, std)
    record = {"epoch_s": [], "train_s": [], "eval_s": [], "test_accuracy": []}
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        train_epoch(step, *train, BATCH_SIZE, seed, epoch)  # ends by reading the loss
        trained = time.perf_counter()
        record["test_accuracy"].append(evaluate(model, *test, objective, EVAL_BATCH_SIZE, mean, std))
        ended = time.perf_counter()
        record["epoch_s"].append(ended - started)
        record["train_s"].append(trained - started)
        record["eval_s"].append(ended - trained)
    if epochs > 1:
        record["steady_epoch_s"] = common.spread(record["epoch_s"][1:])
        record["steady_train_s"] = common.spread(record["train_s"][1:])
        record["train_samples_per_s"] = len(dataset.train_labels) / record["steady_train_s"]["median"]
    return record


def _parse():
    from benchmarks import common
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=common.HelpFormatter)
    parser.add_argument("--device", default="auto", choices=DEVICES, help="auto = CUDA where PyTorch sees a GPU")
    parser.add_argument("--image-shape", default="32,32,3", help="H,W,C of the random batch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100, help="steps per timed repetition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dataset", default="fashion_mnist", help="whose epochs are timed; '' = none")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per objective; 2..N are the steady ones")
    parser.add_argument("--train-limit", type=int, default=0, help="first N training samples (0 = all)")
    parser.add_argument("--test-limit", type=int, default=0, help="first N test samples (0 = all)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    args.image_shape = common.image_shape(parser, args.image_shape)
    return args


def main():
    import datetime
    import platform
    from benchmarks import common
    args = _parse()
    if not available():  # this benchmark is PyTorch alone: nothing to skip to
        raise SystemExit(f"error: this benchmark times PyTorch, which is not installed "
                         f"(to get it: {common.TORCH_HINT})")
    device = resolve_device(args.device)
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but PyTorch sees no CUDA device")
    result = {"benchmark": "torch_reference", "torch": device_description(device),
              "environment": {"python": platform.python_version(),
                              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
              "setup": {"image_shape": list(args.image_shape), "batch_size": args.batch_size,
                        "num_classes": args.num_classes, "steps": args.steps, "repeats": args.repeats,
                        "dataset": args.dataset, "epochs": args.epochs, "train_limit": args.train_limit,
                        "test_limit": args.test_limit, "epoch_batch_size": BATCH_SIZE,
                        "learning_rate": LEARNING_RATE, "momentum": MOMENTUM},
              "train_ms": {objective: time_train_steps(objective, args.image_shape, args.batch_size,
                                                       args.num_classes, args.steps, args.repeats, device)
                           for objective in ("ce", "oat")}}
    result["oat_over_ce_train"] = common.ratio(result["train_ms"]["oat"], result["train_ms"]["ce"])
    if args.dataset:
        from oat_jax import data
        try:
            dataset = data.load_dataset(args.dataset, "", args.train_limit, args.test_limit)
        except data.DatasetError as error:
            result["epochs_skipped"] = str(error)
        else:
            result["epochs"] = {"dataset": args.dataset, "train_samples": len(dataset.train_labels),
                                "test_samples": len(dataset.test_labels),
                                "arms": {objective: time_epochs(dataset, objective, args.epochs, device)
                                         for objective in ("ce", "oat")}}
    result["peak_rss_mb"] = common.peak_rss_mb()
    common.emit(result, args.out)


if __name__ == "__main__":
    main()
