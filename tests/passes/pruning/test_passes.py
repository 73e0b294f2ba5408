"""The ``prune`` pass on the project's trained CNN and MLP: sparsity reached, outputs finite, N:M exact,
annotations saved, per-layer ratios that meet the overall target."""

from __future__ import annotations

import numpy as np
import pytest

from bitpass.frontend import annotation, from_arrays, from_proto
from bitpass.frontend.errors import UsageError
from bitpass.passes.infra import PassContext
from bitpass.passes.pipeline import Pipeline
from bitpass.passes.pruning import ratios
from bitpass.passes.analyses import PRUNING_MASKS
from bitpass.passes.pruning.common import groups_view, input_axis
from bitpass.passes.pruning.passes import Prune
from bitpass.passes.sensitivity.passes import Sensitivity
from bitpass.plugins.registry import default_registry


def overall_sparsity(model, ids) -> float:
    layers = [l for l in model.layers() if l.id in ids]
    return sum(int(np.count_nonzero(l.weight_array == 0)) for l in layers) / sum(l.params for l in layers)


@pytest.mark.parametrize("method,allocation", [
    ("magnitude", "uniform"), ("wanda", "uniform"), ("gblm", "uniform"),
    ("magnitude", "global"), ("wanda", "global"), ("gblm", "ecoflap"), ("wanda", "ecoflap"),
])
def test_each_method_reaches_the_sparsity_and_keeps_outputs_finite(cnn_model, calib, evaluation, method, allocation, outputs):
    shapes = {l.id: l.weight_shape for l in cnn_model.layers()}
    ctx = PassContext(calibration=calib)
    result = Prune(method=method, sparsity=0.5, allocation=allocation).run(cnn_model, ctx)
    assert result.modified and result.model is cnn_model
    record = ctx.records["pruning"]
    assert set(record["layers"]) == set(shapes)
    assert overall_sparsity(cnn_model, shapes) == pytest.approx(0.5, abs=0.01)
    assert record["sparsity"] == pytest.approx(overall_sparsity(cnn_model, shapes), abs=1e-6)
    assert all(r <= 0.9 + 1e-6 for r in record["layers"].values())  # max_layer_sparsity
    assert {l.id: l.weight_shape for l in cnn_model.layers()} == shapes
    out = outputs(cnn_model, evaluation)
    assert out.shape == (len(evaluation), 10) and np.isfinite(out).all()
    masks = ctx.analyses.require(PRUNING_MASKS)
    for layer in cnn_model.layers():
        assert not np.any(layer.weight_array[~masks[layer.id]])
        assert annotation.sparsity(layer.node) == pytest.approx(record["layers"][layer.id], abs=1e-5)


def test_auto_comparison_keeps_the_group_closer_to_the_unpruned_outputs(cnn_model, calib, outputs):
    """wanda/gblm with comparison=auto prune per row and per layer, and keep the one whose outputs on the
    calibration data stay closer to the unpruned model's; the record shows both errors."""
    measured_on = calib.head(128)  # the pass's default samples=
    reference = outputs(cnn_model, measured_on)
    errors = {}
    for group in ("row", "layer"):
        copy = cnn_model.clone()
        ctx = PassContext(calibration=calib)
        Prune(method="wanda", sparsity=0.6, allocation="global", comparison=group).run(copy, ctx)
        assert ctx.records["pruning"]["comparison"] == group
        errors[group] = float(np.mean((outputs(copy, measured_on) - reference) ** 2))
    assert errors["row"] != errors["layer"]
    ctx = PassContext(calibration=calib)
    Prune(method="wanda", sparsity=0.6, allocation="global").run(cnn_model, ctx)
    record = ctx.records["pruning"]
    assert record["comparison"] == min(errors, key=errors.get)
    assert record["comparison_output_mse"] == pytest.approx(errors, rel=1e-3)
    # magnitude's auto is the classic per-layer group, measured nothing
    ctx = PassContext()
    Prune(method="magnitude").run(cnn_model.clone(), ctx)
    assert ctx.records["pruning"]["comparison"] == "layer" and "comparison_output_mse" not in ctx.records["pruning"]


def test_annotations_survive_a_save_and_a_load(cnn_model, calib):
    Prune(method="wanda").run(cnn_model, PassContext(calibration=calib))
    again = from_proto(cnn_model.to_proto())
    for before, after in zip(cnn_model.layers(), again.layers()):
        assert annotation.sparsity(after.node) == annotation.sparsity(before.node) > 0.4
        np.testing.assert_array_equal(after.weight_array, before.weight_array)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_n_m_keeps_exactly_n_of_every_m_along_the_input(cnn_model, calib, pattern):
    n, m = (int(x) for x in pattern.split(":"))
    ctx = PassContext(calibration=calib)
    Prune(method="wanda", pattern=pattern).run(cnn_model, ctx)
    record = ctx.records["pruning"]
    assert "0" in record["skipped"] and "not a multiple" in record["skipped"]["0"]  # conv with 1 input channel
    for layer in cnn_model.layers():
        if layer.id == "0":
            assert annotation.sparsity(layer.node) is None
            continue
        blocks = groups_view(layer.weight_array, input_axis(layer)).reshape(-1, m)
        assert ((blocks != 0).sum(axis=1) <= n).all()
        assert ((blocks != 0).sum(axis=1) == n).mean() > 0.99  # a trained weight is almost never exactly 0
        assert annotation.sparsity(layer.node) == pytest.approx(1 - n / m, abs=0.01)


