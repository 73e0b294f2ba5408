"""Which materialization a layer gets at a given width: the fastest one measured on the target.

A width can be materialized several ways (see ``passes/materialize.py``): int8
QDQ compute, ORT's MatMulNBits, blocked DequantizeLinear, or ``packed``
storage that ONNX Runtime unpacks once at load and then runs at exactly fp32
speed. Bit allocation decides the *width*; this module decides the *format*:
the fastest format measured clearly faster than fp32 (by ``MARGIN``) at every
measured batch size, else ``packed``, which runs at fp32 speed by
construction; so a format choice never makes a layer slower than fp32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bitpass.frontend.layers import Layer

PACKED = "packed"
FP32 = "fp32"
#: a compute format must be at least this much faster than fp32 at every measured batch size to be
#: chosen over packed (which runs at exactly fp32 speed): a tie is not worth extra Q/DQ at the layer's
#: borders, and isolated-layer timings are noisy
MARGIN = 0.10

#: op type -> width -> compute formats to try besides packed
COMPUTE_FORMATS: dict[str, dict[int, tuple[str, ...]]] = {
    "Conv": {8: ("qdq",), 4: ("blocked-dq",)},
    "ConvTranspose": {8: ("qdq",)},
    "Gemm": {8: ("qdq", "matmulnbits"), 4: ("matmulnbits",), 2: ("matmulnbits",)},
    "MatMul": {8: ("qdq", "matmulnbits"), 4: ("matmulnbits",), 2: ("matmulnbits",)},
}

#: variant key in a latency table: (bits, format)
Variant = tuple[int, str]
#: {layer_id: {(bits, format): {batch: seconds}}}
LatencyTable = Mapping[str, Mapping[Variant, Mapping[int, float]]]


def compute_formats(layer: Layer, bits: int) -> tuple[str, ...]:
    formats = COMPUTE_FORMATS.get(layer.op_type, {}).get(bits, ())
    if layer.op_type == "Conv" and layer.node.attributes.get_int("group", 1) != 1:
        formats = tuple(f for f in formats if f != "blocked-dq")
    return formats


def variants_to_measure(layers: list[Layer], widths: Mapping[str, tuple[int, ...]]) -> dict[str, list[Variant]]:
    """Per layer, the compute variants worth timing (packed runs like fp32 and needs no timing)."""
    return {layer.id: [(b, f) for b in widths.get(layer.id, ()) if b < 32 for f in compute_formats(layer, b)]
            for layer in layers}


@dataclass(frozen=True)
class Choice:
    format: str
    #: seconds per call at each measured batch size (fp32's for packed)
    seconds: Mapping[int, float]
    why: str
    #: the layer's fp32 seconds per call, which the choice was measured against
    fp32: Mapping[int, float] = field(default_factory=dict)


def choose(layer: Layer, bits: int, table: LatencyTable | None, mode: str = "auto") -> Choice:
    """The format for ``layer`` at ``bits`` under ``mode`` (auto: fastest not slower than fp32; packed; compute)."""
    row = (table or {}).get(layer.id, {})
    fp32 = row.get((32, FP32), {})
    if bits >= 32:
        return Choice(FP32, fp32, "fp32", fp32)
    formats = compute_formats(layer, bits)
    if mode == PACKED or (mode == "auto" and not fp32):
        return Choice(PACKED, fp32, "packed (no latency measurement)" if mode == "auto" else "packed (forced)",
                      fp32)
    if mode == "compute":
        if formats:
            return Choice(formats[0], row.get((bits, formats[0]), {}), "compute (forced)", fp32)
        return Choice(PACKED, fp32, f"no compute format for {bits}-bit {layer.op_type}", fp32)
    best = Choice(PACKED, fp32, f"packed: no compute format {MARGIN:.0%} faster than fp32", fp32)
    for fmt in formats:
        seconds = row.get((bits, fmt))
        if not seconds or any(b not in seconds for b in fp32):
            continue
        if all(seconds[b] <= fp32[b] * (1 - MARGIN) for b in fp32) and \
                _score(seconds, fp32) < _score(best.seconds, fp32):
            best = Choice(fmt, seconds, f"{fmt} measured faster than fp32", fp32)
    return best


def _score(seconds: Mapping[int, float], fp32: Mapping[int, float]) -> float:
    """Mean ratio to fp32 over the measured batches (lower is faster)."""
    return sum(seconds[b] / fp32[b] for b in fp32) / max(len(fp32), 1)


def latency_by_bits(layers: list[Layer], widths: Mapping[str, tuple[int, ...]], table: LatencyTable | None,
                    mode: str, batch: int) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, Choice]]]:
    """{layer: {bits: seconds at ``batch``}} of the chosen formats, and the choices themselves."""
    latency: dict[str, dict[int, float]] = {}
    choices: dict[str, dict[int, Choice]] = {}
    for layer in layers:
        for bits in widths.get(layer.id, ()):
            choice = choose(layer, bits, table, mode)
            choices.setdefault(layer.id, {})[bits] = choice
            if batch in choice.seconds:
                latency.setdefault(layer.id, {})[bits] = choice.seconds[batch]
    return latency, choices


def describe(choice: Choice) -> dict[str, Any]:
    """The choice for the manifest: format, reason, its milliseconds per call and fp32's, per batch size."""
    return {"format": choice.format, "why": choice.why,
            "ms": {str(b): round(1e3 * s, 4) for b, s in sorted(choice.seconds.items())},
            "fp32_ms": {str(b): round(1e3 * s, 4) for b, s in sorted(choice.fp32.items())}}
