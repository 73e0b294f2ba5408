"""The sensitivity pass on the project's trained digits CNN: every method, every layer, saved and reloaded."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from bitpass.frontend import annotation, from_arrays, from_proto
from bitpass.passes.infra import PRESERVE_ALL, PassContext
from bitpass.passes.pipeline import Pipeline
from bitpass.passes.sensitivity.passes import PER_BIT_METHODS, Sensitivity
from bitpass.plugins.registry import default_registry

FAST = {"hutchinson": {"max_samples": 60}, "eigenvalue": {"max_samples": 30}, "fisher": {}, "taylor": {},
        "output-kl": {}, "output-mse": {}}


@pytest.fixture
def calib(cnn_model, calib_arrays):
    return from_arrays(calib_arrays, cnn_model.inputs)


@pytest.mark.parametrize("method", list(FAST))
def test_every_layer_is_annotated_and_survives_a_save(cnn_model, calib, method):
    ctx = PassContext(calibration=calib, seed=3)
    messages: list[str] = []
    ctx.progress = messages.append
    result = Sensitivity(method=method, samples=64, **FAST[method]).run(cnn_model, ctx)
    assert result.model is cnn_model and result.preserved is PRESERVE_ALL
    ids = [layer.id for layer in cnn_model.layers()]
    assert len(ids) == 5
    scores = ctx.analyses.require("sensitivity")
    per_bits = ctx.analyses.require("sensitivity:bits")
    assert set(scores) == set(ids) == set(per_bits)
    for lid in ids:
        assert set(per_bits[lid]) == {2, 4, 8}
        assert per_bits[lid][2] > per_bits[lid][8] >= 0
        value = scores[lid][4] if method in PER_BIT_METHODS else scores[lid]
        assert np.isfinite(value) and value > 0
    reloaded = from_proto(onnx.load_from_string(cnn_model.to_bytes()))
    for layer in reloaded.layers():
        expected = scores[layer.id][4] if method in PER_BIT_METHODS else scores[layer.id]
        assert annotation.sensitivity(layer.node, method) == pytest.approx(expected)
    record = ctx.records["sensitivity"]
    assert record["method"] == method and record["data_sha256"] == calib.sha256 and record["samples"] == 64
    assert record["seconds"] > 0 and messages
    json.dumps(record)  # the manifest can hold it
    if method not in ("output-kl", "output-mse"):
        assert record["labels"] == "pseudo-labels (fp32 argmax)"
        assert "torch_weights_differ" not in record


def test_adaptive_hutchinson_stops_before_max_samples(cnn_model, calib):
    ctx = PassContext(calibration=calib)
    Sensitivity(method="hutchinson", samples=64, max_samples=100).run(cnn_model, ctx)
    record = ctx.records["sensitivity"]
    assert record["converged"] and record["hutchinson_samples"] < 100 and record["kendall_tau"] == 1.0
    # HAWQ-V2's average trace: the first conv (few weights, early) is far more sensitive than the wide FC
    scores = ctx.analyses.require("sensitivity")
    assert scores["0"] > 10 * scores["11"]


def test_seeded_runs_repeat_and_labels_are_used_when_given(cnn_model, calib_arrays, digits_split):
    labelled = from_arrays({**calib_arrays, "labels": digits_split.calib_y}, cnn_model.inputs)
    runs = []
    for _ in range(2):
        ctx = PassContext(calibration=labelled, seed=11)
        Sensitivity(method="hutchinson", samples=32, max_samples=10).run(cnn_model, ctx)
        runs.append(ctx.analyses.require("sensitivity"))
    assert runs[0] == runs[1]
    assert ctx.records["sensitivity"]["labels"] == "labels"


def test_taylor_curvatures_and_output_kl_agree_on_the_ranking(cnn_model, calib):
    tables = {}
    for name, options in {"fisher": {"method": "taylor"}, "hessian": {"method": "taylor", "curvature": "hessian"},
                          "kl": {"method": "output-kl"}}.items():
        ctx = PassContext(calibration=calib)
        Sensitivity(samples=64, **options).run(cnn_model, ctx)
        tables[name] = ctx.analyses.require("sensitivity")
    # the exact second-order term and the measured KL (pseudo-label CE ~ KL) agree within a factor 2 at 4 bits
    for lid, row in tables["hessian"].items():
        assert 0.5 < row[4] / tables["kl"][lid][4] < 2.0


def test_pipeline_from_a_spec_runs_with_verification(cnn_model, calib):
    pipeline = default_registry().pipeline("sensitivity(method=fisher,samples=32)")
    ctx = PassContext(calibration=calib)
    model = pipeline.run(cnn_model, ctx)
    assert all(annotation.sensitivity(layer.node, "fisher") for layer in model.layers())


def test_missing_calibration_data_is_a_pipeline_error(cnn_model):
    from bitpass.frontend import UsageError

    with pytest.raises(UsageError, match="calib"):
        Pipeline([Sensitivity(method="fisher")]).run(cnn_model, PassContext())


def test_bad_options_are_usage_errors():
    from bitpass.frontend import UsageError

    with pytest.raises(UsageError, match="method"):
        Sensitivity(method="magic")
    with pytest.raises(UsageError, match="bits"):
        Sensitivity(bits=1)
