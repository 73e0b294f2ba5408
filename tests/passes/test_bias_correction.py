"""Bias correction: the bias of an int8 layer moves by exactly -(W_q - W) E[x] (Nagel et al., sec. 4.2)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bitpass.frontend import from_arrays, from_proto
from bitpass.passes.bias_correction import correct_biases


def _model(rng: np.random.Generator, trans_b: int = 1) -> onnx.ModelProto:
    """x[N,6] -> Gemm(w, b) -> y[N,3], plus a second Gemm without a bias."""
    w = rng.standard_normal((3, 6) if trans_b else (6, 3)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=trans_b),
             helper.make_node("Gemm", ["y", "w2"], ["z"], name="nobias", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 2])],
                              [numpy_helper.from_array(w, "w"),
                               numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b"),
                               numpy_helper.from_array(rng.standard_normal((2, 3)).astype(np.float32), "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _init(proto: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))


def test_the_bias_moves_by_the_mean_shift_of_the_rounded_weight():
    rng = np.random.default_rng(0)
    proto = _model(rng)
    x = (rng.standard_normal((40, 6)) + 2.0).astype(np.float32)  # a non-zero mean, so the shift is not zero
    data = from_arrays({"x": x}, from_proto(proto, name="g").inputs)
    corrected = correct_biases(proto, ["fc", "nobias"], data)

    w, b = _init(proto, "w").astype(np.float64), _init(proto, "b").astype(np.float64)
    scale = np.abs(w).max(axis=1) / 127
    wq = np.clip(np.round(w / scale[:, None]), -127, 127) * scale[:, None]
    expected = b - (wq - w) @ x.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(_init(corrected, "b"), expected.astype(np.float32), rtol=1e-6, atol=1e-7)
    assert np.abs(_init(corrected, "b") - b).max() > 1e-5  # it really moved
    np.testing.assert_array_equal(_init(corrected, "w"), _init(proto, "w"))  # the weight itself is untouched
    assert [n.name for n in corrected.graph.node] == ["fc", "nobias"]  # nothing else changed


def test_layers_it_cannot_correct_come_back_unchanged():
    rng = np.random.default_rng(1)
    proto = _model(rng, trans_b=0)  # Gemm without transB: the rounding axis is not the output axis
    data = from_arrays({"x": rng.standard_normal((8, 6)).astype(np.float32)}, from_proto(proto, name="g").inputs)
    assert correct_biases(proto, ["fc", "nobias"], data) is proto
