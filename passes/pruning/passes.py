"""The ``prune`` pass: unstructured and N:M weight pruning of the quantizable layers.

Scores (``method=``), each larger = more important:

* ``magnitude``: ``|W|``.
* ``wanda`` (Sun et al. 2023): ``|W_ij| * ||X_j||_2``, with ``||X_j||`` the l2 norm of input feature
  (channel) j over the calibration set, measured in ONNX Runtime (no torch needed).
* ``gblm`` (GBLM-Pruner, Das et al. 2023): ``|W_ij| * (alpha * G_ij + ||X_j||_2)``, the first-order
  Taylor term ``|W * G|`` plus Wanda's term, each divided by its mean over the layer (the paper
  scales G by a constant alpha instead; ``gblm_alpha`` weighs the gradient term, default 1).
  ``G`` is the root mean square of the per-sample gradients of the cross-entropy (labels, or the
  fp32 model's own argmax) on ``model.torch_module``. ``W * G`` is unchanged when a BatchNorm is
  folded into the weight (``W' = sW``, ``G' = G/s``), so the Taylor term taken on the torch weight
  applies to the folded ONNX weight of the same shape.

Comparison group (``comparison=``): ``layer`` (all weights of the layer) or ``row`` (each output
feature's weights, as Wanda and GBLM do on LLMs). ``auto`` is ``layer`` for magnitude; for wanda and
gblm it prunes both ways and keeps the group whose outputs stay closer to the unpruned model on the
calibration data (recorded as ``comparison_output_mse``): per-output wins on LLMs, per-layer on the
small vision models measured here.

Per-layer ratios (``allocation=``), all reaching the same parameter-weighted ``sparsity`` over the
pruned layers: ``uniform``; ``global`` (one threshold over mean-normalised scores); ``ecoflap``
(ECoFLaP, Sung et al. 2023: coarse layer importance, the mean first-order Taylor score
``|W * G|`` of the layer (torch) decides the layer's keep ratio, then local pruning with ``method``
inside the layer); ``sensitivity`` (the ``sensitivity`` annotations: a less sensitive layer keeps
fewer weights). See ``ratios.py``.

Patterns (``pattern=``): ``unstructured``, or ``2:4`` / ``4:8``: in every group of M consecutive
weights along the input dimension (Conv: input channels at each kernel position) keep the N with the
highest score; a layer whose input dimension is not a multiple of M is skipped and says so.

Writes: zeros into the ONNX initializers, ``annotation.set_sparsity(node, zeros / weights)`` per
layer, ``ctx.records["pruning"]`` (per-layer ratios, skipped layers and why), and the masks into the
analysis cache (``pruning:masks``) for ``recover``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pydantic

from bitpass.frontend import Layer, Model, annotation
from bitpass.frontend.errors import UsageError
from bitpass.passes.activations import model_outputs
from bitpass.passes.analyses import PRUNING_MASKS, PRUNING_REFERENCE
from bitpass.passes.infra import DATA_CALIBRATION, Pass, PassConfig, PassContext, PassResult
from bitpass.passes.pruning import ratios
from bitpass.passes.pruning.common import (
    LayerIds,
    feature_scale,
    from_groups_view,
    from_rows_view,
    groups_view,
    input_axis,
    input_norms,
    is_initializer,
    output_axis,
    remember_reference,
    rows_view,
    set_constant,
)

Method = Literal["magnitude", "wanda", "gblm"]
Allocation = Literal["uniform", "global", "ecoflap", "sensitivity"]
Pattern = Literal["unstructured", "2:4", "4:8"]
#: methods that need only the ONNX graph (and, for wanda, ONNX Runtime)
ONNX_METHODS = ("magnitude", "wanda")


class PruneConfig(PassConfig):

    method: Method = "magnitude"
    #: overall fraction of zero weights over the pruned layers (parameter-weighted); N:M fixes it to 1 - N/M
    sparsity: float = pydantic.Field(0.5, ge=0.0, lt=1.0)
    allocation: Allocation = "uniform"
    pattern: Pattern = "unstructured"
    #: which weights compete: auto = layer for magnitude, row (per output feature) for wanda/gblm
    comparison: Literal["auto", "layer", "row"] = "auto"
    #: layer ids to prune (default: every Conv, ConvTranspose, Gemm and MatMul layer)
    layers: LayerIds | None = None
    #: layer ids never pruned
    exclude: LayerIds = pydantic.Field(default_factory=list)
    #: no layer is pruned above this ratio by the non-uniform allocations
    max_layer_sparsity: float = pydantic.Field(0.9, gt=0.0, lt=1.0)
    #: exponent of the layer importance in ecoflap / sensitivity allocation (default 1, sensitivity 0.5)
    allocation_power: float | None = pydantic.Field(None, gt=0)
    #: which sensitivity annotation to use for allocation=sensitivity (default: the only one present)
    sensitivity_method: str | None = None
    #: weight of the gradient term against the activation term in method=gblm
    gblm_alpha: float = pydantic.Field(1.0, ge=0)
    #: calibration samples used for activation norms and gradients (the first ones)
    samples: int = pydantic.Field(128, ge=1)
    batch_size: int = pydantic.Field(64, ge=1)

    @pydantic.model_validator(mode="after")
    def _pattern_fits(self) -> PruneConfig:
        if self.pattern != "unstructured":
            n, m = (int(x) for x in self.pattern.split(":"))
            if "sparsity" in self.model_fields_set and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(f"pattern {self.pattern} fixes the sparsity at {1 - n / m}; leave sparsity out")
            if self.allocation != "uniform":
                raise ValueError(f"pattern {self.pattern} prunes every layer at {1 - n / m}: use allocation=uniform")
        return self


def n_m(pattern: str) -> tuple[int, int] | None:
    if pattern == "unstructured":
        return None
    n, m = (int(x) for x in pattern.split(":"))
    return n, m


def selected_layers(model: Model, wanted: list[str] | None, exclude: list[str],
                    skipped: dict[str, str]) -> list[Layer]:
    """Layers to prune (one per distinct weight), with the reasons others are left out in ``skipped``."""
    layers = model.layers()
    known = {l.id for l in layers}
    unknown = sorted(set(wanted or []) - known) + sorted(set(exclude) - known)
    if unknown:
        raise UsageError(f"no layer {', '.join(map(repr, unknown))}; layers are: {', '.join(sorted(known))}")
    chosen, seen = [], set()
    for layer in layers:
        if layer.id in exclude:
            skipped[layer.id] = "excluded"
            continue
        if wanted is not None and layer.id not in wanted:
            continue
        if wanted is None and layer.op_type == "Gather":
            skipped[layer.id] = "embedding tables are pruned only when named in layers="
            continue
        if not is_initializer(layer.weight):
            skipped[layer.id] = "weight is not an initializer (run fold-constants first)"
            continue
        if id(layer.weight) in seen:
            skipped[layer.id] = "shares its weight with a layer pruned before it"
            continue
        seen.add(id(layer.weight))
        chosen.append(layer)
    return chosen


class Prune(Pass):
    """Zero weights by magnitude, Wanda or gradient x weight (GBLM), unstructured or N:M, with per-layer ratios."""

    name = "prune"
    Config = PruneConfig
    produces = frozenset({PRUNING_MASKS})
    config: PruneConfig

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        cfg = self.config
        needs_data = cfg.method != "magnitude" or cfg.allocation == "ecoflap"
        self.requires = frozenset({DATA_CALIBRATION}) if needs_data else frozenset()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        skipped: dict[str, str] = {}
        self._taylor: dict[str, np.ndarray] = {}
        layers = selected_layers(model, cfg.layers, cfg.exclude, skipped)
        pattern = n_m(cfg.pattern)
        if pattern is not None:
            m = pattern[1]
            for layer in list(layers):
                features = layer.weight_shape[input_axis(layer)]
                if features % m:
                    skipped[layer.id] = f"input dimension {features} is not a multiple of {m}"
                    layers.remove(layer)
        if not layers:
            ctx.records["pruning"] = {"method": cfg.method, "layers": {}, "skipped": skipped}
            ctx.analyses.put(PRUNING_MASKS, dict(ctx.analyses.optional(PRUNING_MASKS) or {}))  # no new masks
            return PassResult(model, modified=False, preserved=frozenset())
        remember_reference(model, ctx.analyses)
        record: dict[str, Any] = {"method": cfg.method, "pattern": cfg.pattern, "allocation": cfg.allocation,
                                  "target_sparsity": 1 - pattern[0] / pattern[1] if pattern else cfg.sparsity}
        scores = self._scores(model, ctx, layers, cfg.method, record)
        layer_ratio = self._ratios(model, ctx, layers, scores, record)
        comparison, masks, measured = self._comparison(model, ctx, layers, scores, layer_ratio, pattern)
        per_layer: dict[str, float] = {}
        zeros = total = 0
        for layer in layers:
            pruned = self._zeroed(layer, masks[layer.id])
            set_constant(layer.weight, pruned)
            layer_zeros = int(np.count_nonzero(pruned == 0))
            ratio = layer_zeros / pruned.size
            annotation.set_sparsity(layer.node, min(ratio, 0.999999))
            per_layer[layer.id] = round(ratio, 6)
            zeros += layer_zeros
            total += pruned.size
        if measured:
            record["comparison_output_mse"] = measured
        record.update(comparison=comparison if pattern is None else f"{cfg.pattern} groups along the input",
                      layers=per_layer, allocated={k: round(v, 6) for k, v in layer_ratio.items()},
                      sparsity=round(zeros / total, 6), pruned_params=total, skipped=skipped)
        ctx.analyses.put(PRUNING_MASKS, {**(ctx.analyses.optional(PRUNING_MASKS) or {}), **masks})
        ctx.records["pruning"] = record
        ctx.progress(f"prune({cfg.method}, {cfg.pattern}, {cfg.allocation}): {len(layers)} layers, "
                     f"overall sparsity {zeros / total:.3f}")
        return PassResult(model, modified=True, preserved=frozenset({PRUNING_MASKS, PRUNING_REFERENCE}))

    # --- masks ----------------------------------------------------------------
    @staticmethod
    def _zeroed(layer: Layer, keep: np.ndarray) -> np.ndarray:
        w = layer.weight_array
        return np.where(keep, w, np.zeros_like(w))

    @staticmethod
    def _mask(layer: Layer, score: np.ndarray, ratio: float, pattern: tuple[int, int] | None,
              comparison: str) -> np.ndarray:
        """Keep-mask of one layer: N:M groups along the input, or the lowest ``ratio`` of each row / the layer."""
        shape = layer.weight_shape
        if pattern is not None:
            axis = input_axis(layer)
            return from_groups_view(ratios.n_m_mask(groups_view(score, axis), *pattern), shape, axis)
        if comparison == "row":
            axis = output_axis(layer)
            return from_rows_view(ratios.row_mask(rows_view(score, axis), ratio), shape, axis)
        return ratios.lowest_mask(score, ratio)

    def _masks(self, layers: list[Layer], scores: dict[str, np.ndarray], layer_ratio: dict[str, float],
               pattern: tuple[int, int] | None, comparison: str) -> dict[str, np.ndarray]:
        return {layer.id: self._mask(layer, scores[layer.id], layer_ratio[layer.id], pattern, comparison)
                for layer in layers}

    def _comparison(self, model: Model, ctx: PassContext, layers: list[Layer], scores: dict[str, np.ndarray],
                    layer_ratio: dict[str, float], pattern: tuple[int, int] | None,
                    ) -> tuple[str, dict[str, np.ndarray], dict[str, float]]:
        """The comparison group, its masks, and with ``auto`` for wanda/gblm the output error of each group.

        Wanda's per-output group wins on LLMs; on small vision models the per-layer group often
        loses less (measured on this project's digits models). So ``auto`` prunes both ways and keeps
        the one whose outputs stay closer to the unpruned model on the calibration data (a tie keeps
        ``row``). Magnitude's ``auto`` is the classic per-layer group, with no data needed."""
        cfg = self.config
        if cfg.comparison != "auto" or cfg.method == "magnitude" or pattern is not None or ctx.calibration is None:
            group = cfg.comparison if cfg.comparison != "auto" else ("layer" if cfg.method == "magnitude" else "row")
            return group, self._masks(layers, scores, layer_ratio, pattern, group), {}
        data = ctx.calibration.head(self.config.samples)
        reference = model_outputs(model, data)
        errors: dict[str, float] = {}
        masks: dict[str, dict[str, np.ndarray]] = {}
        for group in ("row", "layer"):
            masks[group] = self._masks(layers, scores, layer_ratio, None, group)
            trial = model.clone()
            for twin in trial.layers():
                if twin.id in masks[group]:
                    set_constant(twin.weight, self._zeroed(twin, masks[group][twin.id]))
            errors[group] = float(np.mean((model_outputs(trial, data) - reference) ** 2))
        choice = "layer" if errors["layer"] < errors["row"] else "row"
        return choice, masks[choice], {k: float(f"{v:.6g}") for k, v in errors.items()}

    # --- scores ---------------------------------------------------------------
    def _calibration(self, ctx: PassContext, why: str):
        if ctx.calibration is None:
            raise UsageError(f"prune: {why} needs calibration data (--calib FILE)")
        return ctx.calibration.head(self.config.samples)

    def _scores(self, model: Model, ctx: PassContext, layers: list[Layer], method: str,
                record: dict[str, Any]) -> dict[str, np.ndarray]:
        weights = {l.id: np.abs(l.weight_array.astype(np.float64)) for l in layers}
        if method == "magnitude":
            return weights
        if method in ("wanda", "gblm"):
            data = self._calibration(ctx, f"method={method}")
            norms = input_norms(model, data, layers, batch_size=self.config.batch_size)
            record["activation_samples"] = len(data)
            fallback = [l.id for l in layers if l.id not in norms]
            if fallback:
                record["magnitude_fallback"] = fallback  # embedding lookups have no input activations
            wanda = {l.id: weights[l.id] * feature_scale(l, norms[l.id]) if l.id in norms else weights[l.id]
                     for l in layers}
            if method == "wanda":
                return wanda
            taylor = self._taylor_scores(model, ctx, layers, record, "method=gblm")
            self._taylor = taylor
            alpha = self.config.gblm_alpha
            return {k: alpha * taylor[k] / max(float(taylor[k].mean()), 1e-30) + v / max(float(v.mean()), 1e-30)
                    for k, v in wanda.items()}
        raise AssertionError(method)

    def _taylor_scores(self, model: Model, ctx: PassContext, layers: list[Layer], record: dict[str, Any],
                       who: str) -> dict[str, np.ndarray]:
        """``|W * G|`` per weight, G the RMS of per-sample gradients on the torch module."""
        from bitpass.passes.pruning.gradients import taylor_scores

        if model.torch_module is None:
            raise UsageError(f"prune: {who} needs gradients from the torch module the model came from, and this "
                             f"model was imported from ONNX; methods that work on it: method="
                             f"{'|'.join(ONNX_METHODS)} with allocation=uniform|global|sensitivity")
        data = self._calibration(ctx, who)
        scores, info = taylor_scores(model, data, layers)
        record.setdefault("gradients", info)
        return scores

    # --- per-layer ratios -----------------------------------------------------
    def _ratios(self, model: Model, ctx: PassContext, layers: list[Layer], scores: dict[str, np.ndarray],
                record: dict[str, Any]) -> dict[str, float]:
        cfg = self.config
        params = {l.id: l.params for l in layers}
        if cfg.pattern != "unstructured" or cfg.allocation == "uniform":
            return {l.id: cfg.sparsity for l in layers}
        if cfg.allocation == "global":
            return ratios.global_ratios(scores, cfg.sparsity, cfg.max_layer_sparsity)
        if cfg.allocation == "ecoflap":
            coarse = self._taylor if cfg.method == "gblm" else self._taylor_scores(model, ctx, layers, record,
                                                                                   "allocation=ecoflap")
            importance = {k: float(np.mean(coarse[k])) for k in params}
            record["layer_importance"] = {k: float(f"{v:.6g}") for k, v in importance.items()}
            return ratios.importance_ratios(importance, params, cfg.sparsity, cfg.max_layer_sparsity,
                                            cfg.allocation_power or 1.0)
        importance = self._sensitivity(layers)
        record["layer_importance"] = {k: float(f"{v:.6g}") for k, v in importance.items()}
        return ratios.importance_ratios(importance, params, cfg.sparsity, cfg.max_layer_sparsity,
                                        cfg.allocation_power or 0.5)

    def _sensitivity(self, layers: list[Layer]) -> dict[str, float]:
        """Each layer's sensitivity annotation (written by the ``sensitivity`` pass, survives a save)."""
        found = {l.id: annotation.sensitivities(l.node) for l in layers}
        methods = sorted({m for v in found.values() for m in v})
        method = self.config.sensitivity_method
        if method is None:
            if not methods:
                raise UsageError("prune: allocation=sensitivity needs sensitivity annotations: run the "
                                 "sensitivity pass before prune")
            if len(methods) > 1:
                raise UsageError(f"prune: layers carry sensitivities of {', '.join(methods)}: choose one with "
                                 "sensitivity_method=")
            method = methods[0]
        missing = [lid for lid, v in found.items() if method not in v]
        if missing:
            raise UsageError(f"prune: layers {', '.join(missing)} have no {method!r} sensitivity annotation")
        return {lid: float(v[method]) for lid, v in found.items()}
