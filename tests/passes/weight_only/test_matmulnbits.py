"""Pre-quantized codes written as ONNX Runtime MatMulNBits nodes compute exactly the dequantized MatMul."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.passes.weight_only.gptq import gptq, hessian
from bitpass.passes.weight_only.grid import rtn
from bitpass.passes.weight_only.lowrank import low_rank_compensation
from bitpass.passes.weight_only.matmulnbits import pack_rows, replace_matmul

K, N = 128, 48


def one_matmul(w: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")
    node.metadata_props.add(key="bitpass.layer_id", value='"fc"')
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3, N])],
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    onnx.checker.check_model(proto)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((K, N)).astype(np.float32), rng.standard_normal((2, 3, K)).astype(np.float32)


def test_packing_puts_the_first_code_in_the_low_bits():
    assert pack_rows(np.array([[1, 2]], np.uint8), 4).tolist() == [[0x21]]
    assert pack_rows(np.array([[1, 2, 3, 0]], np.uint8), 2).tolist() == [[0b00111001]]


@pytest.mark.parametrize("bits", [[2] * 4, [4] * 4, [8] * 4, [2, 4, 8, 4]])
def test_matmulnbits_equals_the_dequantized_weight_at_accuracy_level_0(data, bits):
    w, x = data
    q = rtn(w, np.array(bits), 32)
    proto = one_matmul(w)
    replace_matmul(proto, "fc", q, accuracy_level=0)
    assert "W" not in {t.name for t in proto.graph.initializer}
    np.testing.assert_allclose(run(proto, x), x @ q.dequantize(), atol=2e-5)


def test_gptq_codes_and_a_low_rank_branch_run_in_one_layer(data):
    w, x = data
    q = gptq(w, hessian(np.random.default_rng(1).standard_normal((500, K))), 4, 32)
    a, b = low_rank_compensation(w, q.dequantize(), 4)
    proto = one_matmul(w)
    replace_matmul(proto, "fc", q, accuracy_level=4, lowrank=(a, b))
    reference = x @ (q.dequantize() + a @ b)
    np.testing.assert_allclose(run(proto, x), reference, atol=0.02 * np.abs(reference).max())


def test_three_bit_slices_are_refused_for_matmulnbits(data):
    w, _ = data
    with pytest.raises(ValueError, match="not 3"):
        replace_matmul(one_matmul(w), "fc", rtn(w, 3, 32))
