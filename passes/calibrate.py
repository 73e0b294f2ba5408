"""Activation calibration: per-tensor ranges over the calibration set, computed with ONNX Runtime.

``minmax``, ``percentile`` and ``entropy`` are ONNX Runtime's own calibrators
(``onnxruntime.quantization.calibrate``). ``mse`` is not in ONNX Runtime: it
reuses ONNX Runtime's histogram collection and then picks, per tensor, the
clipping threshold that minimises the expected 8-bit quantization error
(rounding noise inside the range plus clipping error outside it).

The result is an ``ActivationRanges`` put in the analysis cache under
``activation-ranges``; the ``quantize`` pass feeds it to ONNX Runtime's
quantizer as a calibration cache, so ONNX Runtime does not recalibrate.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic

from bitpass.frontend import Dataset, Model
from bitpass.frontend.errors import BitpassError, UsageError
from bitpass.passes.analyses import ACTIVATION_RANGES, ActivationRanges
from bitpass.passes.execution import first_line, quiet
from bitpass.passes.infra import DATA_CALIBRATION, PRESERVE_ALL, Pass, PassConfig, PassContext, PassResult

__all__ = ["ACTIVATION_RANGES", "ActivationRanges", "Calibrate", "activation_ranges", "compute_ranges", "mse_range"]

Method = Literal["minmax", "percentile", "entropy", "mse"]

#: histogram bins per method when ``num_bins`` is not given (ORT's defaults for percentile/entropy)
#: entropy: 512 bins for 128 quantized levels (ORT's default 128/128 can never clip; 2048 takes ~50 s in ORT's Python search)
_DEFAULT_BINS = {"percentile": 2048, "entropy": 512, "mse": 2048}


class _Reader:
    """ORT ``CalibrationDataReader`` over a fixed list of input batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


class Calibrate(Pass):
    """Compute per-tensor activation ranges over the calibration data (minmax, percentile, entropy, mse)."""

    name = "calibrate"

    class Config(PassConfig):
        method: Method = "minmax"
        #: percentile kept (two-sided: half the rest is cut at each end) for ``method=percentile``
        percentile: float = pydantic.Field(99.99, gt=0, le=100)
        #: histogram bins for percentile / entropy / mse (default 2048, entropy 512)
        num_bins: int | None = pydantic.Field(None, ge=8)
        #: use at most this many calibration samples (the first ones)
        max_samples: int | None = pydantic.Field(None, ge=1)
        batch_size: int = pydantic.Field(64, ge=1)

    requires = frozenset({DATA_CALIBRATION})
    produces = frozenset({ACTIVATION_RANGES})
    in_place = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if ctx.calibration is None:
            raise UsageError("calibrate needs calibration data (--calib FILE, or PassContext(calibration=...))")
        cfg = self.config
        data = ctx.calibration if cfg.max_samples is None else ctx.calibration.head(cfg.max_samples)
        ctx.progress(f"calibrating activations ({cfg.method}) over {len(data)} samples")
        result = activation_ranges(model, data, method=cfg.method, percentile=cfg.percentile, num_bins=cfg.num_bins,
                                   batch_size=cfg.batch_size, data_sha256=ctx.calibration.sha256)
        ctx.analyses.put(ACTIVATION_RANGES, result)
        ctx.records["calibration"] = {"method": cfg.method, "samples": len(data),
                                      "data_sha256": ctx.calibration.sha256, "tensors": len(result), **result.options}
        return PassResult(model, modified=False, preserved=PRESERVE_ALL)


def activation_ranges(model: Model, data: Dataset, *, method: str = "minmax", percentile: float = 99.99,
                      num_bins: int | None = None, batch_size: int = 64,
                      data_sha256: str | None = None) -> ActivationRanges:
    """``compute_ranges`` with the method, options and data that produced them (what ``quantize`` reads).

    ``data_sha256`` names the data set the samples came from (default: ``data``'s own digest)."""
    ranges = compute_ranges(model, data, method=method, percentile=percentile, num_bins=num_bins,
                            batch_size=batch_size)
    options: dict[str, Any] = {}
    if method == "percentile":
        options["percentile"] = percentile
    if method != "minmax":
        options["num_bins"] = num_bins or _DEFAULT_BINS[method]
    return ActivationRanges(method, ranges, len(data), data_sha256 or data.sha256, options)


