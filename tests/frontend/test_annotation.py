"""Specification of per-node annotations: typed accessors, persistence, schema check, merge policy."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.frontend import Model, annotation, from_proto


def tiny_model() -> Model:
    """x[1,4] -> MatMul(fc1.weight) -> Relu -> MatMul(fc2.weight) -> y[1,2]."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "fc1.weight")
    w2 = numpy_helper.from_array(rng.standard_normal((3, 2)).astype(np.float32), "fc2.weight")
    nodes = [helper.make_node("MatMul", ["x", "fc1.weight"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "fc2.weight"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w1, w2])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return from_proto(proto, name="tiny")


def reload(model: Model) -> Model:
    return from_proto(onnx.load_from_string(model.to_bytes()), name="reloaded")


def node(model: Model, name: str):
    return next(n for n in model.graph if n.name == name)


# --- typed accessors ------------------------------------------------------------

def test_typed_accessors_round_trip():
    model = tiny_model()
    fc1 = node(model, "fc1")
    annotation.set_weight_bits(fc1, 4)
    annotation.set_activation_bits(fc1, 8)
    annotation.set_sparsity(fc1, 0.5)
    annotation.set_sensitivity(fc1, "hutchinson", 1.25)
    annotation.set_sensitivity(fc1, "fisher", 3)
    assert annotation.weight_bits(fc1) == 4 and isinstance(annotation.weight_bits(fc1), int)
    assert annotation.activation_bits(fc1) == 8
    assert annotation.sparsity(fc1) == 0.5
    assert annotation.sensitivity(fc1, "hutchinson") == 1.25
    assert annotation.sensitivity(fc1, "fisher") == 3.0 and isinstance(annotation.sensitivity(fc1, "fisher"), float)
    assert annotation.sensitivities(fc1) == {"fisher": 3.0, "hutchinson": 1.25}


def test_accessors_coerce_numpy_scalars():
    fc1 = node(tiny_model(), "fc1")
    annotation.set_weight_bits(fc1, np.int64(8))
    annotation.set_sparsity(fc1, np.float32(0.25))
    assert annotation.weight_bits(fc1) == 8 and annotation.sparsity(fc1) == 0.25


def test_unset_annotations_read_as_none():
    relu = node(tiny_model(), "relu")
    assert annotation.weight_bits(relu) is None and annotation.sparsity(relu) is None
    assert annotation.sensitivity(relu, "hutchinson") is None and annotation.sensitivities(relu) == {}
    assert annotation.get(relu, "plugin.anything", default="d") == "d"


def test_values_are_json_under_the_bitpass_prefix():
    fc1 = node(tiny_model(), "fc1")
    annotation.set(fc1, "plugin.stats", {"absmax": 2.5, "channels": [1, 2]})
    assert json.loads(fc1.metadata_props["bitpass.plugin.stats"]) == {"absmax": 2.5, "channels": [1, 2]}
    assert annotation.get(fc1, "plugin.stats") == {"absmax": 2.5, "channels": [1, 2]}
    annotation.delete(fc1, "plugin.stats")
    annotation.delete(fc1, "plugin.stats")  # deleting twice is fine
    assert annotation.get(fc1, "plugin.stats") is None


def test_all_of_lists_only_bitpass_keys():
    fc1 = node(tiny_model(), "fc1")
    fc1.metadata_props["other.tool"] = "x"
    annotation.set_weight_bits(fc1, 8)
    assert annotation.all_of(fc1) == {"layer_id": "fc1", "bits.weight": 8}


def test_layer_ids_are_assigned_at_import_from_weight_names():
    model = tiny_model()
    assert [layer.id for layer in model.layers()] == ["fc1", "fc2"]
    assert annotation.layer_id(node(model, "fc1")) == "fc1"
    assert annotation.layer_id(node(model, "relu")) is None


# --- persistence --------------------------------------------------------------------

def test_annotations_survive_serialization():
    model = tiny_model()
    fc1, fc2 = node(model, "fc1"), node(model, "fc2")
    annotation.set_weight_bits(fc1, 4)
    annotation.set_sensitivity(fc1, "kl", 0.125)
    annotation.set_sparsity(fc2, 0.3)
    annotation.set(fc2, "plugin.weight_absmax", 1.5)
    annotation.set_layer_id(fc2, "head")

    loaded = reload(model)
    fc1, fc2 = node(loaded, "fc1"), node(loaded, "fc2")
    assert annotation.weight_bits(fc1) == 4 and annotation.sensitivity(fc1, "kl") == 0.125
    assert annotation.sparsity(fc2) == 0.3 and annotation.get(fc2, "plugin.weight_absmax") == 1.5
    assert [layer.id for layer in loaded.layers()] == ["fc1", "head"]  # ids are stable, not re-derived
    assert loaded.ir.metadata_props[annotation.SCHEMA_KEY] == str(annotation.SCHEMA_VERSION)
    assert reload(loaded).to_bytes() == loaded.to_bytes()


def test_annotations_are_onnx_node_metadata():
    model = tiny_model()
    annotation.set_weight_bits(node(model, "fc1"), 2)
    proto = onnx.load_from_string(model.to_bytes())
    assert proto.ir_version >= 10
    fc1 = next(n for n in proto.graph.node if n.name == "fc1")
    props = {p.key: p.value for p in fc1.metadata_props}
    assert props["bitpass.bits.weight"] == "2" and props["bitpass.layer_id"] == '"fc1"'


def test_clone_copies_annotations_independently():
    model = tiny_model()
    annotation.set_weight_bits(node(model, "fc1"), 8)
    copy = model.clone()
    annotation.set_weight_bits(node(copy, "fc1"), 4)
    assert annotation.weight_bits(node(model, "fc1")) == 8
    assert annotation.weight_bits(node(copy, "fc1")) == 4


# --- schema check ---------------------------------------------------------------------

def test_a_well_annotated_model_has_no_problems():
    model = tiny_model()
    for bits in (2, 3, 4, 8, 16, annotation.FLOAT_BITS):
        annotation.set_weight_bits(node(model, "fc1"), bits)
        annotation.set_activation_bits(node(model, "fc2"), bits)
        assert annotation.check_schema(model.ir) == []
    annotation.set_sparsity(node(model, "fc1"), 0.0)
    assert annotation.check_schema(model.ir) == []


@pytest.mark.parametrize(("key", "raw", "message"), [
    ("bits.weight", "5", "bitpass.bits.weight=5 is not a supported width"),
    ("bits.activation", "1", "bitpass.bits.activation=1 is not a supported width"),
    ("bits.weight", '"8"', "is not a supported width"),
    ("sparsity", "1.0", "is not in [0, 1)"),
    ("sparsity", "-0.1", "is not in [0, 1)"),
    ("sparsity", '"half"', "is not in [0, 1)"),
    ("sensitivity.kl", "{not json", "is not JSON"),
])
def test_check_schema_flags_bad_values(key, raw, message):
    model = tiny_model()
    node(model, "fc2").metadata_props["bitpass." + key] = raw
    problems = annotation.check_schema(model.ir)
    assert len(problems) == 1
    assert "'fc2'" in problems[0] and message in problems[0]


def test_check_schema_flags_a_foreign_schema_version():
    model = tiny_model()
    model.ir.metadata_props[annotation.SCHEMA_KEY] = "99"
    assert annotation.check_schema(model.ir) == [f"annotation schema 99 is not {annotation.SCHEMA_VERSION}"]


def test_check_schema_ignores_other_tools_metadata():
    model = tiny_model()
    node(model, "fc1").metadata_props["pkg.other"] = "{not json"
    assert annotation.check_schema(model.ir) == []


# --- merge policy -----------------------------------------------------------------------

def test_merge_sensitivity_adds():
    assert annotation.merge("sensitivity.hutchinson", 1.5, 2.25) == 3.75


def test_merge_bits_take_the_max():
    assert annotation.merge("bits.weight", 4, 8) == 8
    assert annotation.merge("bits.weight", 8, 4) == 8
    assert annotation.merge("bits.activation", 8, annotation.FLOAT_BITS) == annotation.FLOAT_BITS


def test_merge_layer_id_keeps_the_first():
    assert annotation.merge("layer_id", "conv1", "bn1") == "conv1"


def test_merge_sparsity_keeps_the_smaller():
    assert annotation.merge("sparsity", 0.5, 0.25) == 0.25


def test_merge_of_unknown_keys_keeps_the_first():
    assert annotation.merge("plugin.note", "a", "b") == "a"


def test_merge_raw_works_on_metadata_strings():
    assert json.loads(annotation.merge_raw("bitpass.sensitivity.kl", "1.0", "0.5")) == 1.5
    assert annotation.merge_raw("bitpass.bits.weight", "4", "8") == "8"
    assert annotation.merge_raw("bitpass.layer_id", '"conv1"', '"bn1"') == '"conv1"'
    assert annotation.merge_raw("other.key", "a", "b") == "a"


@pytest.mark.parametrize("key, value", [("layer_id", 3), ("layer_id", ""), ("sensitivity.fisher", float("nan")),
                                        ("sensitivity.fisher", "high")])
def test_check_schema_flags_bad_ids_and_non_finite_sensitivities(key, value):
    model = tiny_model()
    layer_node = model.layers()[0].node
    assert annotation.check_schema(model.ir) == []
    annotation.set(layer_node, key, value)
    problems = annotation.check_schema(model.ir)
    assert len(problems) == 1 and key in problems[0]


def test_carried_says_whether_some_node_has_an_annotation_or_one_under_it():
    model = tiny_model()
    assert annotation.carried(model.ir, "layer_id") and not annotation.carried(model.ir, "bits")
    annotation.set_activation_bits(node(model, "fc2"), 8)
    assert annotation.carried(model.ir, "bits") and annotation.carried(model.ir, "bits.activation")
    assert not annotation.carried(model.ir, "bits.weight") and not annotation.carried(model.ir, "bit")
