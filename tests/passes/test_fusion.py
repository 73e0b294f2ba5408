"""Fusion passes and the ``optimize`` pipeline: fewer nodes, equal outputs, annotations kept by bitpass's policy."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.frontend import Model, annotation, from_proto
from bitpass.passes.cleanup import FoldConstants
from bitpass.passes.fusion import Fuse, FuseActivations, FuseBatchNorm, GemmToMatMulAdd, MatMulAddToGemm
from bitpass.passes.infra import PRESERVE_ALL, PassContext
from bitpass.passes.instruments import verify
from bitpass.plugins.registry import default_registry

RNG = np.random.default_rng(0)
DIGITS = RNG.random((6, 1, 8, 8), dtype=np.float32)


def run_ort(model: Model, x: np.ndarray) -> np.ndarray:
    """The model's first output in ONNX Runtime with its own graph optimizations off (we test ours, not ORT's)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.to_bytes(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def assert_same_outputs(model: Model, x: np.ndarray, before: np.ndarray) -> None:
    verify(model)
    np.testing.assert_allclose(run_ort(model, x), before, rtol=1e-3, atol=1e-5)


def ops(model: Model) -> list[str]:
    return [n.op_type for n in model.graph]


def layer_annotations(model: Model) -> dict[str, dict]:
    return {layer.id: annotation.all_of(layer.node) for layer in model.layers()}


def annotate_all(model: Model) -> None:
    """Give every layer bits, sparsity and a sensitivity, as later passes would."""
    for i, layer in enumerate(model.layers()):
        annotation.set_weight_bits(layer.node, 4)
        annotation.set_activation_bits(layer.node, 8)
        annotation.set_sparsity(layer.node, 0.25)
        annotation.set_sensitivity(layer.node, "hutchinson", float(i + 1))


# --- hand-built models, old opsets, weights computed by ConstantOfShape ------

def array(name: str, values: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values), name)


