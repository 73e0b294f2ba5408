"""quantize: int8 QDQ with calibrated ranges, per-layer fp32 / weight-only low bits, annotations kept."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from bitpass.frontend import BitpassError, UsageError, annotation, from_arrays
from bitpass.passes.annotate import SetBits
from bitpass.passes.calibrate import Calibrate
from bitpass.passes.infra import Pass, PassContext, PassResult
from bitpass.passes.pipeline import Pipeline, PipelineError
from bitpass.passes.quantize import Quantize


def _accuracy(model, eval_arrays) -> float:
    session = ort.InferenceSession(model.to_bytes(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": eval_arrays["input"]})[0]
    return float((logits.argmax(1) == eval_arrays["labels"]).mean())


def _ctx(model, calib_arrays) -> PassContext:
    return PassContext(calibration=from_arrays(calib_arrays, model.inputs))


def _weight_producer(model, layer_id):
    node = next(n for n in model.graph if annotation.layer_id(n) == layer_id)
    weight = node.inputs[1]
    producer = weight.producer()
    return node, weight, producer


@pytest.fixture
def int8_cnn(cnn_model, calib_arrays):
    ctx = _ctx(cnn_model, calib_arrays)
    quantized = Pipeline([Calibrate(), Quantize()]).run(cnn_model, ctx)
    return quantized, ctx


def test_int8_keeps_accuracy_and_shrinks_weights(cnn_model, int8_cnn, eval_arrays):
    quantized, ctx = int8_cnn
    assert quantized is not cnn_model  # functional pass
    fp32 = _accuracy(cnn_model, eval_arrays)
    assert _accuracy(quantized, eval_arrays) >= fp32 - 0.01
    assert quantized.weight_bytes() <= 0.35 * cnn_model.weight_bytes()
    record = ctx.records["quantization"]
    assert record["format"] == "QDQ" and record["activation_type"] == "int8"
    assert {v["result"] for v in record["layers"].values()} == {"int8-qdq"}


def test_every_layer_keeps_its_annotations(cnn_model, int8_cnn):
    quantized, _ = int8_cnn
    ids = [layer.id for layer in cnn_model.layers()]
    for layer_id in ids:
        node, _, producer = _weight_producer(quantized, layer_id)
        assert annotation.weight_bits(node) == 8 and annotation.activation_bits(node) == 8
        assert producer is not None and producer.op_type == "DequantizeLinear"
        weight = producer.inputs[0].const_value
        assert weight is not None and weight.dtype == ir.DataType.INT8


def test_fp32_layer_stays_fp32(cnn_model, calib_arrays, eval_arrays):
    first, *others = [layer.id for layer in cnn_model.layers()]
    annotation.set_sensitivity(cnn_model.layer(first).node, "fisher", 1.5)
    ctx = _ctx(cnn_model, calib_arrays)
    quantized = Pipeline([Calibrate(), SetBits(layers=first, weight=32), Quantize()]).run(cnn_model, ctx)
    node, weight, producer = _weight_producer(quantized, first)
    assert producer is None and weight.const_value is not None
    assert weight.const_value.dtype == ir.DataType.FLOAT
    assert annotation.weight_bits(node) == 32 and annotation.sensitivity(node, "fisher") == 1.5
    assert [layer.id for layer in quantized.layers()] == [first]  # still a quantizable fp32 layer
    for layer_id in others:
        _, _, producer = _weight_producer(quantized, layer_id)
        assert producer is not None and producer.op_type == "DequantizeLinear"
    assert ctx.records["quantization"]["layers"][first]["result"] == "fp32"
    assert _accuracy(quantized, eval_arrays) >= _accuracy(cnn_model, eval_arrays) - 0.01


def test_compiling_twice_gives_identical_bytes(cnn_model, calib_arrays, int8_cnn):
    again = Pipeline([Calibrate(), Quantize()]).run(cnn_model, _ctx(cnn_model, calib_arrays))
    assert again.to_bytes() == int8_cnn[0].to_bytes()


def test_low_bit_layers_use_matmulnbits_and_int4(cnn_model, calib_arrays, eval_arrays):
    ids = [layer.id for layer in cnn_model.layers()]
    conv, gemm = ids[2], ids[3]  # the third conv and the first linear layer
    ctx = _ctx(cnn_model, calib_arrays)
    quantized = Pipeline([Calibrate(), SetBits(layers=f"{conv},{gemm}", weight=4), Quantize()]).run(cnn_model, ctx)
    nbits = next(n for n in quantized.graph if annotation.layer_id(n) == gemm)
    assert nbits.op_type == "MatMulNBits" and nbits.domain == "com.microsoft"
    assert nbits.attributes.get_int("bits") == 4 and nbits.attributes.get_int("accuracy_level") == 4
    assert annotation.weight_bits(nbits) == 4
    conv_node = next(n for n in quantized.graph if annotation.layer_id(n) == conv)
    dq = conv_node.inputs[1].producer().inputs[0].producer()  # Reshape <- DequantizeLinear
    assert dq.op_type == "DequantizeLinear" and dq.inputs[0].const_value.dtype == ir.DataType.INT4
    layers = ctx.records["quantization"]["layers"]
    assert layers[gemm]["result"] == "matmulnbits-4" and layers[conv]["result"] == "blocked-dq"
    assert _accuracy(quantized, eval_arrays) >= _accuracy(cnn_model, eval_arrays) - 0.02


def test_every_layer_at_4_bits_is_rewritten_not_just_the_first(cnn_model, calib_arrays, eval_arrays):
    ctx = _ctx(cnn_model, calib_arrays)
    quantized = Pipeline([Calibrate(), SetBits(layers="*", weight=4, activation=32), Quantize()]).run(cnn_model, ctx)
    for layer in cnn_model.layers():
        node = next(n for n in quantized.graph if annotation.layer_id(n) == layer.id)
        if layer.op_type == "Conv":
            dq = node.inputs[1].producer().inputs[0].producer()
            assert dq.op_type == "DequantizeLinear", layer.id
        else:
            assert node.op_type == "MatMulNBits", layer.id
    fp32_weights = {v.name for v in cnn_model.graph.initializers.values()
                    if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT and v.name.endswith("weight")}
    left = fp32_weights & {v.name for v in quantized.graph.initializers.values()}
    assert not left, f"fp32 weights still stored: {left}"
    assert quantized.weight_bytes() <= 0.2 * cnn_model.weight_bytes()
    assert _accuracy(quantized, eval_arrays) >= _accuracy(cnn_model, eval_arrays) - 0.03


def test_unsupported_width_names_the_layer(cnn_model, calib_arrays):
    first = cnn_model.layers()[0].id
    with pytest.raises(PipelineError, match=rf"layer '{first}' \(Conv\): 2-bit"):
        Pipeline([Calibrate(), SetBits(layers=first, weight=2), Quantize()]).run(
            cnn_model, _ctx(cnn_model, calib_arrays))


def _biases(model) -> dict[str, np.ndarray]:
    """Each layer's bias as the artifact computes with it (int8 QDQ biases are int32 times a scale)."""
    out = {}
    for node in model.graph:
        layer_id = annotation.layer_id(node)
        if layer_id is None or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        value = node.inputs[2]
        producer = value.producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            q, scale = (v.const_value.numpy().astype(np.float64) for v in producer.inputs[:2])
            out[layer_id] = q * scale
        else:
            out[layer_id] = value.const_value.numpy().astype(np.float64)
    return out


