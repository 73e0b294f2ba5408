"""``raise-opset``: the opset a plan's formats need is given to the model as a recorded step, not a late failure."""

from __future__ import annotations

import numpy as np
import pytest

from bitpass.frontend import annotation, from_arrays, from_onnx
from bitpass.passes import execution
from bitpass.passes.infra import PassContext
from bitpass.passes.materialize import LayerPlan, annotate, decide, materialize
from bitpass.passes.opset import RaiseOpset, raise_opset, required_opset
from bitpass.passes.pipeline import Pipeline
from bitpass.tools import model_families as mf


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    built = mf.build("resnet18", "fast")
    return mf.export(built, mf.EXPORTS["torchscript-17"], tmp_path_factory.mktemp("resnet")), built


def _conv_4bit_plan(model) -> dict[str, LayerPlan]:
    return {layer.id: LayerPlan(4, 32) if layer.op_type == "Conv" else LayerPlan(32) for layer in model.layers()}


def test_blocked_int4_conv_needs_opset_21_and_says_which_layer(resnet):
    path, _ = resnet
    model = from_onnx(path)
    annotate(model, _conv_4bit_plan(model))
    need, why = required_opset(decide(model))
    assert need == 21 and why.startswith("blocked int4 DequantizeLinear (layer ")


def test_raising_keeps_outputs_layer_ids_and_annotations(resnet):
    path, built = resnet
    model = from_onnx(path)
    annotate(model, _conv_4bit_plan(model))
    notes = {n.name: annotation.all_of(n) for n in model.graph}
    data = from_arrays(built.inputs_of(built.evaluation), model.inputs).head(8)
    before = execution.predict(model, data)
    assert model.opset == 17 and raise_opset(model, 21) and model.opset == 21
    assert {n.name: annotation.all_of(n) for n in model.graph} == notes
    np.testing.assert_array_equal(execution.predict(model, data), before)
    assert raise_opset(model, 21) is False


def test_materialize_raises_the_opset_itself_and_notes_it(resnet):
    path, _ = resnet
    model = from_onnx(path)
    quantized = materialize(model, _conv_4bit_plan(model))
    assert model.opset == 17, "the input model is left alone"
    assert quantized.opset == 21
    assert any(note.startswith("opset raised 17 -> 21 for blocked int4 DequantizeLinear")
               for note in quantized.provenance.notes)
    assert any(n.op_type == "DequantizeLinear" for n in quantized.graph)


def test_the_pass_records_what_it_did(resnet):
    path, _ = resnet
    model = from_onnx(path)
    annotate(model, _conv_4bit_plan(model))
    ctx = PassContext()
    Pipeline([RaiseOpset()]).run(model, ctx)
    assert ctx.records["opset"]["from"] == 17 and ctx.records["opset"]["to"] == 21
    assert ctx.records["opset"]["why"].startswith("blocked int4 DequantizeLinear")
    ctx = PassContext()
    Pipeline([RaiseOpset()]).run(model, ctx)
    assert ctx.records["opset"]["to"] == 21 and "already serves the plan" in ctx.records["opset"]["why"]


def test_an_opset_20_export_compiles_at_four_bits_without_failing_at_emit(resnet, tmp_path):
    from bitpass.tools import compile

    built = mf.build("resnet18", "fast")
    path = mf.export(built, mf.EXPORTS[f"torchscript-{mf.TORCHSCRIPT_NEWEST}"], tmp_path / "model")
    calibration = {"input": built.calibration["input"]}
    artifact = compile(str(path), tmp_path / "out", calibration=calibration, latency=False,
                       pipeline="fold-constants,fuse,calibrate,set-bits(weight=4,activation=32,format=blocked-dq),"
                                "raise-opset,quantize")
    assert artifact.manifest["records"]["opset"]["to"] == 21