def computed(name: str, shape: list[int], init: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """Nodes computing ``name = ConstantOfShape(shape) * scale + shift``; appends the factors to ``init``."""
    scale = RNG.uniform(0.5, 1.5, size=[1, *shape[1:]]).astype(np.float32)
    shift = RNG.normal(scale=0.3, size=[shape[0]] + [1] * (len(shape) - 1)).astype(np.float32)
    init += [array(f"{name}_scale", scale), array(f"{name}_shift", shift)]
    return [
        helper.make_node("Constant", [], [f"{name}_shape"], value=array("s", np.array(shape, np.int64))),
        helper.make_node("ConstantOfShape", [f"{name}_shape"], [f"{name}_ones"],
                         value=array("v", np.ones(1, np.float32))),
        helper.make_node("Mul", [f"{name}_ones", f"{name}_scale"], [f"{name}_scaled"]),
        helper.make_node("Add", [f"{name}_scaled", f"{name}_shift"], [name]),
    ]


def batchnorm(x: str, y: str, channels: int, init: list[onnx.TensorProto]) -> onnx.NodeProto:
    init += [array(f"{y}_gamma", RNG.uniform(0.5, 2, channels).astype(np.float32)),
             array(f"{y}_beta", RNG.normal(size=channels).astype(np.float32)),
             array(f"{y}_mean", RNG.normal(size=channels).astype(np.float32)),
             array(f"{y}_var", RNG.uniform(0.5, 2, channels).astype(np.float32))]
    return helper.make_node("BatchNormalization", [x, f"{y}_gamma", f"{y}_beta", f"{y}_mean", f"{y}_var"], [y])


def old_cnn(opset: int) -> onnx.ModelProto:
    """Pad -> Conv -> BN -> Relu -> Clip -> Conv -> BN -> Relu -> Relu -> Flatten -> MatMul + Add, at ``opset``.

    Clip and Pad use the attribute forms of opset 9 when ``opset < 11``; the
    version converter rewrites them to inputs on import.
    """
    init: list[onnx.TensorProto] = []
    nodes = [*computed("c1_w", [8, 1, 3, 3], init), *computed("c2_w", [8, 8, 3, 3], init),
             *computed("fc_w", [8 * 8 * 8, 10], init)]
    if opset < 11:
        nodes.append(helper.make_node("Pad", ["x"], ["p"], pads=[0, 0, 1, 1, 0, 0, 1, 1]))
        clip = helper.make_node("Clip", ["r1"], ["k1"], min=0.0, max=6.0)
    else:
        init += [array("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), array("lo", np.float32(0)),
                 array("hi", np.float32(6))]
        nodes.append(helper.make_node("Pad", ["x", "pads"], ["p"]))
        clip = helper.make_node("Clip", ["r1", "lo", "hi"], ["k1"])
    init.append(array("fc_b", RNG.normal(size=10).astype(np.float32)))
    nodes += [
        helper.make_node("Conv", ["p", "c1_w"], ["c1"]),
        batchnorm("c1", "b1", 8, init),
        helper.make_node("Relu", ["b1"], ["r1"]),
        clip,
        helper.make_node("Conv", ["k1", "c2_w"], ["c2"], pads=[1, 1, 1, 1]),
        batchnorm("c2", "b2", 8, init),
        helper.make_node("Relu", ["b2"], ["r2"]),
        helper.make_node("Relu", ["r2"], ["r3"]),
        helper.make_node("Flatten", ["r3"], ["f"]),
        helper.make_node("MatMul", ["f", "fc_w"], ["m"]),
        helper.make_node("Add", ["fc_b", "m"], ["y"]),  # bias first: the commuted pattern
    ]
    graph = helper.make_graph(nodes, f"cnn_opset{opset}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def old_mlp(opset: int) -> onnx.ModelProto:
    """Flatten -> Gemm(transB) -> BN -> Relu -> Gemm(alpha, beta), weights from ConstantOfShape."""
    init: list[onnx.TensorProto] = [array("b1", RNG.normal(size=32).astype(np.float32)),
                                    array("b2", RNG.normal(size=10).astype(np.float32))]
    nodes = [*computed("w1", [32, 64], init), *computed("w2", [32, 10], init),
             helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["g1"], transB=1),
             batchnorm("g1", "n1", 32, init),
             helper.make_node("Relu", ["n1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["y"], alpha=0.5, beta=2.0)]
    graph = helper.make_graph(nodes, f"mlp_opset{opset}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def optimize(model: Model) -> Model:
    return default_registry().pipeline("optimize").run(model, PassContext())


# --- the optimize pipeline ----------------------------------------------------

def test_optimize_is_fold_eliminate_fuse() -> None:
    assert default_registry().pipeline("optimize").spec() == (
        "fold-constants,eliminate-dead-nodes,fuse,"
        "fuse-transformer(attention=true,embed_layer_norm=true,session_fusions=true)")


@pytest.mark.parametrize("fixture", ["cnn_model", "mlp_model"])
def test_optimize_keeps_outputs_of_trained_torch_models(fixture: str, request: pytest.FixtureRequest) -> None:
    model: Model = request.getfixturevalue(fixture)
    annotate_all(model)
    before, annotations, nodes = run_ort(model, DIGITS), layer_annotations(model), len(model.graph)

    out = optimize(model)

    assert out is model and "BatchNormalization" not in ops(model)
    assert len(model.graph) < nodes
    assert layer_annotations(model) == annotations  # ids, bits, sparsity, sensitivity: all kept
    assert_same_outputs(model, DIGITS, before)


@pytest.mark.parametrize("opset", [9, 11])
def test_optimize_old_opset_cnn_with_computed_weights(opset: int) -> None:
    model = from_proto(old_cnn(opset))
    before = run_ort(model, DIGITS)

    optimize(model)

    assert ops(model) == ["Conv", "Clip", "Conv", "Relu", "Flatten", "Gemm"]
    assert [layer.op_type for layer in model.layers()] == ["Conv", "Conv", "Gemm"]
    assert all(layer.weight.is_initializer() for layer in model.layers())
    assert_same_outputs(model, DIGITS, before)


@pytest.mark.parametrize("opset", [9, 11])
def test_optimize_old_opset_mlp_folds_batchnorm_into_gemm(opset: int) -> None:
    model = from_proto(old_mlp(opset))
    before = run_ort(model, DIGITS)

    optimize(model)

    assert ops(model) == ["Flatten", "Gemm", "Relu", "Gemm"]
    assert_same_outputs(model, DIGITS, before)


# --- each fusion on its own ---------------------------------------------------

def test_fuse_batchnorm_on_the_cnn_keeps_conv_layer_ids(cnn_model: Model) -> None:
    annotate_all(cnn_model)
    before, annotations = run_ort(cnn_model, DIGITS), layer_annotations(cnn_model)
    conv_ids = [layer.id for layer in cnn_model.layers() if layer.op_type == "Conv"]

    result = FuseBatchNorm().run(cnn_model, PassContext())

    assert result.modified and result.preserved == frozenset()
    assert "BatchNormalization" not in ops(cnn_model)
    assert len(cnn_model.graph) == len(ops(cnn_model)) and ops(cnn_model).count("Conv") == 3
    assert [layer.id for layer in cnn_model.layers() if layer.op_type == "Conv"] == conv_ids
    assert layer_annotations(cnn_model) == annotations
    assert_same_outputs(cnn_model, DIGITS, before)


def test_fusion_merges_annotations_by_policy(cnn_model: Model) -> None:
    """If the BN carried annotations too: bits take the max, sensitivities add, the Conv's id wins."""
    conv = cnn_model.layers()[0].node
    annotation.set_weight_bits(conv, 4)
    annotation.set_sensitivity(conv, "fisher", 1.5)
    bn = next(n for n in cnn_model.graph if n.op_type == "BatchNormalization")
    annotation.set_layer_id(bn, "bn-not-a-layer")
    annotation.set_weight_bits(bn, 8)
    annotation.set_sensitivity(bn, "fisher", 2.0)

    FuseBatchNorm().run(cnn_model, PassContext())

    fused = cnn_model.layers()[0].node
    assert annotation.layer_id(fused) == annotation.layer_id(conv)
    assert annotation.weight_bits(fused) == 8
    assert annotation.sensitivity(fused, "fisher") == pytest.approx(3.5)


def test_gemm_to_matmul_add_and_back_on_the_mlp(mlp_model: Model) -> None:
    annotate_all(mlp_model)
    before, annotations = run_ort(mlp_model, DIGITS), layer_annotations(mlp_model)

    GemmToMatMulAdd().run(mlp_model, PassContext())

    assert "Gemm" not in ops(mlp_model) and ops(mlp_model).count("MatMul") == 3
    assert layer_annotations(mlp_model) == annotations  # the ids moved to the MatMuls...
    adds = [n for n in mlp_model.graph if n.op_type == "Add"]
    assert len(adds) == 3 and all(annotation.all_of(n) == {} for n in adds)  # ...and not to the Adds
    assert_same_outputs(mlp_model, DIGITS, before)

    MatMulAddToGemm().run(mlp_model, PassContext())

    assert ops(mlp_model).count("Gemm") == 3 and "MatMul" not in ops(mlp_model)
    assert layer_annotations(mlp_model) == annotations
    assert_same_outputs(mlp_model, DIGITS, before)


def gemm_model(**attributes: float | int) -> onnx.ModelProto:
    a_shape = [6, 5] if attributes.get("transA") else [5, 6]
    b_shape = [4, 6] if attributes.get("transB") else [6, 4]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["a", "B", "C"], ["y"], **attributes)], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, a_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 4])],
        [array("B", RNG.normal(size=b_shape).astype(np.float32)), array("C", RNG.normal(size=[4]).astype(np.float32))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("attributes", [{}, {"transB": 1, "alpha": 0.5, "beta": 3.0}])
def test_gemm_to_matmul_add_folds_gemm_attributes(attributes: dict) -> None:
    model = from_proto(gemm_model(**attributes))
    a = RNG.random((5, 6), dtype=np.float32)
    before, layer_id = run_ort(model, a), model.layers()[0].id

    GemmToMatMulAdd().run(model, PassContext())

    assert ops(model) == ["MatMul", "Add"]
    assert [(layer.op_type, layer.id) for layer in model.layers()] == [("MatMul", layer_id)]
    assert_same_outputs(model, a, before)


def test_gemm_to_matmul_add_with_transposed_input_names_the_new_layer() -> None:
    """A Gemm with transA is no quantizable unit; its MatMul replacement is, and gets an id."""
    model = from_proto(gemm_model(transA=1, beta=0.0))
    a = RNG.random((6, 5), dtype=np.float32)
    before = run_ort(model, a)
    assert model.layers() == []

    GemmToMatMulAdd().run(model, PassContext())

    assert ops(model) == ["Transpose", "MatMul"]  # beta=0: no Add
    assert [layer.op_type for layer in model.layers()] == ["MatMul"]
    assert_same_outputs(model, a, before)


def test_gemm_to_matmul_add_with_a_shared_weight() -> None:
    """Three Gemms reading one transposed weight: every MatMul gets a registered initializer."""
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["g0"], transB=1),
             helper.make_node("Gemm", ["g0", "W", "C"], ["g1"], transB=1, beta=2.0),
             helper.make_node("Gemm", ["g1", "W"], ["y"], transB=1, alpha=0.5)]
    graph = helper.make_graph(
        nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [array("W", RNG.normal(size=(4, 4)).astype(np.float32)), array("C", RNG.normal(size=4).astype(np.float32))])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = RNG.random((3, 4), dtype=np.float32)
    before = run_ort(model, x)

    GemmToMatMulAdd().run(model, PassContext())

    assert ops(model) == ["MatMul", "Add", "MatMul", "Add", "MatMul"]
    assert len({layer.weight.name for layer in model.layers()}) == 3
    assert len({layer.id for layer in model.layers()}) == 3
    assert_same_outputs(model, x, before)


