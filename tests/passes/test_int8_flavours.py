"""Int8 flavours: the U8S8 twin of an S8S8 model is exact, so flavours cost one quantization, not two."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from bitpass.frontend import from_arrays, from_proto
from bitpass.passes.calibrate import activation_ranges
from bitpass.passes.int8_flavours import to_uint8_activations
from bitpass.passes.materialize import QuantizeOptions, materialize


def _run(proto_bytes: bytes, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_shifting_zero_points_gives_exactly_the_uint8_model(cnn_model, calib_arrays, eval_arrays):
    ranges = activation_ranges(cnn_model, from_arrays(calib_arrays, cnn_model.inputs))
    s8 = materialize(cnn_model, ranges=ranges, options=QuantizeOptions(activation_type="int8"))
    u8 = materialize(cnn_model, ranges=ranges, options=QuantizeOptions(activation_type="uint8"))
    twin, moved = to_uint8_activations(s8.to_proto())
    assert moved > 0
    x = eval_arrays["input"][:64]
    np.testing.assert_array_equal(_run(twin.SerializeToString(), x), _run(u8.to_bytes(), x))
    # the same tensors as ORT's own U8S8 model, of the same types: uint8 activations, int8 weights
    u8_types = {t.name: t.data_type for t in u8.to_proto().graph.initializer}
    assert {t.name: t.data_type for t in twin.graph.initializer} == u8_types
    from_proto(twin, name="twin")  # a valid model bitpass reads back


def test_a_model_without_activation_quantization_is_unchanged(cnn_model):
    twin, moved = to_uint8_activations(cnn_model.to_proto())
    assert moved == 0 and twin.SerializeToString() == cnn_model.to_proto().SerializeToString()
