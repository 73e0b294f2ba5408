"""``quantize``: materialize the bits annotations (``materialize.py``) with the calibrated ranges.

Per layer (``bits.weight`` / ``bits.activation`` / ``format.weight`` annotations; unannotated means
8/8): int8 QDQ with the ``activation-ranges`` of ``calibrate`` (at 8 bits, or 2/4-bit storage with
int8 compute), dynamic int8, fp32, weight-only MatMulNBits or blocked DequantizeLinear, or packed
low-bit storage; see ``materialize`` for what each becomes and what is refused.

Nothing about the CPU is assumed: with ``search`` on (the default) and a target that times whole
models (``ctx.target.options["latency_probe"].graphs``), the int8 flavour (U8S8, S8S8, 7-bit
weights) is chosen by timing the whole artifact in each flavour, each checked for saturation on
calibration samples, and the plan is repaired where int8 does not pay (``format_search.py``):
layers back to fp32 (packed at their width when an allocation set it). The record says what was
timed and chosen. The pass is functional: it returns a new ``Model``. On a target whose backend
lowers the bits annotations itself (TVM), it leaves the model as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pydantic

from bitpass.frontend import Model, annotation
from bitpass.frontend.errors import BitpassError, UsageError
from bitpass.passes import execution, format_search
from bitpass.passes.analyses import ACTIVATION_RANGES, BITS, LATENCY_VARIANTS, QUANTIZED
from bitpass.passes.infra import PRESERVE_ALL, Pass, PassContext, PassResult
from bitpass.passes.int8_flavours import FLAVOURS, U8S8_REDUCED
from bitpass.passes.materialize import (
    DYNAMIC,
    FLOAT_BITS,
    FP32,
    INT8_QDQ,
    MATMUL_NBITS,
    PACKED,
    Decision,
    QuantizeOptions,
    decide,
    materialize,
)


class QuantizeConfig(QuantizeOptions):
    """The ``quantize`` pass's options: how layers are quantized, and whether the target's timings choose."""

    #: time whole candidate artifacts on the target to choose the int8 flavour and repair the plan
    search: bool = True
    #: batch sizes the whole-graph search times (the first axis of the calibration data)
    search_batches: list[int] = pydantic.Field(default_factory=lambda: [1, 8])


class Quantize(Pass):
    """Quantize with calibrated ranges (int8 QDQ / dynamic / MatMulNBits / packed); int8 flavour timed on the target."""

    name = "quantize"
    Config = QuantizeConfig
    requires = frozenset({ACTIVATION_RANGES})
    produces = frozenset({QUANTIZED})
    in_place = False
    config: QuantizeConfig

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        capabilities = (ctx.target.options or {}).get("capabilities")
        if getattr(capabilities, "lowers_bits", False):
            record = {"format": f"left to the {ctx.target.backend} backend, which lowers the bits annotations to "
                                f"its own kernels"}
            if not any(annotation.weight_bits(layer.node) not in (None, annotation.FLOAT_BITS)
                       for layer in model.layers()):
                # this backend reads bits annotations only: with none below 32 every layer stays fp32, where the
                # same pipeline on ONNX Runtime quantizes to int8; say so rather than ship fp32 quietly
                record["note"] = (f"no layer has a bits annotation below 32: the {ctx.target.backend} artifact is "
                                  f"fp32; for int8 add set-bits(weight=8) to the pipeline or give --budget")
                ctx.progress(f"quantize: {record['note']}")
            ctx.records["quantization"] = record
            ctx.analyses.put(QUANTIZED, record)
            return PassResult(model, modified=False, preserved=PRESERVE_ALL)
        if cfg.bias_correction and ctx.calibration is None:
            raise UsageError("quantize(bias_correction=true) needs calibration data to estimate layer input means")
        ranges = ctx.analyses.require(ACTIVATION_RANGES)
        decisions = decide(model)  # refuses what cannot be done before any work
        probe = (ctx.target.options or {}).get("latency_probe")
        searched: dict[str, Any] | None = None
        details: dict[str, Any] = {}
        activation_type = "uint8" if cfg.activation_type == "uint8" else "int8"
        options = QuantizeOptions(**{k: v for k, v in cfg.model_dump().items() if k in QuantizeOptions.model_fields})
        pinned = (ctx.target.options or {}).get("int8_flavour")  # a re-run (the quality gate's) keeps the choice
        replayed = (ctx.target.options or {}).get("search_replay")  # ... the whole searched plan, when it has one
        if not isinstance(replayed, format_search.Replay) or ctx.calibration is None:
            replayed = None
        int8_work = ctx.calibration is not None and any(d.result in (INT8_QDQ, DYNAMIC) for d in decisions)
        # a size plan whose allocation timed its formats and chose no int8 compute: its merged twin (int8 compute on
        # the widened codes) is still a candidate of the search
        merge_packed = bool((ctx.records.get("allocation") or {}).get("latency_measured")) \
            and ctx.analyses.cached(BITS)
        packed_could_compute = not int8_work and merge_packed and ctx.calibration is not None and cfg.search \
            and hasattr(probe, "graphs")
        via_format_search = replayed is not None or (
            (int8_work or packed_could_compute) and (pinned in FLAVOURS or (cfg.search and hasattr(probe, "graphs"))))
        if replayed is not None:
            found = format_search.replay(model, replayed, ranges=ranges, calibration=ctx.calibration, options=options)
            result, activation_type = found.model, found.flavour.activation_type
            decisions = [_final(d, found.plan) for d in decisions]
            details["replayed"] = found.record
        elif via_format_search and pinned in FLAVOURS:
            flavour = FLAVOURS[pinned]
            result = format_search.materialize_in(model, format_search.plan_of(model), flavour, ranges,
                                                  ctx.calibration, options)
            activation_type = flavour.activation_type
        elif via_format_search:
            found = format_search.search(
                model, ranges=ranges, calibration=ctx.calibration, options=options, timer=probe,
                layer_times=lambda wanted: _layer_times(probe, model, wanted, ctx, cfg.search_batches),
                fallback=PACKED if ctx.analyses.cached(BITS) else FP32, batches=tuple(cfg.search_batches),
                progress=ctx.progress, keep_fp32=(ctx.records.get("allocation") or {}).get("keep_fp32", ()),
                merge_packed=merge_packed)
            result, searched, activation_type = found.model, found.record, found.flavour.activation_type
            decisions = [_final(d, found.plan) for d in decisions]
        else:
            result = materialize(model, ranges=ranges, calibration=ctx.calibration,
                                 options=options.model_copy(update={"activation_type": activation_type}),
                                 progress=ctx.progress, details=details)
            refused = _refused_by_runtime(result) if activation_type == "int8" and int8_work else None
            if refused:  # ORT's Q/DQ rewrites break some S8 graphs at opset 21+: 7-bit U8S8 never saturates
                flavour = U8S8_REDUCED
                ctx.progress(f"quantize: ONNX Runtime refuses the S8S8 model ({refused[:120]}); using "
                             f"{flavour.name}")
                result = format_search.materialize_in(model, format_search.plan_of(model), flavour, ranges,
                                                      ctx.calibration, options)
                activation_type = flavour.activation_type
                details["flavour_fallback"] = f"{flavour.name}: ONNX Runtime refused S8S8 ({refused})"
            if not int8_work and cfg.search and hasattr(probe, "graphs") and ctx.calibration is not None:
                # packed / fp32 layers only: no search ran, but ORT's load-time fusions are still chosen by timing
                # (SkipLayerNormalization made a packed transformer 0.95x fp32 on an AVX-512 EPYC)
                fusions = format_search.choose_session_fusions(result, ctx.calibration, probe,
                                                               batches=cfg.search_batches,
                                                               progress=lambda m: ctx.progress(f"quantize: {m}"))
                if fusions:
                    details["session_fusions"] = fusions
        if via_format_search:  # materialized by the format-search core: the scope as the plan's graph gives it,
            details["int8_scope"] = _scope_record(model, ranges, decisions)  # and the layers kept float, read
            details["kept_float"] = _kept_float_in(result, decisions)  # back from the annotations
        record = _record(cfg, activation_type, ranges.method, decisions, model, result, details)
        if replayed is not None:
            record["search_replayed"] = details["replayed"]
        elif via_format_search and pinned in FLAVOURS:
            record["flavour_pinned"] = f"{pinned}, as chosen by the first run's format search"
        if searched is not None:
            record["search"] = searched
            if searched.get("note"):
                ctx.progress(f"quantize: {searched['note']}")
        elif cfg.activation_type == "auto":
            record["activation_type_why"] = ("int8 (S8S8): nothing was timed on the target (no whole-model timer, "
                                              "no calibration data or search off), and int8 never saturates")
        ctx.records["quantization"] = record
        ctx.analyses.put(QUANTIZED, record)
        return PassResult(result, modified=True, preserved=frozenset({QUANTIZED}))


def _refused_by_runtime(model: Model) -> str | None:
    """Why ONNX Runtime cannot load ``model`` with its default graph rewrites, or None when it can."""
    try:
        execution.create_session(model, purpose="load the quantized model")
    except BitpassError as err:
        return str(err)
    return None


def _layer_times(probe: Any, model: Model, wanted: Mapping[str, Sequence[tuple[int, str]]], ctx: PassContext,
                 batches: Sequence[int]) -> Mapping[str, Any]:
    """Per-layer timings for the search's repairs: the allocation's table when it has every layer, else the
    probe at the search's batch sizes."""
    from bitpass.passes.allocation.passes import call_probe

    if ctx.analyses.cached(LATENCY_VARIANTS):
        table = ctx.analyses.require(LATENCY_VARIANTS)
        if all(lid in table and all(v in table[lid] for v in variants) for lid, variants in wanted.items()):
            return table
    return call_probe(probe, model, wanted, ctx, batches=tuple(batches))


