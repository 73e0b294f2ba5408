"""The ``sensitivity`` pass: measure how much quantizing each layer hurts, and annotate it.

Methods (``method=``):

* ``hutchinson`` (HAWQ-V2): the **average** Hessian trace per layer, Tr(H_ll) / n_l with n_l the
  layer's weight count (as HAWQ-V2 normalises), from Rademacher Hessian-vector products on
  ``model.torch_module``, sampled until the layer ranking has not changed over the last 5 samples
  and is statistically resolved (neighbours 2 standard errors apart, or both within ``tolerance``
  relative standard error, default 0.1), or ``max_samples``. ``products=block`` (default) uses
  one block product per layer and sample, ``full`` one product for all layers (HAWQ-V2; noisier).
* ``eigenvalue`` (HAWQ): the top eigenvalue of each layer's Hessian block by power iteration
  (``tolerance``: relative change that stops it, default 1e-3; ``max_samples``: iteration cap).
  Not normalised.
* ``fisher``: the mean over the layer's weights of the diagonal empirical Fisher, i.e.
  Tr(F_l) / n_l with per-sample squared gradients (comparable to the average Hessian trace).
* ``taylor``: the second-order loss change of quantizing only that layer to b bits,
  ``0.5 * sum_j F_jj (Q_b(W) - W)_j^2`` with the per-sample empirical Fisher diagonal
  (``curvature=fisher``, default), or the exact ``0.5 * dW^T H_ll dW`` from one Hessian-vector
  product per bit width (``curvature=hessian``).
* ``output-kl`` / ``output-mse``: KL(softmax(fp32) || softmax(quantized)) or MSE of the outputs
  with only that layer fake-quantized, in ONNX Runtime: no torch module and no labels needed.

Gradient methods use cross-entropy on the calibration labels, or, without labels, on the fp32
model's own argmax (pseudo-labels); the record says which. ``Q_b`` is symmetric per-output-channel
``fake_quantize``.

Results: each layer's node gets ``annotation.set_sensitivity(node, method, value)`` (for taylor
and output methods the value at ``bits``). Analyses: ``sensitivity`` is ``{layer_id: value}`` for
hutchinson/eigenvalue/fisher and ``{layer_id: {bits: value}}`` (bits 2, 4, 8 and ``bits``) for
taylor/output methods; ``sensitivity:bits`` is always the per-bit table Omega(layer, bits): measured
for taylor/output methods, HAWQ-V2's ``0.5 * score * ||Q_b(W) - W||^2`` for the others.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
import pydantic
import torch

from bitpass.frontend import Model, annotation
from bitpass.frontend.errors import UsageError
from bitpass.passes.analyses import SENSITIVITY, SENSITIVITY_BITS
from bitpass.passes.infra import DATA_CALIBRATION, PRESERVE_ALL, Pass, PassConfig, PassContext, PassResult
from bitpass.passes.sensitivity import fisher as fisher_mod
from bitpass.passes.sensitivity import hessian
from bitpass.passes.sensitivity.objective import GRADIENT_METHODS, ORT_METHODS, Objective, objective
from bitpass.passes.sensitivity.output import output_sensitivity
from bitpass.passes.sensitivity.quant import TABLE_BITS, fake_quantize

#: methods whose ``sensitivity`` analysis is a per-bit table
PER_BIT_METHODS = ("taylor", *ORT_METHODS)
METHODS = (*GRADIENT_METHODS, *ORT_METHODS)

Method = Literal["auto", "hutchinson", "eigenvalue", "fisher", "taylor", "output-kl", "output-mse"]
DEFAULT_TOLERANCE = {"hutchinson": 0.1, "eigenvalue": 1e-3}


class SensitivityConfig(PassConfig):
    #: auto: hutchinson when the model came from torch (gradients available), else output-kl (ORT only)
    method: Method = "auto"
    #: bit width whose value taylor/output methods write on the node
    bits: int = pydantic.Field(4, ge=2, le=8)
    #: calibration samples used (the first ones)
    samples: int = pydantic.Field(128, ge=1)
    #: hutchinson: relative stderr that counts as a tie (0.1); eigenvalue: relative change that stops (1e-3)
    tolerance: float | None = pydantic.Field(None, gt=0)
    #: hutchinson: most Rademacher samples; eigenvalue: most power iterations
    max_samples: int = pydantic.Field(100, ge=2)
    #: samples per forward pass (Hessian products, ORT runs)
    batch_size: int = pydantic.Field(64, ge=1)
    #: output-kl/-mse: seconds the per-layer runs may take; a slower model is measured on fewer samples (>= 8).
    #: 20 s with suffix runs measures the sentence encoder on as many samples (37) as 30 s did with whole-model
    #: runs (35), 10 s sooner
    time_budget: float | None = pydantic.Field(20.0, gt=0)
    #: output-kl/-mse: measure the lower widths only and scale the highest (8 bits) from the next lower by the
    #: ratio of weight quantization errors (both metrics are quadratic in a small weight perturbation)
    extrapolate: bool = True
    #: taylor: fisher (per-sample empirical Fisher diagonal) or hessian (exact block quadratic form)
    curvature: Literal["fisher", "hessian"] = "fisher"
    #: hutchinson: block (one product per layer, lower variance) or full (one product for all, HAWQ-V2)
    products: Literal["block", "full"] = "block"


def table_bits(bits: int) -> tuple[int, ...]:
    return tuple(sorted({*TABLE_BITS, int(bits)}))


def hawq_table(score: float, weight: np.ndarray, axis: int, bits: tuple[int, ...]) -> dict[int, float]:
    """Omega(l, b) = 0.5 * score * ||Q_b(W) - W||^2 (HAWQ-V2's perturbation with an average curvature)."""
    return fisher_mod.perturbation_table(score, weight, bits, axis)


class Sensitivity(Pass):
    """Annotate every layer with its measured quantization sensitivity (Hessian, Fisher, Taylor or output KL)."""

    name = "sensitivity"
    Config = SensitivityConfig
    requires = frozenset({DATA_CALIBRATION})
    produces = frozenset({SENSITIVITY, SENSITIVITY_BITS})
    config: SensitivityConfig

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self._resolved = self._resolve(model)
        data = ctx.calibration
        if data is None:
            raise UsageError("sensitivity needs calibration data: give --calib FILE, or run synthesize-data first")
        start = time.perf_counter()
        layers = model.layers()
        bits = table_bits(cfg.bits)
        record: dict[str, Any] = {"method": cfg.method, "bits": cfg.bits, "data_sha256": data.sha256,
                                  "data_source": data.source, "layers": len(layers)}
        scores: dict[str, float] = {}
        table: dict[str, dict[int, float]] = {}
        if layers:
            if cfg.method in ORT_METHODS:
                scores, table = self._output(model, ctx, record, bits)
            else:
                scores, table = self._gradient(model, ctx, record, bits)
        for layer in layers:
            annotation.set_sensitivity(layer.node, cfg.method, scores[layer.id])
        ctx.analyses.put(SENSITIVITY, {k: dict(v) for k, v in table.items()} if cfg.method in PER_BIT_METHODS
                         else dict(scores))
        ctx.analyses.put(SENSITIVITY_BITS, table)
        record["seconds"] = round(time.perf_counter() - start, 3)
        ctx.records[SENSITIVITY] = record
        ctx.progress(f"sensitivity({cfg.method}): {len(layers)} layers in {record['seconds']:.2f} s")
        return PassResult(model, modified=bool(layers), preserved=PRESERVE_ALL)

    def _resolve(self, model: Model) -> SensitivityConfig:
        """The config with ``method=auto`` made concrete for this model."""
        if self.config.method != "auto":
            return self.config
        method = "hutchinson" if model.torch_module is not None else "output-kl"
        return self.config.model_copy(update={"method": method})

    # --- ONNX Runtime only -------------------------------------------------
    def _output(self, model: Model, ctx: PassContext, record: dict[str, Any],
                bits: tuple[int, ...]) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
        cfg = self._resolved
        assert ctx.calibration is not None
        metric = cfg.method.split("-", 1)[1]
        result = output_sensitivity(model, ctx.calibration, metric=metric, bits=bits, samples=cfg.samples,
                                    batch_size=cfg.batch_size, progress=ctx.progress, time_budget=cfg.time_budget,
                                    extrapolate=cfg.extrapolate, executor=ctx.executor)
        record.update(samples=result.samples, ort_runs=result.runs, labels="none needed", executor=result.executor,
                      suffix_runs=result.suffix_runs, work_vs_full_runs=result.work)
        if result.reduced:
            record["samples_reduced"] = result.reduced
        if result.extrapolated:
            record["extrapolated"] = {str(b): f"scaled from {m} bits by the weight-error ratio"
                                      for b, m in sorted(result.extrapolated.items())}
        if result.shared:
            record["shared_weights"] = result.shared
        return {k: v[cfg.bits] for k, v in result.table.items()}, result.table

    # --- torch -------------------------------------------------------------
    def _gradient(self, model: Model, ctx: PassContext, record: dict[str, Any],
                  bits: tuple[int, ...]) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
        cfg = self._resolved
        assert ctx.calibration is not None
        generator = torch.Generator().manual_seed(int(ctx.seed))
        with objective(model, ctx.calibration, samples=cfg.samples, method=cfg.method) as obj:
            record.update(samples=len(obj), labels=obj.label_source)
            differ = _weights_differ(model, obj)
            if differ:
                record["torch_weights_differ"] = differ
            weights = obj.weight_arrays()
            per_param: list[float]
            measured: list[dict[int, float]] | None = None
            if cfg.method == "hutchinson":
                op = hessian.HessianOperator(obj.batch_losses(cfg.batch_size), obj.params)
                est = hessian.hutchinson_trace(op, tolerance=cfg.tolerance or DEFAULT_TOLERANCE["hutchinson"],
                                               max_samples=cfg.max_samples, generator=generator,
                                               block_diagonal=cfg.products == "block",
                                               progress=ctx.progress)
                per_param = est.average
                record.update(hutchinson_samples=est.samples, max_samples=cfg.max_samples,
                              converged=est.converged, stop_reason=est.reason,
                              kendall_tau=round(est.kendall_tau, 4),
                              relative_stderr={lid: _rel(est.stderr[obj.index[lid]], est.trace[obj.index[lid]])
                                               for lid in obj.layer_ids},
                              normalisation="average trace Tr(H_l)/n_l")
            elif cfg.method == "eigenvalue":
                op = hessian.HessianOperator(obj.batch_losses(cfg.batch_size), obj.params)
                eig = hessian.top_eigenvalues(op, tolerance=cfg.tolerance or DEFAULT_TOLERANCE["eigenvalue"],
                                              max_iterations=cfg.max_samples, generator=generator)
                per_param = eig.eigenvalue
                record.update(iterations={lid: eig.iterations[obj.index[lid]] for lid in obj.layer_ids},
                              converged=all(eig.converged), hessian_products=eig.products)
            elif cfg.method == "fisher":
                diag, used = fisher_mod.empirical_fisher(obj.chunk_losses(1), obj.params)
                per_param = fisher_mod.fisher_scores(diag)
                record.update(gradients=used, normalisation="mean of the diagonal empirical Fisher Tr(F_l)/n_l")
            else:  # taylor
                measured = self._taylor(obj, weights, bits, record)
                per_param = [m[cfg.bits] for m in measured]
        scores = {lid: float(per_param[obj.index[lid]]) for lid in obj.layer_ids}
        if measured is not None:
            table = {lid: dict(measured[obj.index[lid]]) for lid in obj.layer_ids}
        else:
            table = {lid: hawq_table(per_param[obj.index[lid]], weights[obj.index[lid]], obj.axes[obj.index[lid]],
                                     bits) for lid in obj.layer_ids}
        return scores, table

    def _taylor(self, obj: Objective, weights: list[np.ndarray], bits: tuple[int, ...],
                record: dict[str, Any]) -> list[dict[int, float]]:
        cfg = self._resolved
        deltas = {b: [fake_quantize(w, b, axis) - w for w, axis in zip(weights, obj.axes)] for b in bits}
        out: list[dict[int, float]] = [{} for _ in weights]
        if cfg.curvature == "fisher":
            diag, used = fisher_mod.empirical_fisher(obj.chunk_losses(1), obj.params)
            for b in bits:
                for i, d in enumerate(deltas[b]):
                    out[i][b] = fisher_mod.taylor_delta_loss(diag[i], d)
            record.update(curvature="per-sample empirical Fisher diagonal", gradients=used)
        else:
            op = hessian.HessianOperator(obj.batch_losses(cfg.batch_size), obj.params)
            for b in bits:
                forms = hessian.block_quadratic_forms(
                    op, [torch.from_numpy(d).to(p.dtype) for d, p in zip(deltas[b], obj.params)])
                for i, f in enumerate(forms):
                    out[i][b] = 0.5 * float(f or 0.0)
            record.update(curvature="exact block Hessian quadratic form", hessian_products=op.products)
        return out


def _rel(stderr: float, mean: float) -> float | None:
    return round(float(stderr / abs(mean)), 4) if mean and np.isfinite(stderr) else None


def _weights_differ(model: Model, obj: Objective) -> list[str]:
    """Layers whose torch weight is not the ONNX weight (e.g. after BatchNorm folding)."""
    differ = []
    for layer in model.layers():
        w = obj.params[obj.index[layer.id]].detach().cpu().numpy()
        onnx_w = layer.weight_array
        if w.shape != onnx_w.shape or not np.allclose(w, onnx_w, rtol=1e-4, atol=1e-6):
            differ.append(layer.id)
    return differ