def test_n_m_fixes_the_sparsity_and_the_allocation():
    with pytest.raises(UsageError, match="fixes the sparsity"):
        Prune(pattern="2:4", sparsity=0.7)
    with pytest.raises(UsageError, match="allocation=uniform"):
        Prune(pattern="4:8", allocation="global")


@pytest.mark.parametrize("method", ["magnitude", "wanda", "gblm"])
def test_the_mlp_too(mlp_model, calib_arrays, method, outputs):
    calib = from_arrays(calib_arrays, mlp_model.inputs)
    ids = [l.id for l in mlp_model.layers()]
    ctx = PassContext(calibration=calib)
    Prune(method=method, sparsity=0.6, allocation="global").run(mlp_model, ctx)
    assert overall_sparsity(mlp_model, ids) == pytest.approx(0.6, abs=0.01)
    out = outputs(mlp_model, calib)
    assert out.shape == (len(calib), 10) and np.isfinite(out).all()


def test_gblm_on_an_onnx_only_model_names_the_methods_that_work(cnn_model, calib):
    cnn_model.torch_module = None
    with pytest.raises(UsageError, match="magnitude\\|wanda"):
        Prune(method="gblm").run(cnn_model, PassContext(calibration=calib))
    Prune(method="wanda").run(cnn_model, PassContext(calibration=calib))  # ORT only: fine


def test_gblm_applies_to_bn_folded_weights(cnn_model, calib, outputs):
    """After fuse the ONNX conv weights are the torch weights scaled per channel: same shapes, scores apply."""
    ctx = PassContext(calibration=calib)
    Pipeline(default_registry().pipeline("fold-constants,fuse").passes).run(cnn_model, ctx)
    Prune(method="gblm", allocation="ecoflap").run(cnn_model, ctx)
    assert ctx.records["pruning"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert np.isfinite(outputs(cnn_model, calib)).all()


def test_sensitivity_allocation_prunes_less_sensitive_layers_more(cnn_model, calib):
    with pytest.raises(UsageError, match="run the sensitivity pass"):
        Prune(allocation="sensitivity").run(cnn_model, PassContext(calibration=calib))
    ctx = PassContext(calibration=calib)
    Sensitivity(method="fisher", samples=64).run(cnn_model, ctx)
    Prune(allocation="sensitivity", sparsity=0.5).run(cnn_model, ctx)
    record = ctx.records["pruning"]
    assert record["sparsity"] == pytest.approx(0.5, abs=0.01)
    importance = record["layer_importance"]
    ordered = sorted(importance, key=importance.get)
    allocated = record["allocated"]
    assert allocated[ordered[0]] >= allocated[ordered[-1]]
    assert len(set(round(v, 3) for v in allocated.values())) > 1


def test_a_spec_prunes_chosen_layers_only(cnn_model, calib):
    ctx = PassContext(calibration=calib)
    Pipeline(default_registry().pipeline("prune(method=magnitude,sparsity=0.3,layers=[3,7])").passes).run(
        cnn_model, ctx)
    assert set(ctx.records["pruning"]["layers"]) == {"3", "7"}
    assert annotation.sparsity(cnn_model.layer("0").node) is None


# --- allocation and masks, on their own -----------------------------------------------------------
def test_global_ratios_meet_the_parameter_weighted_target():
    rng = np.random.default_rng(0)
    scores = {"a": rng.random(1000), "b": rng.random(100) ** 3, "c": rng.random(10)}
    got = ratios.global_ratios(scores, 0.6, 0.9)
    assert sum(got[k] * v.size for k, v in scores.items()) / 1110 == pytest.approx(0.6, abs=2e-3)
    assert max(got.values()) <= 0.9


def test_importance_ratios_keep_more_of_important_layers():
    got = ratios.importance_ratios({"a": 1.0, "b": 4.0, "c": 0.1}, {"a": 100, "b": 100, "c": 800}, 0.5, 0.95)
    assert got["b"] <= got["a"] < got["c"] <= 0.95
    assert (got["a"] * 100 + got["b"] * 100 + got["c"] * 800) / 1000 == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(UsageError, match="max_layer_sparsity"):
        ratios.importance_ratios({"a": 1.0}, {"a": 10}, 0.95, 0.9)


def test_n_m_mask_keeps_the_largest():
    scores = np.array([[4.0, 1.0, 3.0, 2.0, 0.1, 0.2, 0.4, 0.3]])
    assert ratios.n_m_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, False, True, True]]