def _final(decision: Decision, plan: Mapping[str, Any]) -> Decision:
    """The decision as the search left it (a layer it moved to fp32, packed or dynamic)."""
    from dataclasses import replace

    entry = plan.get(decision.layer_id)
    if entry is None:
        return decision
    if entry.weight_bits >= 32:
        return replace(decision, weight_bits=32, activation_bits=32, result=FP32)
    if entry.format == "packed":
        return replace(decision, weight_bits=entry.weight_bits, activation_bits=32, result=PACKED)
    if entry.format == "dynamic":
        return replace(decision, weight_bits=entry.weight_bits, activation_bits=8, result=DYNAMIC)
    if entry.format in ("qdq", None) and decision.result in (FP32, PACKED, DYNAMIC):  # the merged plan's int8 layers
        return replace(decision, weight_bits=entry.weight_bits, activation_bits=8, result=INT8_QDQ)
    return decision


def _scope_record(model: Model, ranges: Any, decisions: list[Decision]) -> dict[str, Any]:
    """The int8 scope (``quant_scope``) of ``model``'s graph for its int8 layers."""
    from bitpass.passes.quant_scope import GraphFacts, quant_scope

    int8 = {d.node_name for d in decisions if d.result == INT8_QDQ}
    return quant_scope(GraphFacts.from_graph(model.graph), ranges=ranges.ranges.keys(), int8_nodes=int8).record()


