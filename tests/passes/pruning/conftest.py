"""Fixtures for the pruning tests: one torch thread, the data as Datasets, and ORT helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitpass.backends import measure
from bitpass.backends.onnxruntime.runner import OrtRunner
from bitpass.frontend import Model, from_arrays



@pytest.fixture
def calib(cnn_model, calib_arrays):
    return from_arrays(calib_arrays, cnn_model.inputs)


@pytest.fixture
def evaluation(cnn_model, eval_arrays):
    return from_arrays(eval_arrays, cnn_model.inputs, role="evaluation")


def _outputs(model: Model, data) -> np.ndarray:
    """The model's first output over ``data``, run in ONNX Runtime."""
    return measure.predict(OrtRunner.from_bytes(model.to_bytes()), data)[0]


@pytest.fixture
def outputs():
    return _outputs


@pytest.fixture
def accuracy():
    return lambda model, data: measure.accuracy([_outputs(model, data)], data.labels)