def test_bias_correction_changes_the_biases_and_keeps_accuracy(cnn_model, calib_arrays, int8_cnn, eval_arrays):
    ctx = _ctx(cnn_model, calib_arrays)
    corrected = Pipeline([Calibrate(), Quantize(bias_correction=True)]).run(cnn_model, ctx)
    assert ctx.records["quantization"]["bias_correction"] is True
    plain, moved = _biases(int8_cnn[0]), _biases(corrected)
    assert set(moved) == set(plain) and len(plain) >= 4  # the convs and the linear layers have biases
    changed = [lid for lid in plain if np.abs(moved[lid] - plain[lid]).max() > 1e-6]
    assert len(changed) >= 3, changed
    assert _accuracy(corrected, eval_arrays) >= _accuracy(cnn_model, eval_arrays) - 0.01
    with pytest.raises(UsageError, match="calibration data"):
        Quantize(bias_correction=True).run(cnn_model, PassContext())


def test_missing_calibration_is_a_clear_error(cnn_model):
    with pytest.raises(UsageError, match="requires activation-ranges"):
        Pipeline([Quantize()]).run(cnn_model, PassContext())
    with pytest.raises(BitpassError, match="no activation-ranges has been computed"):
        Quantize().run(cnn_model, PassContext())


class _AddIdentity(Pass):
    """Test pass that changes the graph (an Identity on the output)."""

    name = "add-identity"

    def run(self, model, ctx):
        graph = model.graph
        old = graph.outputs[0]
        node = ir.node("Identity", [old], name="extra_identity")
        node.outputs[0].name = f"{old.name}_id"
        node.outputs[0].shape, node.outputs[0].type = old.shape, old.type
        graph.append(node)
        graph.outputs[0] = node.outputs[0]
        return PassResult(model, modified=True, preserved=frozenset())


def test_graph_change_after_calibration_invalidates_ranges(cnn_model, calib_arrays):
    with pytest.raises(PipelineError, match="invalidated by pass 'add-identity'") as info:
        Pipeline([Calibrate(), _AddIdentity(), Quantize()]).run(cnn_model, _ctx(cnn_model, calib_arrays))
    assert "quantize" in str(info.value) and "calibrate" in str(info.value)


def test_a_pinned_int8_flavour_is_materialized_without_searching(cnn_model, calib_arrays, eval_arrays):
    """The quality gate's repairs pin the flavour the first run's format search chose: no timing again, even
    with a whole-model timer at hand, and the flavour's activation type in the graph."""
    from bitpass.backends.onnxruntime.latency import LatencyProbe
    from bitpass.passes.infra import Target

    ctx = PassContext(calibration=from_arrays(calib_arrays, cnn_model.inputs),
                      target=Target(options={"latency_probe": LatencyProbe(), "int8_flavour": "u8s8"}))
    quantized = Pipeline([Calibrate(), Quantize()]).run(cnn_model, ctx)
    record = ctx.records["quantization"]
    assert "search" not in record and record["flavour_pinned"].startswith("u8s8")
    assert record["activation_type"] == "uint8"
    activation_zero_points = [n for n in quantized.graph if n.op_type == "QuantizeLinear"]
    assert activation_zero_points and all(n.inputs[2].const_value.dtype == ir.DataType.UINT8
                                          for n in activation_zero_points)
    assert _accuracy(quantized, eval_arrays) > 0.9

