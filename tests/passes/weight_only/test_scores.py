"""OutputKL: the model's output divergence with one layer's weight replaced, the two-level allocation's score."""

from __future__ import annotations

import numpy as np
import pytest

from bitpass.passes.weight_only.emit import linear_weight
from bitpass.passes.weight_only.grid import rtn
from bitpass.passes.weight_only.scores import OutputKL, mean_kl, stored_layout


def test_output_kl_is_zero_for_the_fp32_weight_and_grows_as_the_codes_narrow(decoder):
    model, _, calibration, _ = decoder
    layers = [layer for layer in model.layers() if layer.op_type == "MatMul"]
    score = OutputKL(model, layers, calibration, samples=4)
    layer = next(layer for layer in layers if layer.id == "transformer.h.0.mlp.c_fc")
    weight = linear_weight(layer)
    assert score(layer, weight) == pytest.approx(0.0, abs=1e-9)
    four, two = score(layer, rtn(weight, 4, 32).dequantize()), score(layer, rtn(weight, 2, 32).dequantize())
    assert 0 < four < two


def test_mean_kl_matches_the_direct_formula_over_blocks():
    rng = np.random.default_rng(0)
    p, q = rng.standard_normal((3, 50, 7)), rng.standard_normal((3, 50, 7))
    lp = p - np.log(np.exp(p).sum(-1, keepdims=True))
    lq = q - np.log(np.exp(q).sum(-1, keepdims=True))
    assert mean_kl(p, q) == pytest.approx(float((np.exp(lp) * (lp - lq)).sum(-1).mean()), rel=1e-9)


def test_a_gemm_weight_goes_back_to_its_stored_layout():
    import onnx

    from bitpass.frontend import from_proto

    w = np.arange(12, dtype=np.float32).reshape(4, 3)  # (N, K) with transB
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, alpha=2.0)], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.numpy_helper.from_array(w, "w")])
    model = from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)]))
    layer = model.layers()[0]
    np.testing.assert_array_equal(stored_layout(layer, linear_weight(layer)), w)
