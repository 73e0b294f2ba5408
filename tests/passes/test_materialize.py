"""``materialize``: the one way a plan of per-layer widths and formats becomes a graph (trained digits CNN)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from bitpass.frontend import annotation, from_arrays
from bitpass.frontend.errors import BitpassError, UsageError
from bitpass.passes.calibrate import activation_ranges
from bitpass.passes.materialize import (LayerPlan, QuantizeOptions, annotate, decide, materialize, packed_plan)


def _logits(model, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.to_bytes(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _layer_node(model, layer_id):
    return next(n for n in model.graph if annotation.layer_id(n) == layer_id)


def test_a_packed_plan_needs_no_ranges_and_leaves_the_input_model_alone(cnn_model, eval_arrays):
    before = cnn_model.to_bytes()
    ids = [layer.id for layer in cnn_model.layers()]
    plan = packed_plan({ids[0]: 32, **{i: 4 for i in ids[1:]}})
    packed = materialize(cnn_model, plan)
    assert cnn_model.to_bytes() == before  # functional: a new model
    assert annotation.weight_bits(_layer_node(packed, ids[0])) == 32
    assert annotation.weight_format(_layer_node(packed, ids[0])) is None
    for layer_id in ids[1:]:
        node = _layer_node(packed, layer_id)
        assert annotation.weight_format(node) == "packed" and annotation.weight_bits(node) == 4
        assert node.op_type == cnn_model.layer(layer_id).op_type  # the fp32 kernel stays
    assert packed.weight_bytes() < 0.2 * cnn_model.weight_bytes()
    x, y = eval_arrays["input"], eval_arrays["labels"]
    assert (_logits(packed, x).argmax(1) == y).mean() >= (_logits(cnn_model, x).argmax(1) == y).mean() - 0.02


def test_a_plan_equals_the_same_annotations_written_first(cnn_model, calib_arrays):
    ids = [layer.id for layer in cnn_model.layers()]
    plan = {ids[0]: LayerPlan(8), ids[1]: LayerPlan(4, 32), ids[2]: LayerPlan.packed(2), ids[3]: LayerPlan(4, 32),
            ids[4]: LayerPlan.packed(32)}
    ranges = activation_ranges(cnn_model, from_arrays(calib_arrays, cnn_model.inputs))
    from_plan = materialize(cnn_model, plan, ranges=ranges)
    annotated = cnn_model.clone()
    annotate(annotated, plan)
    assert from_plan.to_bytes() == materialize(annotated, ranges=ranges).to_bytes()
    assert [d.result for d in decide(annotated)] == ["int8-qdq", "blocked-dq", "packed", "matmulnbits", "fp32"]
    ops = {layer_id: _layer_node(from_plan, layer_id).op_type for layer_id in ids}
    assert ops[ids[3]] == "MatMulNBits" and ops[ids[0]] == ops[ids[1]] == ops[ids[2]] == "Conv"
    assert {layer_id: annotation.weight_format(_layer_node(from_plan, layer_id)) for layer_id in ids} == {
        ids[0]: "qdq", ids[1]: "blocked-dq", ids[2]: "packed", ids[3]: "matmulnbits", ids[4]: None}


def test_int8_layers_without_ranges_are_refused_naming_them(cnn_model):
    first = cnn_model.layers()[0].id
    with pytest.raises(BitpassError, match=rf"int8 QDQ layers \({first}\) need activation ranges: run calibrate"):
        materialize(cnn_model, {first: LayerPlan(8, 8)} | packed_plan({l.id: 4 for l in cnn_model.layers()[1:]}))


def test_unsupported_plans_are_refused_before_any_work(cnn_model):
    conv = cnn_model.layers()[0].id
    with pytest.raises(BitpassError, match=rf"layer '{conv}' \(Conv\): 2-bit weights .* INT2"):
        materialize(cnn_model, {conv: LayerPlan(2, 32)})
    with pytest.raises(BitpassError, match="packed weights take"):
        materialize(cnn_model, {conv: LayerPlan(2, 8, "packed")})
    with pytest.raises(UsageError, match="bias_correction=true\\) needs calibration data"):
        materialize(cnn_model, options=QuantizeOptions(bias_correction=True))
