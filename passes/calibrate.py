"""Activation calibration: per-tensor ranges over the calibration set, computed with ONNX Runtime.

``percentile`` and ``entropy`` are ONNX Runtime's own calibrators
(``onnxruntime.quantization.calibrate``). ``mse`` is not in ONNX Runtime: it
reuses ONNX Runtime's histogram collection and then picks, per tensor, the
clipping threshold that minimises the expected 8-bit quantization error
(rounding noise inside the range plus clipping error outside it). ``minmax``
computes what ONNX Runtime's MinMax calibrator does (every float tensor's
lowest and highest value, by ReduceMin/ReduceMax nodes added to the graph),
but from a clone that shares the weights and through one session: ORT's
calibrator holds three more copies of the model (loaded, shape-inferred,
augmented), which on a BERT-base-size model was 6 GB of the compile's peak.

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
import onnx_ir as ir
import pydantic

from bitpass.frontend import Dataset, Model
from bitpass.frontend.errors import BitpassError, UsageError
from bitpass.passes.analyses import ACTIVATION_RANGES, ActivationRanges
from bitpass.passes.execution import UNOPTIMIZED, create_session, first_line, quiet
from bitpass.passes.quant_scope import GraphFacts, detect_profile, profile_op_types
from bitpass.passes.structure import float_values, typed_skeleton
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

    if method == "minmax":
        return minmax_ranges(model, data, batch_size=batch_size)
    kinds = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy, "mse": CalibrationMethod.Entropy}
    bins = num_bins or _DEFAULT_BINS.get(method, 0)
    extra: dict[str, Any] = {}
    if method == "percentile":
        extra = {"num_bins": bins, "percentile": percentile, "symmetric": False}
    elif method in ("entropy", "mse"):
        # mse only borrows the entropy calibrator's histogram collection (signed values, symmetric bins)
        extra = {"num_bins": bins, "num_quantized_bins": 128, "symmetric": False}
    # histograms only of the tensors int8 QDQ may quantize (its scope's operator types): on a transformer that
    # leaves out the attention mask, whose -inf ORT's histogram collector cannot bin, and most of the memory
    op_types = sorted(profile_op_types(detect_profile(GraphFacts.from_graph(model.graph))[0]))
    with tempfile.TemporaryDirectory(prefix="bitpass-calib-") as tmp, quiet():
        path = Path(tmp) / "model.onnx"
        model.save(path)  # past 2 GiB with external data beside it, and ORT's calibrator told so
        try:
            calibrator = create_calibrator(path, op_types, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                           calibrate_method=kinds[method], extra_options=extra,
                                           use_external_data_format=not model.fits_one_proto())
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


def minmax_ranges(model: Model, data: Dataset, *, batch_size: int = 64) -> dict[str, tuple[float, float]]:
    """``{tensor: (lo, hi)}`` of every float tensor a node reads or writes (initializers aside) over ``data``.

    The same tensors and values as ONNX Runtime's MinMax calibrator, with one copy of the weights in ORT's
    session and none in Python beyond the model itself."""
    typed = typed_skeleton(model.ir)
    floats = float_values(typed)
    constants = {t.name for t in typed.graph.initializer}
    wanted = sorted({name for node in typed.graph.node for name in (*node.input, *node.output)
                     if name and name in floats and name not in constants})
    del typed
    augmented = model.ir.clone()
    graph = augmented.graph
    values = {v.name: v for node in graph for v in node.outputs if v.name}
    values.update({v.name: v for v in graph.inputs if v.name})
    outputs: list[str] = []
    first = next(iter(graph), None)
    for name in wanted:
        value = values.get(name)
        if value is None:
            continue
        reducers = []
        for op in ("ReduceMin", "ReduceMax"):
            node = ir.Node("", op, [value], [ir.Attr("keepdims", ir.AttributeType.INT, 0)],
                           name=f"{name}__calibrate_{op}", num_outputs=1)
            node.outputs[0].name = f"{name}__{op}"
            node.outputs[0].type = ir.TensorType(value.dtype or ir.DataType.FLOAT)
            node.outputs[0].shape = ir.Shape([])
            reducers.append(node)
            graph.outputs.append(node.outputs[0])
        # right after the producer, so ORT frees each tensor as soon as its consumers ran (at the end of the
        # graph they would all stay alive: 8 GB of activations on BERT-base at batch 64)
        producer = value.producer()
        if producer is not None:
            graph.insert_after(producer, reducers)
        elif first is not None:
            graph.insert_before(first, reducers)
        else:
            graph.extend(reducers)
        outputs.append(name)
    # the augmented model shares the weights; the session factory serializes it, or past 2 GiB saves it with
    # external data and loads it by path
    source = Model(augmented, model.provenance)
    del augmented, graph, values
    # ORT's default order ran every reducer after the whole graph, keeping all activations alive (3.5 GB on
    # BERT-base at batch 16); priority-based order runs each one right after its tensor's producer
    session = create_session(source, config={**UNOPTIMIZED, "execution_order": "PRIORITY_BASED"},
                             purpose="calibrate the model (minmax)")
    del source
    fetch = [f"{name}__{op}" for name in outputs for op in ("ReduceMin", "ReduceMax")]
    low = np.full(len(outputs), np.inf)
    high = np.full(len(outputs), -np.inf)
    try:
        for batch in data.batches(batch_size):
            got = session.run(fetch, dict(batch))
            low = np.minimum(low, np.array([float(v) for v in got[0::2]]))
            high = np.maximum(high, np.array([float(v) for v in got[1::2]]))
    except Exception as err:  # ORT raises its own exception types
        raise BitpassError(f"calibration (minmax) failed in ONNX Runtime: {first_line(err)}") from err
    return {name: (float(lo), float(hi)) for name, lo, hi in sorted(zip(outputs, low, high))
            if math.isfinite(lo) and math.isfinite(hi)}


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
