"""``quantize``: materialize the bits annotations (``materialize.py``) with the calibrated ranges.

Per layer (``bits.weight`` / ``bits.activation`` / ``format.weight`` annotations; unannotated means
8/8): int8 QDQ with the ``activation-ranges`` of ``calibrate``, fp32, weight-only MatMulNBits or
blocked DequantizeLinear, or packed low-bit storage; see ``materialize`` for what each becomes and
what is refused. The pass is functional: it returns a new ``Model``. On a target whose backend
lowers the bits annotations itself (TVM), it leaves the model as it is.
"""

from __future__ import annotations

from typing import Any

from bitpass.frontend import Model
from bitpass.frontend.errors import UsageError
from bitpass.passes.analyses import ACTIVATION_RANGES, QUANTIZED
from bitpass.passes.infra import PRESERVE_ALL, Pass, PassContext, PassResult
from bitpass.passes.materialize import (
    FLOAT_BITS,
    FP32,
    INT8_QDQ,
    MATMUL_NBITS,
    Decision,
    QuantizeOptions,
    decide,
    materialize,
)


class Quantize(Pass):
    """Quantize to int8 QDQ (per-channel weights) with calibrated ranges; MatMulNBits / int4 for 2-4-bit layers."""

    name = "quantize"
    Config = QuantizeOptions
    requires = frozenset({ACTIVATION_RANGES})
    produces = frozenset({QUANTIZED})
    in_place = False
    config: QuantizeOptions

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        capabilities = (ctx.target.options or {}).get("capabilities")
        if getattr(capabilities, "lowers_bits", False):
            record = {"format": f"left to the {ctx.target.backend} backend, which lowers the bits annotations to "
                                f"its own kernels"}
            ctx.records["quantization"] = record
            ctx.analyses.put(QUANTIZED, record)
            return PassResult(model, modified=False, preserved=PRESERVE_ALL)
        if cfg.bias_correction and ctx.calibration is None:
            raise UsageError("quantize(bias_correction=true) needs calibration data to estimate layer input means")
        ranges = ctx.analyses.require(ACTIVATION_RANGES)
        decisions = decide(model)  # refuses what cannot be done before any work
        details: dict[str, Any] = {}
        result = materialize(model, ranges=ranges, calibration=ctx.calibration, options=cfg, progress=ctx.progress,
                             details=details)
        record = _record(cfg, ranges.method, decisions, model, result, details)
        ctx.records["quantization"] = record
        ctx.analyses.put(QUANTIZED, record)
        return PassResult(result, modified=True, preserved=frozenset({QUANTIZED}))


def _record(cfg: QuantizeOptions, calibration_method: str, decisions: list[Decision], before: Model,
            after: Model, details: dict[str, Any]) -> dict[str, Any]:
    kept_float: dict[str, str] = details.get("kept_float", {})
    record = {
        "format": "QDQ",
        "weight_type": "int8",
        "activation_type": cfg.activation_type,
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
    if kept_float:
        record["kept_float"] = kept_float
    return record


def _layer_record(d: Decision, kept_float: str | None) -> dict[str, Any]:
    if kept_float is not None:
        return {"op": d.op_type, "result": FP32, "weight_bits": FLOAT_BITS, "activation_bits": FLOAT_BITS,
                "why": kept_float}
    return {"op": d.op_type, "result": d.result if d.result != MATMUL_NBITS else f"matmulnbits-{d.weight_bits}",
            "weight_bits": d.weight_bits, "activation_bits": 8 if d.result == INT8_QDQ else d.activation_bits}


__all__ = ["Quantize"]
