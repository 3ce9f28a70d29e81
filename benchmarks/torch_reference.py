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


def make_train_step(model, objective: str, learning_rate: float = 0.001, momentum: float = 0.9):
    """One SGD-momentum step on a uint8 NCHW batch. "oat" follows the released code: anchor
    softmax(mean softmax(z)), targets onehot/a - 1 built from z without detaching, MSE."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)

    def step(images, labels):
        optimizer.zero_grad()
        outputs = model(images.float() / 255.0)
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


def random_batch(batch_size: int, channels: int, height: int, width: int, num_classes: int, seed: int = 0):
    import torch
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (batch_size, channels, height, width), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, num_classes, batch_size).astype(np.int64))
    return images, labels
