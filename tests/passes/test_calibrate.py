"""calibrate: per-tensor activation ranges with ONNX Runtime (minmax, percentile, entropy) and our MSE search."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.frontend import UsageError, from_arrays, from_proto
from bitpass.passes.calibrate import ACTIVATION_RANGES, ActivationRanges, Calibrate, mse_range
from bitpass.passes.infra import PassContext
from bitpass.passes.pipeline import Pipeline

SCALE = np.float32(2.0)


def _model():
    """x -> relu = Relu(x) -> out = relu @ W (W = 2 * identity): activations with a known distribution."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32) * SCALE, "fc.weight")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["relu"], name="relu"),
         helper.make_node("MatMul", ["relu", "fc.weight"], ["out"], name="fc")],
        "known", [x], [y], [weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return from_proto(proto, name="known")


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    """Gaussian activations plus a few far outliers on both sides."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, size=(4000, 4)).astype(np.float32)
    x[7, 0], x[1234, 2], x[3999, 3] = 40.0, -30.0, 25.0
    return x


def _ranges(samples: np.ndarray, **options) -> tuple[ActivationRanges, PassContext]:
    model = _model()
    ctx = PassContext(calibration=from_arrays({"x": samples}, model.inputs))
    before = model.to_bytes()
    out = Pipeline([Calibrate(**options)]).run(model, ctx)
    assert out is model and out.to_bytes() == before  # the graph is untouched
    return ctx.analyses.require(ACTIVATION_RANGES), ctx


def test_minmax_is_the_true_min_and_max(samples):
    ranges, ctx = _ranges(samples)
    relu = np.maximum(samples, 0)
    assert ranges["x"] == (float(samples.min()), float(samples.max()))
    assert ranges["relu"] == (0.0, float(relu.max()))
    assert ranges["out"] == pytest.approx((0.0, float((relu * SCALE).max())))
    assert ranges.method == "minmax" and ranges.samples == len(samples)
    record = ctx.records["calibration"]
    assert record["method"] == "minmax" and record["samples"] == 4000
    assert record["data_sha256"] == ctx.calibration.sha256


def _fake_quant_mse(values: np.ndarray, lo: float, hi: float) -> float:
    scale = (hi - lo) / 255
    q = np.round((np.clip(values, lo, hi) - lo) / scale) * scale + lo
    return float(np.mean((values - q) ** 2))


@pytest.mark.parametrize("method,options", [("percentile", {"percentile": 99.9}), ("entropy", {}), ("mse", {})])
def test_histogram_methods_stay_inside_minmax(samples, method, options):
    minmax, _ = _ranges(samples)
    ranges, ctx = _ranges(samples, method=method, **options)
    assert ctx.records["calibration"]["method"] == method
    for tensor in ("x", "relu", "out"):
        lo, hi = ranges[tensor]
        mlo, mhi = minmax[tensor]
        assert mlo - 1e-6 <= lo <= hi <= mhi + 1e-6, (tensor, (lo, hi), (mlo, mhi))
    assert ranges["relu"][0] == pytest.approx(0.0, abs=1e-6)  # a non-negative tensor keeps lo = 0
    if method != "mse":
        # the three outliers (-30, +25, +40) are clipped, the Gaussian bulk is kept
        lo, hi = ranges["x"]
        assert -20 < lo < -2.0 and 2.0 < hi < 20, (method, lo, hi)


def test_mse_range_has_the_lowest_quantization_error(samples):
    ranges = {m: _ranges(samples, method=m, **o)[0]["x"] for m, o in
              [("minmax", {}), ("percentile", {"percentile": 99.9}), ("entropy", {}), ("mse", {})]}
    errors = {m: _fake_quant_mse(samples, *r) for m, r in ranges.items()}
    assert errors["mse"] <= 1.02 * min(errors.values()), errors


def test_percentile_is_ordered_by_the_percentile(samples):
    loose, _ = _ranges(samples, method="percentile", percentile=99.999)
    tight, _ = _ranges(samples, method="percentile", percentile=99.0)
    assert loose["x"][0] <= tight["x"][0] < tight["x"][1] <= loose["x"][1]
    assert tight["x"][1] == pytest.approx(np.percentile(samples, 99.5), rel=0.1)


def test_same_data_gives_identical_ranges(samples):
    for method in ("minmax", "mse"):
        first, _ = _ranges(samples, method=method)
        second, _ = _ranges(samples, method=method)
        assert first.ranges == second.ranges


def test_max_samples_uses_the_first_samples(samples):
    ranges, ctx = _ranges(samples, max_samples=100)
    assert ranges["x"] == (float(samples[:100].min()), float(samples[:100].max()))
    assert ctx.records["calibration"]["samples"] == 100


def test_mse_range_keeps_a_uniform_distribution_and_clips_a_heavy_tail():
    uniform = np.random.default_rng(1).uniform(-1, 1, 100_000)
    hist, edges = np.histogram(uniform, bins=2048, range=(-1, 1))
    lo, hi = mse_range(hist, edges, float(uniform.min()), float(uniform.max()))
    assert lo < -0.97 and hi > 0.97
    # one sample in a million at 100: clipping it costs less than the coarser rounding it would force
    heavy = np.concatenate([np.random.default_rng(2).normal(0, 1, 1_000_000), [100.0]])
    hist, edges = np.histogram(heavy, bins=2048, range=(-100, 100))
    lo, hi = mse_range(hist, edges, float(heavy.min()), float(heavy.max()))
    assert 2 < hi < 90 and lo == pytest.approx(heavy.min())
    assert _fake_quant_mse(heavy, lo, hi) < _fake_quant_mse(heavy, heavy.min(), heavy.max())


def test_missing_calibration_data_is_a_clear_error():
    with pytest.raises(UsageError, match="calibration"):
        Pipeline([Calibrate()]).run(_model(), PassContext())


def test_bad_options_are_usage_errors():
    with pytest.raises(UsageError, match="method"):
        Calibrate(method="kl")
    with pytest.raises(UsageError, match="unknown option"):
        Calibrate(bins=3)


def test_ranges_convert_to_onnxruntime_tensors_data(samples):
    from onnxruntime.quantization.calibrate import CalibrationMethod

    ranges, _ = _ranges(samples, method="percentile")
    data = ranges.to_tensors_data()
    assert data.calibration_method == CalibrationMethod.MinMax
    assert set(data.keys()) == set(ranges)
    assert float(data["x"].range_value[1]) == pytest.approx(ranges["x"][1])
