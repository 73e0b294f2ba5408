"""``quant_scope``: int8 QDQ quantizes what pays and leaves range-hostile tensors float, saying why.

Real exports of the model-family corpus (fast configs): a BERT-like sentence encoder with learned weights as
``torch.onnx.export(dynamo=False)`` writes it (the attention mask becomes ``Where``/``Add`` chains), and
torchvision ResNet-18."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bitpass.frontend import from_onnx, load_npz
from bitpass.passes.calibrate import activation_ranges
from bitpass.passes.structure import typed_structure
from bitpass.passes.quant_scope import CONVOLUTIONAL, TRANSFORMER, GraphFacts, detect_profile, quant_scope


@pytest.fixture(scope="module")
def sentence_export(family_export):
    return family_export("sentence_embedding", eval_labels=False)


@pytest.fixture(scope="module")
def resnet_export(family_export):
    return family_export("resnet18")


def _facts(path) -> GraphFacts:
    return GraphFacts.from_proto(typed_structure(onnx.load(str(path))))


def test_a_bert_export_is_a_transformer_and_only_weight_layers_are_in_scope(sentence_export):
    path, _ = sentence_export
    facts = _facts(path)
    profile, why = detect_profile(facts)
    assert profile == TRANSFORMER and "LayerNormalization" in why
    scope = quant_scope(facts)
    assert set(scope.op_types) == {"Conv", "ConvTranspose", "Gemm", "MatMul"}
    assert scope.extra_options == {"MatMulConstBOnly": True}
    record = scope.record()
    # the attention products of two activations stay float, named one by one
    products = record["kept_float"]["activation-product"]["nodes"]
    assert products and all(n.endswith(("/MatMul", "/MatMul_1")) and "attention/self" in n for n in products)
    # the mask chain, normalizations and residual sums are out of scope, each op type with its reason
    for op in ("Where", "Softmax", "LayerNormalization", "Add"):
        assert op in record["out_of_scope"], op
        assert record["out_of_scope"][op]["why"]


def test_resnet_keeps_the_int8_chain_through_relu_and_residual_adds(resnet_export):
    path, _ = resnet_export
    facts = _facts(path)
    assert detect_profile(facts)[0] == CONVOLUTIONAL
    scope = quant_scope(facts)
    assert {"Conv", "Relu", "Add", "MaxPool", "Gemm"} <= set(scope.op_types)
    assert not {"LayerNormalization", "Softmax", "Where"} & set(scope.op_types)
    assert scope.kept_float == ()  # nothing on a plain CNN is range-hostile


def _masked_scores_graph() -> onnx.ModelProto:
    """x·W plus an additive attention mask built from an int64 mask input, as exporters write it."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    big = helper.make_tensor("big", TensorProto.FLOAT, [], [-1e9])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["scores"], name="scores"),
        helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Sub", ["one", "mask_f"], ["inverted"], name="invert"),
        helper.make_node("Mul", ["inverted", "big"], ["additive"], name="additive"),
        helper.make_node("Add", ["scores", "additive"], ["masked"], name="apply_mask"),
        helper.make_node("Relu", ["masked"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                                           helper.make_tensor_value_info("mask", TensorProto.INT64, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w, big, one])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_mask_values_and_the_add_that_applies_them_stay_float_even_in_a_convolutional_graph():
    facts = GraphFacts.from_proto(typed_structure(_masked_scores_graph()))
    scope = quant_scope(facts, profile=CONVOLUTIONAL)
    rules = {k.node: k.rule for k in scope.kept_float}
    assert rules == {"additive": "mask-or-index-path", "apply_mask": "reads-mask"}
    assert "scores" not in scope.exclude and "relu" not in scope.exclude


def test_a_node_without_a_calibrated_range_stays_float_instead_of_stopping_the_quantizer():
    facts = GraphFacts.from_proto(typed_structure(_masked_scores_graph()))
    calibrated = {"x", "scores", "masked"}  # "y" (the Relu's output) was never calibrated
    kept = {k.node: k.rule for k in quant_scope(facts, ranges=calibrated, profile=CONVOLUTIONAL).kept_float}
    assert kept["relu"] == "uncalibrated"
    assert "scores" not in kept


def test_default_int8_on_the_real_sentence_encoder_compiles_and_keeps_its_embeddings(sentence_export, tmp_path):
    from bitpass.tools import compile

    path, built = sentence_export
    artifact = compile(str(path), tmp_path / "out", calibration=path.parent / "calib.npz",
                       evaluation=path.parent / "eval.npz", latency=False)
    quantization = artifact.manifest["records"]["quantization"]
    assert quantization["int8_scope"]["profile"] == TRANSFORMER
    int8 = [lid for lid, r in quantization["layers"].items() if r["result"] == "int8-qdq"]
    assert len(int8) == 6 * built.module.encoder.config.num_hidden_layers  # Q, K, V, O, FC1, FC2 per block
    # embedding tables stay float in the transformer profile, and the manifest says why
    assert set(quantization["kept_float"]) == {lid for lid, r in quantization["layers"].items() if r["op"] == "Gather"}
    layers = {r["id"]: r for r in artifact.manifest["layers"]}
    assert all(layers[lid]["bits"]["weight"] == 32 for lid in quantization["kept_float"])
    # fidelity on held-out text: every sample's embedding, not only the mean
    model = from_onnx(path)
    evaluation = load_npz(path.parent / "eval.npz", model.inputs, role="evaluation")
    from bitpass.passes import execution

    reference = execution.predict(model, evaluation)
    got = execution.predict(artifact.path / "model.onnx", evaluation)
    cosines = (reference * got).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(got, axis=1)
    assert cosines.min() >= 0.99, cosines.min()


def test_ranges_computed_on_the_export_cover_every_node_in_scope(sentence_export):
    path, _ = sentence_export
    model = from_onnx(path)
    calibration = load_npz(path.parent / "calib.npz", model.inputs, role="calibration").head(8)
    ranges = activation_ranges(model, calibration)
    scope = quant_scope(GraphFacts.from_proto(typed_structure(model.to_proto())), ranges=ranges.ranges.keys())
    assert not [k for k in scope.kept_float if k.rule == "uncalibrated"]
