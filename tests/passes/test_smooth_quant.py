"""``smooth-quant``: activation outliers move into the weights per channel; fp32 outputs do not change."""

from __future__ import annotations

import numpy as np
import pytest

from bitpass.frontend import from_arrays, from_onnx
from bitpass.passes import execution
from bitpass.passes.infra import PassContext
from bitpass.passes.pipeline import Pipeline
from bitpass.passes.smooth_quant import SmoothQuant, smooth, smoothing_factors, smoothing_groups
from bitpass.tools import model_families as mf


def _export(name: str, folder):
    built = mf.build(name, "fast")
    path = mf.export(built, mf.EXPORTS["torchscript-17"], folder)
    return from_onnx(path), built


@pytest.fixture(scope="module")
def sentence(family_export):
    """The sentence encoder's TorchScript export (the session's, shared with test_quant_scope) and its build."""
    path, built = family_export("sentence_embedding", eval_labels=False)
    return from_onnx(path), built


def test_factors_balance_activation_and_weight_ranges():
    s = smoothing_factors(np.array([8.0, 1.0, 0.0]), np.array([0.5, 2.0, 1.0]), alpha=0.5)
    np.testing.assert_allclose(s, [4.0, 0.5 ** 0.5 * 1.0, 1.0])
    # after migration the activation and weight maxima meet in the middle (alpha 0.5)
    np.testing.assert_allclose(np.array([8.0, 1.0]) / s[:2], np.array([0.5, 2.0]) * s[:2])


def test_the_real_sentence_encoder_keeps_its_outputs_and_loses_its_outliers(sentence):
    model, built = sentence
    calibration = from_arrays(built.calibration, model.inputs)
    evaluation = from_arrays(built.inputs_of(built.evaluation), model.inputs)
    before = execution.predict(model, evaluation)
    record = smooth(model, calibration, alpha=0.5)
    after = execution.predict(model, evaluation)
    np.testing.assert_allclose(after, before, atol=1e-5)
    layers = built.module.encoder.config.num_hidden_layers
    assert record["groups"] == 4 * layers  # QKV, attention output, FC1, FC2 inputs per block
    for group in record["smoothed"]:
        assert group["activation_max_after"] < group["activation_max"]
    # a post-LN encoder's LayerNorm output also feeds the residual sum: the division is a Mul, not the norm
    assert {g["into"] for g in record["smoothed"]} == {"Mul (inserted)"}


def test_a_pre_ln_decoder_folds_the_factors_into_its_layernorms(tmp_path):
    model, built = _export("gpt2", tmp_path)
    norm_fed = [g for g in smoothing_groups(model) if g.norm is not None]
    assert norm_fed, "GPT-2's ln_1/ln_2 feed only the attention and MLP input projections"
    calibration = from_arrays(built.calibration, model.inputs)
    evaluation = from_arrays(built.inputs_of(built.evaluation), model.inputs)
    nodes = len(list(model.graph))
    before = execution.predict(model, evaluation)
    record = smooth(model, calibration)
    np.testing.assert_allclose(execution.predict(model, evaluation), before, rtol=1e-4, atol=1e-4)
    folded = [g for g in record["smoothed"] if g["into"].startswith("LayerNormalization")]
    assert len(folded) == len(norm_fed)
    assert len(list(model.graph)) == nodes + len(record["smoothed"]) - len(folded)  # one Mul per other group


def test_auto_turns_it_on_for_transformers_only(sentence, family_export):
    model, built = sentence
    ctx = PassContext(calibration=from_arrays(built.calibration, model.inputs))
    Pipeline([SmoothQuant()]).run(model.clone(), ctx)
    assert ctx.records["smooth_quant"]["enabled"] is True
    cnn_path, cnn_built = family_export("resnet18")
    cnn = from_onnx(cnn_path)
    ctx = PassContext(calibration=from_arrays(cnn_built.calibration, cnn.inputs))
    Pipeline([SmoothQuant()]).run(cnn, ctx)
    assert ctx.records["smooth_quant"]["enabled"] is False
    assert "not a transformer" in ctx.records["smooth_quant"]["why"]
