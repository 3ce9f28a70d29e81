"""The same training steps as a plain PyTorch eager loop, written from the paper's equations, so that both
frameworks are timed on identical work. Only the benchmarks import it; PyTorch is optional."""
from __future__ import annotations

import numpy as np


def available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


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
    import torch

    scaled = images.float() / 255.0
    if mean is None:
        return scaled
    mean = torch.as_tensor(np.asarray(mean, np.float32)).view(1, -1, 1, 1)
    std = torch.as_tensor(np.asarray(std, np.float32)).view(1, -1, 1, 1)
    return (scaled - mean) / std


def make_train_step(model, objective: str, learning_rate: float = 0.001, momentum: float = 0.9, mean=None, std=None):
    """One SGD-momentum step on a uint8 NCHW batch. "oat" follows the released code: anchor
    softmax(mean softmax(z)), targets onehot/a - 1 built from z without detaching, MSE. Images are scaled to
    [0, 1], and standardised per channel when ``mean`` and ``std`` are given (see ``normalise``)."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    if mean is not None:  # built once, not at every step
        mean = torch.as_tensor(np.asarray(mean, np.float32)).view(1, -1, 1, 1)
        std = torch.as_tensor(np.asarray(std, np.float32)).view(1, -1, 1, 1)

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


def to_tensors(images: np.ndarray, labels: np.ndarray):
    """A split of an ``oat_jax.data.Dataset`` (uint8 NHWC, int labels) as torch tensors in memory: uint8
    NCHW images and int64 labels, converted once, outside any timing."""
    import torch
    return (torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2))),
            torch.from_numpy(np.asarray(labels).astype(np.int64)))


def train_epoch(step, images, labels, batch_size: int, seed: int, epoch: int) -> float:
    """One pass of ``step`` (``make_train_step``) over the training set in a shuffled order drawn for
    (seed, epoch), in batches of ``batch_size`` (the last one partial, as a DataLoader without drop_last
    gives it). Returns the last batch's loss."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(labels), generator=generator)
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
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            outputs = model(normalise(images[start:start + batch_size], mean, std))
            predicted = torch.argmax(outputs, dim=1) if objective == "ce" else released_predict(outputs)
            correct += int((predicted == labels[start:start + batch_size]).sum())
    model.train()
    return 100.0 * correct / len(labels)


def random_batch(batch_size: int, channels: int, height: int, width: int, num_classes: int, seed: int = 0):
    import torch
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (batch_size, channels, height, width), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, num_classes, batch_size).astype(np.int64))
    return images, labels
