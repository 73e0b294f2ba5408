"""Frontends: import PyTorch modules and ONNX files into bitpass's one graph IR."""

from __future__ import annotations

import os
from typing import Any

import onnx

from bitpass.frontend.data import Dataset, from_arrays, load_npz
from bitpass.frontend.errors import (
    BitpassError,
    DataError,
    ModelLoadError,
    UnsupportedOperatorError,
    UsageError,
)
from bitpass.frontend.layers import Layer
from bitpass.frontend.model import Model, Provenance, TensorSpec
from bitpass.frontend.onnx_import import from_onnx, from_proto
from bitpass.frontend.torch_import import from_torch

__all__ = [
    "BitpassError", "DataError", "Dataset", "Layer", "Model", "ModelLoadError", "Provenance", "TensorSpec",
    "UnsupportedOperatorError", "UsageError", "from_arrays", "from_onnx", "from_proto", "from_torch",
    "load_model", "load_npz",
]


def load_model(source: Any, example_inputs: Any = None) -> Model:
    """Any supported model source -> ``Model``: a path, a ModelProto, an nn.Module or a Model."""
    if isinstance(source, Model):
        return source
    if isinstance(source, (str, os.PathLike)):
        return from_onnx(source)
    if isinstance(source, onnx.ModelProto):
        return from_proto(source)
    module_type = type(source).__module__
    if module_type.startswith("torch") or hasattr(source, "named_parameters"):
        if example_inputs is None:
            raise UsageError("a torch module needs example_inputs (one tensor per forward() argument)")
        return from_torch(source, example_inputs)
    raise UsageError(f"cannot compile a {type(source).__name__}: give an ONNX path, a ModelProto or an nn.Module")
