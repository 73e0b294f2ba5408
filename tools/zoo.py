"""The project's own small models, trained on data that scikit-learn ships (no downloads).

Used by the bundled example, the tests and the benchmarks. Training is seeded
and takes seconds on two cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: sample counts of the fixed split of scikit-learn's 1,797 digits
TRAIN, CALIBRATION = 1100, 200  # the rest (497) is held out for evaluation


@dataclass(frozen=True)
class Split:
    """Digits as float32 images (N, 1, 8, 8) in [0, 1] with int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    calib_x: np.ndarray
    calib_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray


def digits_split(seed: int = 0) -> Split:
    """A fixed shuffle of ``sklearn.datasets.load_digits``: train / calibration / held-out eval."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    a, b = TRAIN, TRAIN + CALIBRATION
    return Split(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:])


def digits_cnn():  # -> torch.nn.Module
    """A small CNN for 8x8 digits: three conv-BN-ReLU blocks and two linear layers (~90k params)."""
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def digits_mlp():  # -> torch.nn.Module
    """A three-layer MLP over the flattened digits (MatMul/Gemm-only model)."""
    import torch.nn as nn

    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def train(module, split: Split, *, epochs: int = 12, seed: int = 0, lr: float = 3e-3):
    """Train ``module`` on ``split.train_*`` with Adam; returns it in eval mode."""
    import torch

    torch.manual_seed(seed)
    x = torch.from_numpy(split.train_x)
    y = torch.from_numpy(split.train_y)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    module.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
    return module.eval()


def accuracy(module, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        return float((module(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def trained_digits_cnn(seed: int = 0):
    """(module, split): the project's CNN trained on the digits split."""
    import torch

    torch.manual_seed(seed)
    split = digits_split(seed)
    return train(digits_cnn(), split, seed=seed), split


def trained_digits_mlp(seed: int = 0):
    import torch

    torch.manual_seed(seed)
    split = digits_split(seed)
    return train(digits_mlp(), split, seed=seed), split
