"""ONNX Runtime backend."""

from bitpass.backends.onnxruntime.backend import OnnxRuntimeBackend
from bitpass.backends.onnxruntime.runner import OrtRunner

__all__ = ["OnnxRuntimeBackend", "OrtRunner"]
