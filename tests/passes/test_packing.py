"""Packed weights: exact round trip, and ONNX Runtime folds the unpacking away at load (fp32 kernels run)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.passes.packing import dequantize_blocked, pack_weight, packed_bytes, quantize_blocked

CASES = [  # op, weight shape, output-channel axis, input shape
    ("Conv", (24, 5, 3, 3), 0, (2, 5, 6, 6)),   # 45 weights per channel: padded to 64
    ("MatMul", (100, 36), 1, (3, 100)),          # channels on axis 1: blocks run along K
    ("Gemm", (36, 96), 0, (3, 96)),              # transB=1: (out, in)
]


def one_layer(op: str, weight: np.ndarray, x_shape: tuple[int, ...], y_shape: list | None = None) -> onnx.ModelProto:
    attrs = {"pads": [1, 1, 1, 1]} if op == "Conv" else {"transB": 1} if op == "Gemm" else {}
    node = helper.make_node(op, ["x", "w"], ["y"], name="layer", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("op, shape, axis, x_shape", CASES)
def test_packed_layer_computes_with_exactly_the_dequantized_weight(op, shape, axis, x_shape, bits, tmp_path):
    rng = np.random.default_rng(bits)
    weight = rng.standard_normal(shape).astype(np.float32)
    model = one_layer(op, weight, x_shape)
    stored = pack_weight(model, model.graph.node[-1], 1, axis, bits, 32)

    moved = np.moveaxis(weight, axis, 0)
    codes, scales = quantize_blocked(moved.reshape(moved.shape[0], -1), bits, 32)
    assert np.abs(codes).max() <= 2 ** (bits - 1) - 1
    expected = np.moveaxis(dequantize_blocked(codes, scales, moved[0].size).reshape(moved.shape), 0, axis)
    reference = one_layer(op, expected.astype(np.float32), x_shape)

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    x = rng.standard_normal(x_shape).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    want = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(got[0], want[0])
    # the unpacking chain is constant: ORT folds it at session start, leaving only the layer itself
    optimized_ops = {n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node}
    assert not optimized_ops & {"BitShift", "Mod", "Cast", "Mul", "Sub", "Slice"}
    assert stored <= packed_bytes(weight.size, shape[axis], bits, 32) + 16
    assert stored < weight.nbytes / 2


def test_the_original_fp32_weight_is_no_longer_stored():
    weight = np.ones((8, 64), np.float32)
    model = one_layer("Gemm", weight, (1, 64), [1, 8])
    pack_weight(model, model.graph.node[-1], 1, 0, 4, 32)
    assert "w" not in {t.name for t in model.graph.initializer}
    onnx.checker.check_model(model)


def test_all_zero_channels_stay_zero():
    codes, scales = quantize_blocked(np.zeros((2, 40)), 4, 32)
    assert not codes.any() and np.isfinite(scales.astype(np.float32)).all()