def test_matmul_add_to_gemm_with_transposed_weight() -> None:
    """Add(MatMul(x, Transpose(W)), b) -> Gemm(x, W, b, transB=1)."""
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "Wt"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [array("W", RNG.normal(size=(4, 6)).astype(np.float32)), array("b", RNG.normal(size=4).astype(np.float32))])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = RNG.random((3, 6), dtype=np.float32)
    before = run_ort(model, x)

    MatMulAddToGemm().run(model, PassContext())

    assert ops(model) == ["Gemm"] and model.graph.node(0).attributes.get_int("transB") == 1
    assert model.layers()[0].op_type == "Gemm"
    assert_same_outputs(model, x, before)


def test_matmul_add_to_gemm_leaves_batched_matmul() -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])], "bmm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])],
        [array("W", np.ones((6, 4), np.float32)), array("b", np.ones(4, np.float32))])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    result = MatMulAddToGemm().run(model, PassContext())
    assert not result.modified and result.preserved is PRESERVE_ALL and ops(model) == ["MatMul", "Add"]


def test_fuse_activations_collapses_chains_and_pads() -> None:
    model = from_proto(old_cnn(11))
    FoldConstants().run(model, PassContext())
    FuseBatchNorm().run(model, PassContext())  # leaves Relu -> Clip, Relu -> Relu and Pad -> Conv
    annotate_all(model)
    before, annotations = run_ort(model, DIGITS), layer_annotations(model)
    assert ops(model).count("Relu") == 3 and "Pad" in ops(model)

    result = FuseActivations().run(model, PassContext())

    assert result.modified
    assert ops(model) == ["Conv", "Clip", "Conv", "Relu", "Flatten", "MatMul", "Add"]
    assert layer_annotations(model) == annotations
    assert_same_outputs(model, DIGITS, before)


def test_fuse_options_select_rule_groups(cnn_model: Model) -> None:
    result = Fuse(batchnorm=False, matmul_add=False).run(cnn_model, PassContext())
    assert not result.modified and "BatchNormalization" in ops(cnn_model)
    assert Fuse(activations=False).spec() == "fuse(activations=false)"


def test_fusing_leaves_no_reference_to_the_graph_in_the_module_level_rules(_cnn_proto) -> None:
    """onnxscript's matchers kept the last graph they matched, and with it every weight, for the life of the
    process: a model that went through ``fuse`` and was then dropped must go, weights and all."""
    import gc
    import weakref

    model = from_proto(_cnn_proto, name="digits_cnn", kind="torch")
    assert FuseBatchNorm().run(model, PassContext()).modified  # the rules matched this graph
    graph = weakref.ref(model.graph)
    del model
    gc.collect()
    assert graph() is None