def _kept_float_in(model: Model, decisions: list[Decision]) -> dict[str, str]:
    """Layers planned int8 that the materialized ``model`` keeps in fp32 (its annotations say so)."""
    from bitpass.frontend import annotation

    planned = {d.layer_id for d in decisions if d.result in (INT8_QDQ, DYNAMIC)}
    return {layer.id: "the int8 scope kept it float (see int8_scope)" for layer in model.layers()
            if layer.id in planned and annotation.weight_bits(layer.node) == FLOAT_BITS}


def _record(cfg: QuantizeOptions, activation_type: str, calibration_method: str, decisions: list[Decision],
            before: Model, after: Model, details: dict[str, Any]) -> dict[str, Any]:
    kept_float: dict[str, str] = details.get("kept_float", {})
    record = {
        "format": "QDQ",
        "weight_type": "int8",
        "activation_type": activation_type,
        "per_channel": cfg.per_channel,
        "symmetric_activations": cfg.symmetric_activations,
        "reduce_range": cfg.reduce_range,
        "bias_correction": cfg.bias_correction,
        "preprocessed": cfg.preprocess,
        "calibration_method": calibration_method,
        "weight_only": {"block_size": cfg.block_size, "accuracy_level": cfg.accuracy_level,
                        "symmetric": cfg.weight_only_symmetric},
        "weight_bytes": {"before": before.weight_bytes(), "after": after.weight_bytes()},
        "notes": after.provenance.notes[len(before.provenance.notes):],
        "layers": {d.layer_id: _layer_record(d, kept_float.get(d.layer_id)) for d in decisions},
    }
    if "int8_scope" in details:
        record["int8_scope"] = details["int8_scope"]
    if "flavour_fallback" in details:
        record["flavour_fallback"] = details["flavour_fallback"]
    if "session_fusions" in details:
        record["session_fusions"] = details["session_fusions"]
    if kept_float:
        record["kept_float"] = kept_float
    return record


def _layer_record(d: Decision, kept_float: str | None) -> dict[str, Any]:
    if kept_float is not None:
        return {"op": d.op_type, "result": FP32, "weight_bits": FLOAT_BITS, "activation_bits": FLOAT_BITS,
                "why": kept_float}
    return {"op": d.op_type, "result": d.result if d.result != MATMUL_NBITS else f"matmulnbits-{d.weight_bits}",
            "weight_bits": d.weight_bits, "activation_bits": 8 if d.result in (INT8_QDQ, DYNAMIC) else d.activation_bits}


__all__ = ["Quantize", "QuantizeConfig"]
