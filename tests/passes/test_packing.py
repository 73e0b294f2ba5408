"""Packed weights: exact round trip, and ONNX Runtime folds the unpacking away at load (fp32 kernels run)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.passes.packing import dequantize_blocked, pack_weight, quantize_blocked, stored_bytes

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
    codes_and_scales = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer
                           if t.name.endswith(("_c_codes", "_c_scales")))
    assert stored == codes_and_scales < weight.nbytes / 2


def test_the_original_fp32_weight_is_no_longer_stored():
    weight = np.ones((8, 64), np.float32)
    model = one_layer("Gemm", weight, (1, 64), [1, 8])
    pack_weight(model, model.graph.node[-1], 1, 0, 4, 32)
    assert "w" not in {t.name for t in model.graph.initializer}
    onnx.checker.check_model(model)


def test_all_zero_channels_stay_zero():
    codes, scales = quantize_blocked(np.zeros((2, 40)), 4, 32)
    assert not codes.any() and np.isfinite(scales.astype(np.float32)).all()


@pytest.mark.parametrize("shape,axis", [((16, 1, 3, 3), 0), ((64, 1024), 0), ((10, 64), 1), ((33, 7), 0),
                                        ((5, 3, 2, 2), 1)])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_stored_bytes_are_the_bytes_pack_weight_writes(shape, axis, bits, block_size):
    """Size budgets count ``stored_bytes``: it must equal every byte of every tensor the packed form adds."""
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    node = helper.make_node("Identity", ["w"], ["y"], name="n")
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph)
    pack_weight(proto, proto.graph.node[0], 0, axis, bits, block_size)
    assert "w" not in {t.name for t in proto.graph.initializer}
    assert stored_bytes(shape, axis, bits, block_size) == sum(
        numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)


def test_stored_bytes_of_float_widths_are_the_float_tensor():
    assert stored_bytes((10, 64), 1, 32) == 4 * 640 and stored_bytes((10, 64), 1, 16) == 2 * 640
    with pytest.raises(ValueError, match="packed weights take"):
        stored_bytes((10, 64), 1, 3)


@pytest.mark.parametrize("bits_first, bits_second", [(4, 4), (4, 8)])
def test_a_weight_two_layers_share_is_packed_once_and_runs_before_both(bits_first, bits_second):
    """A detector's head weight read by several layers: packing the later layer first, then the earlier one,
    leaves a valid, topologically sorted graph; packed the same way, the chain (and its bytes) is shared."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
             helper.make_node("MatMul", ["a2", "w"], ["b"], name="second")]
    nodes.insert(1, helper.make_node("Slice", ["a", "s0", "s16", "ax"], ["a_part"], name="slice"))
    nodes.insert(2, helper.make_node("Concat", ["a_part", "a_part"], ["a2"], axis=1, name="widen"))
    consts = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0], np.int64), "s0"),
              numpy_helper.from_array(np.array([8], np.int64), "s16"), numpy_helper.from_array(np.array([1], np.int64), "ax")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 8])], consts)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    def node(name: str) -> onnx.NodeProto:  # looked up after each edit: the graph's node list is rebuilt
        return next(n for n in proto.graph.node if n.name == name)

    later = pack_weight(proto, node("second"), 1, axis=1, bits=bits_second, block_size=16)
    earlier = pack_weight(proto, node("first"), 1, axis=1, bits=bits_first, block_size=16)
    onnx.checker.check_model(proto, full_check=True)
    assert "w" not in {t.name for t in proto.graph.initializer}
    assert later > 0 and (earlier == 0) == (bits_first == bits_second)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    w1 = dequantize_blocked(*quantize_blocked(w.T, bits_first, 16), 16).T
    w2 = dequantize_blocked(*quantize_blocked(w.T, bits_second, 16), 16).T
    a = x @ w1
    np.testing.assert_allclose(got, np.concatenate([a[:, :8], a[:, :8]], axis=1) @ w2, rtol=1e-4, atol=1e-4)