def compute_ranges(model: Model, data: Dataset, *, method: str = "minmax", percentile: float = 99.99,
                   num_bins: int | None = None, batch_size: int = 64) -> dict[str, tuple[float, float]]:
    """``{tensor: (lo, hi)}`` for every float activation of ``model`` over ``data``, in sorted order."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    kinds = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy, "mse": CalibrationMethod.Entropy}
    bins = num_bins or _DEFAULT_BINS.get(method, 0)
    extra: dict[str, Any] = {}
    if method == "percentile":
        extra = {"num_bins": bins, "percentile": percentile, "symmetric": False}
    elif method in ("entropy", "mse"):
        # mse only borrows the entropy calibrator's histogram collection (signed values, symmetric bins)
        extra = {"num_bins": bins, "num_quantized_bins": 128, "symmetric": False}
    with tempfile.TemporaryDirectory(prefix="bitpass-calib-") as tmp, quiet():
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model.to_bytes())
        try:
            calibrator = create_calibrator(path, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                           calibrate_method=kinds[method], extra_options=extra)
            # one batch per collect_data call: ORT's histogram collector stacks the batches of one call
            # with np.asarray, which fails when the last batch is shorter; histograms merge across calls.
            for batch in data.batches(batch_size):
                calibrator.collect_data(_Reader([batch]))
            if method == "mse":
                histograms = calibrator.collector.get_histogram_dict()
                raw = {name: mse_range(hist[0], hist[1], float(hist[2]), float(hist[3]))
                       for name, hist in histograms.items()}
            else:
                raw = {name: td.range_value for name, td in calibrator.compute_data().items()}
        except BitpassError:
            raise
        except Exception as err:
            raise BitpassError(f"calibration ({method}) failed in ONNX Runtime: {first_line(err)}") from err
    ranges: dict[str, tuple[float, float]] = {}
    for name in sorted(raw):
        lo, hi = (float(np.asarray(v, dtype=np.float64).reshape(-1)[0]) for v in raw[name][:2])
        if not (math.isfinite(lo) and math.isfinite(hi)):
            continue
        ranges[name] = (min(lo, hi), max(lo, hi))
    return ranges


def mse_range(hist: np.ndarray, edges: np.ndarray, lo: float, hi: float, *, bits: int = 8,
              candidates: int = 512) -> tuple[float, float]:
    """The clipping range minimising the expected ``bits``-bit quantization MSE of a histogram.

    Candidates are thresholds ``t`` in (0, max|x|]; the range is ``[max(lo, -t), min(hi, t)]``
    (so a non-negative tensor keeps lo = 0). The error of a candidate is the clipping error
    of the mass outside the range plus uniform rounding noise (scale^2 / 12) inside it.
    """
    hist = np.asarray(hist, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    total = hist.sum()
    amax = max(abs(lo), abs(hi))
    if total <= 0 or amax == 0:
        return (lo, hi)
    centers = (edges[:-1] + edges[1:]) / 2
    weights = hist / total
    t = amax * np.arange(1, candidates + 1, dtype=np.float64) / candidates  # (C,)
    lows = np.maximum(lo, -t)[:, None]
    highs = np.minimum(hi, t)[:, None]
    clipped = np.clip(centers[None, :], lows, highs)
    clip_err = ((centers[None, :] - clipped) ** 2 * weights[None, :]).sum(axis=1)
    inside = ((centers[None, :] >= lows) & (centers[None, :] <= highs)) * weights[None, :]
    scale = (highs[:, 0] - lows[:, 0]) / (2**bits - 1)
    error = clip_err + inside.sum(axis=1) * scale**2 / 12
    best = int(np.argmin(error))  # first minimum: deterministic
    return (float(lows[best, 0]), float(highs[best, 0]))
