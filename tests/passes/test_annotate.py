"""set-bits: bit-width annotations on named quantizable layers."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.frontend import UsageError, annotation, from_proto
from bitpass.passes.annotate import SetBits
from bitpass.passes.infra import PassContext
from bitpass.passes.pipeline import Pipeline, PipelineError


def _model():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "fc1.weight"),
             numpy_helper.from_array(rng.normal(size=(4, 8)).astype(np.float32), "fc2.weight"),
             numpy_helper.from_array(np.zeros(4, np.float32), "fc2.bias")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "fc1.weight"], ["h"], name="mm"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "fc2.weight", "fc2.bias"], ["y"], name="gemm", transB=1)],
        "two", [x], [y], inits)
    return from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))


def _bits(model):
    return {l.id: (annotation.weight_bits(l.node), annotation.activation_bits(l.node)) for l in model.layers()}


def test_star_annotates_every_layer():
    model = Pipeline([SetBits(layers="*", weight=4)]).run(_model(), PassContext())
    assert _bits(model) == {"fc1": (4, None), "fc2": (4, None)}


def test_named_layers_and_fp32():
    ctx = PassContext()
    model = Pipeline([SetBits(layers="fc2", weight=32, activation=32)]).run(_model(), ctx)
    assert _bits(model) == {"fc1": (None, None), "fc2": (32, 32)}
    assert ctx.records["set_bits"] == {"fc2": {"weight": 32, "activation": 32}}


def test_list_and_comma_forms_and_later_passes_override():
    model = Pipeline([SetBits(layers="fc1,fc2", weight=8, activation=8),
                      SetBits(layers=["fc1"], weight=2)]).run(_model(), PassContext())
    assert _bits(model) == {"fc1": (2, 8), "fc2": (8, 8)}


def test_annotations_survive_save_and_load():
    model = Pipeline([SetBits(layers="fc1", weight=4)]).run(_model(), PassContext())
    again = from_proto(model.to_proto())
    assert _bits(again) == {"fc1": (4, None), "fc2": (None, None)}


def test_unknown_layer_lists_the_valid_ids():
    with pytest.raises(UsageError, match=r"'nope'.*valid layer ids: fc1, fc2"):
        SetBits(layers="fc1,nope", weight=4).run(_model(), PassContext())
    with pytest.raises(PipelineError, match="valid layer ids") as info:
        Pipeline([SetBits(layers="nope")]).run(_model(), PassContext())
    assert info.value.exit_code == 2


@pytest.mark.parametrize("options", [{"weight": 3}, {"activation": 4}, {"weight": None}, {"layers": ""}])
def test_bad_options(options):
    with pytest.raises(UsageError):
        SetBits(**options)


def test_spec_shows_options():
    assert SetBits(layers="fc1", weight=4).spec() == "set-bits(layers=fc1,weight=4)"
    assert SetBits.summary()
