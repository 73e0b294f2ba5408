"""fold-constants and eliminate-dead-nodes: weights computed in the graph become initializers, outputs stay equal."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.frontend import Model, UsageError, annotation, from_proto
from bitpass.passes.cleanup import EliminateDeadNodes, FoldConstants
from bitpass.passes.infra import PRESERVE_ALL, PassContext
from bitpass.passes.instruments import verify

RNG = np.random.default_rng(0)


def run_ort(model: Model, x: np.ndarray) -> np.ndarray:
    """The model's first output in ONNX Runtime with its own graph optimizations off (we test ours, not ORT's)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.to_bytes(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def array(name: str, values: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values), name)


def computed_weight(name: str, shape: list[int]) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``name = ConstantOfShape(shape) * scale + shift``: a non-trivial weight computed in the graph."""
    scale = RNG.normal(size=[1, *shape[1:]]).astype(np.float32)
    shift = RNG.normal(size=[shape[0]] + [1] * (len(shape) - 1)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], [f"{name}_shape"], value=array("s", np.array(shape, np.int64))),
        helper.make_node("ConstantOfShape", [f"{name}_shape"], [f"{name}_ones"], value=array("v", np.ones(1, np.float32))),
        helper.make_node("Mul", [f"{name}_ones", f"{name}_scale"], [f"{name}_scaled"]),
        helper.make_node("Add", [f"{name}_scaled", f"{name}_shift"], [name]),
    ]
    return nodes, [array(f"{name}_scale", scale), array(f"{name}_shift", shift)]


def computed_weights_model(opset: int) -> onnx.ModelProto:
    """Conv (ConstantOfShape weight) -> Flatten -> MatMul whose weight is Transpose(Reshape(Cast(float64 Constant)))."""
    conv_nodes, conv_inits = computed_weight("conv_w", [4, 1, 3, 3])
    raw = RNG.normal(size=(10 * 4 * 4 * 4,)).astype(np.float64)  # Cast + Reshape + Transpose of a constant
    fc_nodes = [
        helper.make_node("Constant", [], ["fc_raw"], value=array("r", raw)),
        helper.make_node("Cast", ["fc_raw"], ["fc_f32"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["fc_f32", "fc_shape"], ["fc_t"]),
        helper.make_node("Transpose", ["fc_t"], ["fc_w"], perm=[1, 0]),
    ]
    nodes = [*conv_nodes, *fc_nodes,
             helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("MatMul", ["f", "fc_w"], ["y"])]
    graph = helper.make_graph(
        nodes, "computed_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])],
        [*conv_inits, array("fc_shape", np.array([10, 64], np.int64))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


X = RNG.random((2, 1, 4, 4), dtype=np.float32)


@pytest.mark.parametrize("opset", [9, 11])
def test_fold_constants_turns_computed_weights_into_initializers(opset: int) -> None:
    model = from_proto(computed_weights_model(opset))
    assert model.opset == 17 and model.layers() == []  # upgraded; no layer has a constant weight yet
    before = run_ort(model, X)

    result = FoldConstants().run(model, PassContext())

    assert result.modified and result.model is model and result.preserved == frozenset()
    assert [n.op_type for n in model.graph] == ["Conv", "Relu", "Flatten", "MatMul"]
    for layer in model.layers():
        assert layer.weight.is_initializer()
    assert [layer.op_type for layer in model.layers()] == ["Conv", "MatMul"]  # ids assigned once constant
    assert model.layer(model.layers()[1].id).weight_shape == (64, 10)
    verify(model)
    np.testing.assert_allclose(run_ort(model, X), before, rtol=1e-3, atol=1e-5)


def test_fold_constants_size_limit_keeps_large_results_computed() -> None:
    model = from_proto(computed_weights_model(17))
    before = run_ort(model, X)

    FoldConstants(max_elements=100).run(model, PassContext())

    ops = [n.op_type for n in model.graph]
    assert "ConstantOfShape" not in ops  # 36 elements: folded
    assert "Transpose" in ops  # 640 elements: over the limit, still computed
    np.testing.assert_allclose(run_ort(model, X), before, rtol=1e-3, atol=1e-5)


def test_fold_constants_can_leave_constant_of_shape() -> None:
    model = from_proto(computed_weights_model(17))
    FoldConstants(constant_of_shape=False).run(model, PassContext())
    assert "ConstantOfShape" in [n.op_type for n in model.graph]


def test_fold_constants_on_a_folded_model_changes_nothing() -> None:
    model = from_proto(computed_weights_model(17))
    FoldConstants().run(model, PassContext())
    result = FoldConstants().run(model, PassContext())
    assert not result.modified and result.preserved is PRESERVE_ALL


def test_fold_constants_rejects_unknown_options() -> None:
    with pytest.raises(UsageError, match="unknown option 'limit'.*max_elements"):
        FoldConstants(limit=3)


def dead_code_model() -> onnx.ModelProto:
    """y = Relu(Identity(x) @ W); a dangling Sigmoid branch, an unused initializer."""
    nodes = [
        helper.make_node("Identity", ["x"], ["x_id"]),
        helper.make_node("MatMul", ["x_id", "W"], ["m"]),
        helper.make_node("Sigmoid", ["m"], ["dangling"]),
        helper.make_node("Relu", ["m"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "dead",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [array("W", RNG.normal(size=(8, 4)).astype(np.float32)), array("unused", np.zeros(5, np.float32))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_eliminate_dead_nodes_removes_identity_dangling_nodes_and_initializers() -> None:
    model = from_proto(dead_code_model())
    annotation.set_weight_bits(model.layers()[0].node, 4)
    x = RNG.random((3, 8), dtype=np.float32)
    before = run_ort(model, x)

    result = EliminateDeadNodes().run(model, PassContext())

    assert result.modified and result.preserved == frozenset()
    assert [n.op_type for n in model.graph] == ["MatMul", "Relu"]
    assert list(model.graph.initializers) == ["W"]
    assert [o.name for o in model.graph.outputs] == ["y"]  # the signature is kept
    assert annotation.weight_bits(model.layers()[0].node) == 4
    np.testing.assert_allclose(run_ort(model, x), before, rtol=1e-3, atol=1e-5)
    assert not EliminateDeadNodes().run(model, PassContext()).modified


def test_eliminate_dead_nodes_can_keep_identities() -> None:
    model = from_proto(dead_code_model())
    EliminateDeadNodes(identities=False).run(model, PassContext())
    assert [n.op_type for n in model.graph] == ["Identity", "MatMul", "Relu"]


# --- subgraphs ------------------------------------------------------------------------------------


def _run_all(model: Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.to_bytes(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def scan_state_and_copy() -> onnx.ModelProto:
    """A Scan whose body returns its state and an Identity copy of it (the copy is the scan output)."""
    info = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_i"], ["s_out"]), helper.make_node("Identity", ["s_out"], ["y_i"])],
        "body", [info("s_in", TensorProto.FLOAT, [3]), info("x_i", TensorProto.FLOAT, [3])],
        [info("s_out", TensorProto.FLOAT, [3]), info("y_i", TensorProto.FLOAT, [3])])
    graph = helper.make_graph([helper.make_node("Scan", ["s0", "x"], ["s", "y"], num_scan_inputs=1, body=body)], "g",
                              [info("x", TensorProto.FLOAT, [4, 3])], [info("y", TensorProto.FLOAT, [4, 3])],
                              [array("s0", np.zeros(3, np.float32))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def branch_returning_an_outer_value() -> onnx.ModelProto:
    info = helper.make_tensor_value_info
    then = helper.make_graph([helper.make_node("Identity", ["m"], ["t"])], "then", [], [info("t", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Neg", ["m"], ["e"])], "else", [], [info("e", TensorProto.FLOAT, [2])])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["m"]),
                               helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
                              [info("x", TensorProto.FLOAT, [2]), info("c", TensorProto.BOOL, [])],
                              [info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_eliminate_dead_nodes_keeps_a_scan_bodys_state_and_its_copy_apart() -> None:
    model = from_proto(scan_state_and_copy())
    feeds = {"x": RNG.standard_normal((4, 3)).astype(np.float32)}
    before = _run_all(model, feeds)
    EliminateDeadNodes().run(model, PassContext())
    verify(model)
    np.testing.assert_array_equal(_run_all(model, feeds)[0], before[0])
    np.testing.assert_allclose(before[0], np.cumsum(feeds["x"], axis=0), rtol=1e-6)


@pytest.mark.parametrize("condition", [True, False])
def test_eliminate_dead_nodes_keeps_a_branch_returning_an_outer_value(condition: bool) -> None:
    model = from_proto(branch_returning_an_outer_value())
    feeds = {"x": np.array([1.5, -2.0], np.float32), "c": np.array(condition)}
    before = _run_all(model, feeds)
    EliminateDeadNodes().run(model, PassContext())
    verify(model)
    np.testing.assert_array_equal(_run_all(model, feeds)[0], before[0])


def test_eliminate_dead_nodes_keeps_an_output_that_copies_another() -> None:
    info = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["b"])], "g",
                              [info("x", TensorProto.FLOAT, [2])],
                              [info("a", TensorProto.FLOAT, [2]), info("b", TensorProto.FLOAT, [2])])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    EliminateDeadNodes().run(model, PassContext())
    assert [v.name for v in model.graph.outputs] == ["a", "b"]
    out = _run_all(model, {"x": np.array([1.0, 2.0], np.float32)})
    np.testing.assert_array_equal(out[0], out[1])


# --- the folding cap ------------------------------------------------------------------------------------


def fold_bomb(shape: list[int]) -> onnx.ModelProto:
    """y = x + ReduceSum(ConstantOfShape(shape)): a few bytes that fold into a tensor of ``shape``."""
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["big"], value=array("v", np.ones(1, np.float32))),
         helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0), helper.make_node("Add", ["x", "s"], ["y"])], "g",
        [info("x", TensorProto.FLOAT, [2])], [info("y", TensorProto.FLOAT, [2])],
        [array("shape", np.array(shape, np.int64))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_folding_never_adds_more_than_the_cap() -> None:
    """256 MiB from a 200-byte model stays computed; the record names the node, the cap and the option."""
    model = from_proto(fold_bomb([4096, 4096, 4]))
    messages: list[str] = []
    ctx = PassContext(progress=messages.append)
    FoldConstants().run(model, ctx)
    assert "ConstantOfShape" in [n.op_type for n in model.graph]
    assert model.weight_bytes() < 1024
    kept = ctx.records["fold-constants"]["kept_computed"]
    assert kept == [{"node": kept[0]["node"], "bytes": 256 << 20}]
    assert any("64.0 MiB" in m and "fold-constants(max_added_bytes=N)" in m for m in messages), messages


def test_folding_within_the_cap_still_folds() -> None:
    model = from_proto(fold_bomb([256, 256]))  # 256 KiB: well under the cap
    x = np.array([1.0, 2.0], np.float32)
    FoldConstants().run(model, PassContext())
    assert "ConstantOfShape" not in [n.op_type for n in model.graph]
    np.testing.assert_allclose(_run_all(model, {"x": x})[0], x + 256 * 256)


def test_the_folding_cap_is_an_option() -> None:
    model = from_proto(fold_bomb([256, 256]))
    ctx = PassContext()
    FoldConstants(max_added_bytes=1000).run(model, ctx)
    assert "ConstantOfShape" in [n.op_type for n in model.graph]
    assert ctx.records["fold-constants"]["max_added_bytes"] == 1000


def test_the_default_cap_is_64_mib_or_the_models_own_weight_bytes() -> None:
    from bitpass.passes.cleanup import DEFAULT_MAX_ADDED_BYTES, folding_budget

    small = from_proto(fold_bomb([2]))
    assert folding_budget(small, None) == DEFAULT_MAX_ADDED_BYTES == 64 << 20
    assert folding_budget(small, 5) == 5
