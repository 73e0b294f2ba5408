"""The project's own small models, trained on data that scikit-learn ships (no downloads).

Used by the bundled example, the tests and the benchmarks. Training is seeded
and takes seconds on two cores.
"""

from __future__ import annotations

import contextlib
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
    with single_thread():  # many tiny kernels: one thread is faster, and the result independent of core count
        _epochs(module, optimizer, x, y, generator, epochs)
    return module.eval()


def _epochs(module, optimizer, x, y, generator, epochs: int) -> None:
    import torch

    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(x[batch]), y[batch])
            loss.backward()
            optimizer.step()


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


# --- a small transformer encoder ----------------------------------------------------------------
#: rows of an 8x8 digit are the tokens: 8 tokens of 8 features
TOKENS, TOKEN_FEATURES = 8, 8


def _transformer_classes():
    """The transformer's module classes (defined lazily: torch is imported only when needed)."""
    import torch
    import torch.nn as nn

    class Attention(nn.Module):
        """Multi-head self-attention written with plain MatMul/Softmax (exports as quantizable MatMul layers)."""

        def __init__(self, dim: int, heads: int) -> None:
            super().__init__()
            self.heads, self.head_dim = heads, dim // heads
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            n, t, d = x.shape
            qkv = self.qkv(x).reshape(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            scores = torch.matmul(q, k.transpose(-2, -1)) * (self.head_dim ** -0.5)
            out = torch.matmul(torch.softmax(scores, dim=-1), v)
            return self.proj(out.transpose(1, 2).reshape(n, t, d))

    class Block(nn.Module):
        """Pre-norm encoder block: x + attn(LN(x)), then x + MLP(LN(x))."""

        def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(dim)
            self.attn = Attention(dim, heads)
            self.norm2 = nn.LayerNorm(dim)
            self.fc1 = nn.Linear(dim, mlp_ratio * dim)
            self.fc2 = nn.Linear(mlp_ratio * dim, dim)

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))

    class TransformerEncoder(nn.Module):
        """Digits as 8 row tokens -> linear embedding + learned positions -> pre-norm blocks -> LN ->
        mean pooling. ``forward`` returns the pooled **embedding** (N, dim): a sentence-embedding-like
        model whose fidelity is measured by cosine. The classification head lives in ``DigitsTransformer``."""

        def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: int = 4) -> None:
            super().__init__()
            self.embed = nn.Linear(TOKEN_FEATURES, dim)
            self.pos = nn.Parameter(torch.zeros(1, TOKENS, dim))
            self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
            self.norm = nn.LayerNorm(dim)

        def forward(self, x):
            tokens = self.embed(x.reshape(x.shape[0], TOKENS, TOKEN_FEATURES)) + self.pos
            for block in self.blocks:
                tokens = block(tokens)
            return self.norm(tokens).mean(dim=1)

    class DigitsTransformer(nn.Module):
        """The encoder with its linear classification head (what is trained; ``encoder`` is what is exported)."""

        def __init__(self, encoder: nn.Module, classes: int = 10) -> None:
            super().__init__()
            self.encoder = encoder
            self.head = nn.Linear(encoder.norm.normalized_shape[0], classes)

        def forward(self, x):
            return self.head(self.encoder(x))

    return TransformerEncoder, DigitsTransformer


def __getattr__(name: str):  # zoo.TransformerEncoder / zoo.DigitsTransformer without importing torch eagerly
    if name in ("TransformerEncoder", "DigitsTransformer"):
        encoder_cls, classifier_cls = _transformer_classes()
        globals().update(TransformerEncoder=encoder_cls, DigitsTransformer=classifier_cls)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def digits_transformer(dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: int = 4):  # -> DigitsTransformer
    """A 2-layer pre-norm transformer encoder over the 8 rows of a digit, with a linear head (~100k params,
    almost all in the Linear layers of attention and MLP)."""
    encoder_cls, classifier_cls = _transformer_classes()
    globals().update(TransformerEncoder=encoder_cls, DigitsTransformer=classifier_cls)
    return classifier_cls(encoder_cls(dim, depth, heads, mlp_ratio))


@contextlib.contextmanager
def single_thread():
    """Run torch on one intra-op thread inside the block (restored after)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def trained_digits_transformer(seed: int = 0, *, epochs: int = 12):
    """(encoder, split): the transformer trained with cross-entropy through its head on the digits split.

    The returned module is the **encoder** (its output is the embedding); the trained classifier,
    head included, is ``encoder.classifier`` (kept out of the module tree, so not exported).
    """
    import torch

    torch.manual_seed(seed)
    split = digits_split(seed)
    model = digits_transformer()
    with single_thread():  # many tiny kernels: one thread is 3-5x faster than two on a loaded 2-core machine
        train(model, split, epochs=epochs, seed=seed, lr=3e-3)
    encoder = model.encoder.eval()
    object.__setattr__(encoder, "classifier", model)  # plain attribute: not a submodule of the encoder
    return encoder, split
