"""The model zoo: each model trains (seeded, in seconds) to a sane held-out accuracy, exports, and runs
in ONNX Runtime with the same outputs as torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitpass.backends.base import reference_runner
from bitpass.frontend import from_torch
from bitpass.tools import zoo


@pytest.fixture(scope="module")
def transformer(trained_transformer):
    """The session's trained encoder (``zoo.trained_digits_transformer()``, seeded): trained once, not again here."""
    return trained_transformer


def _ort_outputs(module, x: np.ndarray) -> np.ndarray:
    model = from_torch(module, (torch.zeros(1, 1, 8, 8),))
    runner = reference_runner(model)
    return runner.run({runner.input_names[0]: x})[0]


def test_split_is_fixed_and_disjoint():
    a, b = zoo.digits_split(), zoo.digits_split()
    assert np.array_equal(a.eval_x, b.eval_x) and np.array_equal(a.calib_y, b.calib_y)
    assert len(a.train_x) == zoo.TRAIN and len(a.calib_x) == zoo.CALIBRATION
    assert len(a.train_x) + len(a.calib_x) + len(a.eval_x) == 1797
    assert a.train_x.dtype == np.float32 and a.train_x.shape[1:] == (1, 8, 8)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_cnn_and_mlp_are_accurate_and_export_exactly(name, trained_cnn, trained_mlp, digits_split):
    module = {"cnn": trained_cnn, "mlp": trained_mlp}[name]
    assert zoo.accuracy(module, digits_split.eval_x, digits_split.eval_y) >= 0.93
    with torch.no_grad():
        expected = module(torch.from_numpy(digits_split.eval_x)).numpy()
    np.testing.assert_allclose(_ort_outputs(module, digits_split.eval_x), expected, rtol=1e-4, atol=1e-4)


def test_transformer_classifies_held_out_digits(transformer):
    encoder, split = transformer
    assert zoo.accuracy(encoder.classifier, split.eval_x, split.eval_y) >= 0.93
    with torch.no_grad():
        embedding = encoder(torch.from_numpy(split.eval_x[:5]))
    assert tuple(embedding.shape) == (5, 64), "the encoder's output is the pooled embedding"
    assert "classifier" not in dict(encoder.named_modules()), "the head must not be exported with the encoder"


def test_transformer_exports_with_quantizable_linear_layers(transformer):
    encoder, split = transformer
    model = from_torch(encoder, (torch.zeros(1, 1, 8, 8),))
    layers = model.layers()
    # every nn.Linear is a MatMul with a constant weight, named by its module path
    linear = {name for name, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {layer.id for layer in layers} == linear
    assert all(layer.op_type == "MatMul" for layer in layers)
    in_layers = sum(layer.params for layer in layers)
    assert in_layers / sum(p.numel() for p in encoder.parameters()) > 0.95
    assert not any(n.op_type == "MultiHeadAttention" for n in model.graph.all_nodes())
    with torch.no_grad():
        expected = encoder(torch.from_numpy(split.eval_x)).numpy()
    runner = reference_runner(model)
    np.testing.assert_allclose(runner.run({runner.input_names[0]: split.eval_x})[0], expected, rtol=1e-4, atol=1e-4)


def test_transformer_training_is_seeded():
    first, _ = zoo.trained_digits_transformer(epochs=1)
    again, _ = zoo.trained_digits_transformer(epochs=1)
    for (name, p), (_, q) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), name
