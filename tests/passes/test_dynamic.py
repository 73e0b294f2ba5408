"""Dynamic int8 layers (``bitpass.passes.dynamic``): what ORT's ``quantize_dynamic`` writes, one activation
quantization shared by the layers that read it."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bitpass.passes import dynamic


def _projections() -> onnx.ModelProto:
    """x -> LayerNorm -> three projections (MatMul, MatMul, Gemm with bias) summed, like a transformer's Q/K/V,
    plus a fourth MatMul on another activation."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), f"w{i}") for i in range(4)]
    inits += [numpy_helper.from_array(np.ones(16, np.float32), "gamma"),
              numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "bias")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma"], ["h"], name="norm", axis=-1),
             helper.make_node("MatMul", ["h", "w0"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["h", "w1"], ["k"], name="k_proj"),
             helper.make_node("Gemm", ["h", "w2", "bias"], ["v"], name="v_proj"),
             helper.make_node("Sum", ["q", "k", "v"], ["s"], name="sum"),
             helper.make_node("Relu", ["s"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w3"], ["y"], name="out_proj")]
    graph = helper.make_graph(nodes, "projections", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray, optimized_path=None) -> np.ndarray:
    options = ort.SessionOptions()
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_layers_reading_one_activation_quantize_it_once_with_the_same_outputs(tmp_path):
    fp32 = _projections()
    layers = ["out_proj", "v_proj", "q_proj", "k_proj"]  # any order: they are rewritten in graph order
    shared = copy.deepcopy(fp32)
    outputs = dynamic.quantize_layers(shared, layers)
    per_layer = copy.deepcopy(fp32)
    for name in layers:
        dynamic.quantize_layer(per_layer, name)

    assert sorted(outputs.values()) == sorted(layers)
    assert Counter(n.op_type for n in shared.graph.node)["DynamicQuantizeLinear"] == 2  # h once, r once
    assert Counter(n.op_type for n in per_layer.graph.node)["DynamicQuantizeLinear"] == 4
    onnx.checker.check_model(shared, full_check=True)
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    got = _run(shared, x, tmp_path / "optimized.onnx")
    np.testing.assert_array_equal(got, _run(per_layer, x))
    assert np.abs(got - _run(fp32, x)).max() < 0.05 * np.abs(_run(fp32, x)).max()
    # ORT's session still turns the shared chain into its integer-to-float kernels
    optimized = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert optimized["MatMulInteger"] == 0
    assert optimized["MatMulIntegerToFloat"] + optimized["DynamicQuantizeMatMul"] == 4
