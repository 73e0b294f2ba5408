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


# --- int8 compute of low-bit storage, dynamic int8 ------------------------------------------------------------
def _optimized_ops(model, tmp_path) -> list[str]:
    """The op types of ONNX Runtime's optimized graph of ``model`` (what really runs)."""
    import onnx

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.to_bytes(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def _with_weights(model, weights):
    """A copy of ``model`` whose layer weights are replaced by ``weights`` ({layer id: array})."""
    import onnx_ir as ir

    out = model.clone()
    for layer in out.layers():
        if layer.id in weights:
            layer.weight.const_value = ir.tensor(weights[layer.id], name=layer.weight.name)
    return out


@pytest.mark.parametrize("bits", [4, 2])
def test_low_bit_storage_runs_the_int8_kernel_on_the_low_bit_weight(cnn_model, calib_arrays, eval_arrays, bits,
                                                                    tmp_path):
    """2/4-bit codes widened to int8 at load: the same outputs as 8-bit QDQ of the low-bit weight, the same fused
    int8 kernels, at low-bit bytes."""
    from bitpass.passes.packing import LowBitWeight
    from bitpass.passes.sensitivity.quant import layer_channel_axis

    layers = cnn_model.layers()
    ranges = activation_ranges(cnn_model, from_arrays(calib_arrays, cnn_model.inputs))
    options = QuantizeOptions(activation_type="uint8", preprocess=False)
    widened = materialize(cnn_model, {l.id: LayerPlan(bits, 8, "qdq") for l in layers}, ranges=ranges,
                          options=options)
    low = {l.id: LowBitWeight.of(l.weight_array, layer_channel_axis(l), bits, 32).dequantized() for l in layers}
    int8_of_low = materialize(_with_weights(cnn_model, low), {l.id: LayerPlan(8, 8) for l in layers},
                              ranges=ranges, options=options)
    x = eval_arrays["input"]
    np.testing.assert_array_equal(_logits(widened, x), _logits(int8_of_low, x))
    assert _optimized_ops(widened, tmp_path).count("QLinearConv") == _optimized_ops(int8_of_low, tmp_path).count(
        "QLinearConv") >= 2
    limit = {4: 0.16, 2: 0.10}[bits]
    assert widened.weight_bytes() <= limit * cnn_model.weight_bytes() < int8_of_low.weight_bytes()
    for layer in layers:
        node = _layer_node(widened, layer.id)
        assert (annotation.weight_bits(node), annotation.weight_format(node)) == (bits, "qdq")
    if bits == 4:
        assert (_logits(widened, x).argmax(1) == eval_arrays["labels"]).mean() >= 0.97


def test_dynamic_int8_is_what_ort_fuses_to_dynamic_quantize_matmul(cnn_model, eval_arrays, tmp_path):
    ids = [layer.id for layer in cnn_model.layers() if layer.op_type in ("Gemm", "MatMul")]
    convs = {layer.id: LayerPlan(32) for layer in cnn_model.layers() if layer.id not in ids}
    plan = {**convs, **{i: LayerPlan(8, 8, "dynamic") for i in ids}}
    dynamic = materialize(cnn_model, plan)  # no activation ranges: activations are quantized at run time
    assert _optimized_ops(dynamic, tmp_path).count("DynamicQuantizeMatMul") == len(ids)
    x, y = eval_arrays["input"], eval_arrays["labels"]
    assert (_logits(dynamic, x).argmax(1) == _logits(cnn_model, x).argmax(1)).mean() >= 0.99
    assert [annotation.weight_format(_layer_node(dynamic, i)) for i in ids] == ["dynamic"] * len(ids)
    four = materialize(cnn_model, {**convs, **{i: LayerPlan(4, 8, "dynamic") for i in ids}})
    assert four.weight_bytes() < dynamic.weight_bytes()
    assert (_logits(four, x).argmax(1) == y).mean() >= 0.97


def test_dynamic_and_low_bit_int8_are_refused_where_they_do_not_apply(cnn_model):
    conv = cnn_model.layers()[0].id
    with pytest.raises(BitpassError, match=rf"layer '{conv}' \(Conv\): dynamic int8 takes MatMul/Gemm"):
        materialize(cnn_model, {conv: LayerPlan(8, 8, "dynamic")})
    with pytest.raises(BitpassError, match="int8 compute of 4-bit weights takes"):
        materialize(cnn_model, {conv: LayerPlan(4, 32, "qdq")})
