"""Which materialization a layer gets at a given width: the fastest one measured on the target.

A width can be materialized several ways (see ``passes/materialize.py``): int8 QDQ compute (at 8
bits, or with 2/4-bit storage widened to int8 at load), dynamic int8 (MatMul/Gemm), ORT's
MatMulNBits (block 32, 64 or 128), blocked DequantizeLinear, or ``packed`` storage that ONNX
Runtime unpacks once at load and then runs at exactly fp32 speed. Bit allocation decides the
*width* (bytes, by storage width); this module decides the *format* (latency, by compute format):
the fastest format measured clearly faster than fp32 (by ``MARGIN``) at every measured batch size,
else ``packed``, which runs at fp32 speed by construction; so a format choice never makes a layer
slower than fp32.

The latency probe times *variants*: ``(bits, name)`` keys of a latency table. Int8 compute runs
the same kernel whatever the storage width, so QDQ and dynamic int8 are timed once, at 8 bits,
and in each int8 flavour (``qdq-u8``: uint8 activations, ``qdq-s8``: int8); MatMulNBits is timed
at each width and block size (``matmulnbits-b128``). Which flavour the model's QDQ layers use is
one choice for the whole model (mixing them adds conversions at every border): ``best_flavour``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bitpass.frontend.layers import Layer

PACKED = "packed"
FP32 = "fp32"
QDQ, DYNAMIC, MATMUL_NBITS, BLOCKED_DQ = "qdq", "dynamic", "matmulnbits", "blocked-dq"
#: a compute format must be at least this much faster than fp32 at every measured batch size to be
#: chosen over packed (which runs at exactly fp32 speed): a tie is not worth extra Q/DQ at the layer's
#: borders, and isolated-layer timings are noisy
MARGIN = 0.10
#: int8 flavours of QDQ layers: variant name -> activation type
QDQ_FLAVOURS = {"qdq-u8": "uint8", "qdq-s8": "int8"}
#: MatMulNBits block sizes the probe times
MATMUL_NBITS_BLOCKS = (32, 64, 128)

#: op type -> width -> compute formats to try besides packed
#: (the first is what ``formats=compute`` takes without measurements: it needs no calibrated ranges below 8 bits)
COMPUTE_FORMATS: dict[str, dict[int, tuple[str, ...]]] = {
    "Conv": {8: (QDQ,), 4: (BLOCKED_DQ, QDQ), 2: (QDQ,)},
    "ConvTranspose": {8: (QDQ,)},
    "Gemm": {8: (QDQ, DYNAMIC, MATMUL_NBITS), 4: (MATMUL_NBITS, QDQ, DYNAMIC), 2: (MATMUL_NBITS, QDQ, DYNAMIC)},
    "MatMul": {8: (QDQ, DYNAMIC, MATMUL_NBITS), 4: (MATMUL_NBITS, QDQ, DYNAMIC), 2: (MATMUL_NBITS, QDQ, DYNAMIC)},
}

#: variant key in a latency table: (bits, name)
Variant = tuple[int, str]
#: {layer_id: {(bits, name): {batch: seconds}}}
LatencyTable = Mapping[str, Mapping[Variant, Mapping[int, float]]]


def compute_formats(layer: Layer, bits: int) -> tuple[str, ...]:
    formats = COMPUTE_FORMATS.get(layer.op_type, {}).get(bits, ())
    if layer.op_type == "Conv" and layer.node.attributes.get_int("group", 1) != 1:
        formats = tuple(f for f in formats if f != BLOCKED_DQ)
    if layer.op_type == "Gemm" and layer.node.attributes.get_float("alpha", 1.0) != 1.0:
        formats = tuple(f for f in formats if f not in (QDQ, DYNAMIC) or bits == 8)
    return formats


def timed_variants(fmt: str, bits: int) -> list[Variant]:
    """The variants the probe times for ``fmt`` at ``bits`` (int8 compute: once, at 8 bits, per flavour)."""
    if fmt == QDQ:
        return [(8, name) for name in QDQ_FLAVOURS]
    if fmt == DYNAMIC:
        return [(8, DYNAMIC)]
    if fmt == MATMUL_NBITS:
        return [(bits, f"{MATMUL_NBITS}-b{block}") for block in MATMUL_NBITS_BLOCKS]
    return [(bits, fmt)]


def variants_to_measure(layers: list[Layer], widths: Mapping[str, tuple[int, ...]]) -> dict[str, list[Variant]]:
    """Per layer, the compute variants worth timing (packed runs like fp32 and needs no timing)."""
    out: dict[str, list[Variant]] = {}
    for layer in layers:
        wanted: list[Variant] = []
        for bits in widths.get(layer.id, ()):
            if bits >= 32:
                continue
            for fmt in compute_formats(layer, bits):
                wanted.extend(v for v in timed_variants(fmt, bits) if v not in wanted)
        out[layer.id] = wanted
    return out


@dataclass(frozen=True)
class VariantPlan:
    """How to materialize a timed variant: the layer's plan fields and the int8 activation type."""

    bits: int
    activation_bits: int
    format: str
    activation_type: str = "int8"
    block_size: int | None = None


def variant_plan(variant: Variant) -> VariantPlan:
    """What ``materialize`` needs to build a variant (``(8, "qdq-u8")`` -> 8/8 qdq with uint8 activations)."""
    bits, name = variant
    if name in QDQ_FLAVOURS:
        return VariantPlan(bits, 8, QDQ, QDQ_FLAVOURS[name])
    if name == QDQ:
        return VariantPlan(bits, 8, QDQ)
    if name == DYNAMIC:
        return VariantPlan(bits, 8, DYNAMIC)
    if name.startswith(MATMUL_NBITS + "-b"):
        return VariantPlan(bits, 32, MATMUL_NBITS, block_size=int(name.rsplit("-b", 1)[1]))
    if name in (MATMUL_NBITS, BLOCKED_DQ):
        return VariantPlan(bits, 32, name)
    raise ValueError(f"unknown variant {variant!r}")


@dataclass(frozen=True)
class Choice:
    format: str
    #: seconds per call at each measured batch size (fp32's for packed)
    seconds: Mapping[int, float]
    why: str
    #: the layer's fp32 seconds per call, which the choice was measured against
    fp32: Mapping[int, float] = field(default_factory=dict)
    #: the timed variant behind the choice (e.g. ``matmulnbits-b128``); None for packed / fp32
    variant: str | None = None
    #: block size of a blocked format chosen by timing (None: the default)
    block_size: int | None = None


def _measured(row: Mapping[Variant, Mapping[int, float]], fmt: str, bits: int,
              flavour: str | None) -> list[tuple[str, Mapping[int, float]]]:
    """The timed variants of ``fmt`` at ``bits`` in ``row``: [(variant name, seconds by batch)]."""
    if fmt == QDQ:
        names = [flavour] if flavour else list(QDQ_FLAVOURS)
        keys = [(8, n) for n in names] + [(bits, QDQ), (8, QDQ)]
    elif fmt == DYNAMIC:
        keys = [(8, DYNAMIC), (bits, DYNAMIC)]
    elif fmt == MATMUL_NBITS:
        keys = [(bits, f"{MATMUL_NBITS}-b{b}") for b in MATMUL_NBITS_BLOCKS] + [(bits, MATMUL_NBITS)]
    else:
        keys = [(bits, fmt)]
    found = []
    for key in keys:
        if key in row and row[key] and all(name != key[1] for name, _ in found):
            found.append((key[1], row[key]))
    return found


def choose(layer: Layer, bits: int, table: LatencyTable | None, mode: str = "auto",
           flavour: str | None = None) -> Choice:
    """The format for ``layer`` at ``bits`` under ``mode`` (auto: fastest not slower than fp32; packed; compute).
    ``flavour`` (``qdq-u8`` / ``qdq-s8``) is the int8 flavour the model's QDQ layers will use."""
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
            found = _measured(row, formats[0], bits, flavour)
            name, seconds = found[0] if found else (None, {})
            return Choice(formats[0], seconds, "compute (forced)", fp32, name, _block(name))
        return Choice(PACKED, fp32, f"no compute format for {bits}-bit {layer.op_type}", fp32)
    best = Choice(PACKED, fp32, f"packed: no compute format {MARGIN:.0%} faster than fp32", fp32)
    for fmt in formats:
        for name, seconds in _measured(row, fmt, bits, flavour):
            if any(b not in seconds for b in fp32):
                continue
            if all(seconds[b] <= fp32[b] * (1 - MARGIN) for b in fp32) and \
                    _score(seconds, fp32) < _score(best.seconds, fp32):
                best = Choice(fmt, seconds, f"{name} measured faster than fp32", fp32, name, _block(name))
    return best


def _block(name: str | None) -> int | None:
    if name and name.startswith(MATMUL_NBITS + "-b"):
        return int(name.rsplit("-b", 1)[1])
    return None


def _score(seconds: Mapping[int, float], fp32: Mapping[int, float]) -> float:
    """Mean ratio to fp32 over the measured batches (lower is faster)."""
    return sum(seconds[b] / fp32[b] for b in fp32) / max(len(fp32), 1)


def best_flavour(table: LatencyTable | None) -> str | None:
    """The int8 flavour whose QDQ layers are fastest in total (mean ratio to fp32 over the layers timed in
    both flavours); None when nothing was timed."""
    totals: dict[str, float] = {}
    for row in (table or {}).values():
        fp32 = row.get((32, FP32), {})
        timed = {name: row.get((8, name)) for name in QDQ_FLAVOURS}
        if not fp32 or not all(timed.values()) or any(b not in s for s in timed.values() for b in fp32):
            continue
        for name, seconds in timed.items():
            totals[name] = totals.get(name, 0.0) + _score(seconds, fp32)
    return min(totals, key=lambda n: (totals[n], n)) if totals else None


def latency_by_bits(layers: list[Layer], widths: Mapping[str, tuple[int, ...]], table: LatencyTable | None,
                    mode: str, batch: int,
                    flavour: str | None = None) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, Choice]]]:
    """{layer: {bits: seconds at ``batch``}} of the chosen formats, and the choices themselves."""
    latency: dict[str, dict[int, float]] = {}
    choices: dict[str, dict[int, Choice]] = {}
    for layer in layers:
        for bits in widths.get(layer.id, ()):
            choice = choose(layer, bits, table, mode, flavour)
            choices.setdefault(layer.id, {})[bits] = choice
            if batch in choice.seconds:
                latency.setdefault(layer.id, {})[bits] = choice.seconds[batch]
    return latency, choices


def describe(choice: Choice) -> dict[str, Any]:
    """The choice for the manifest: format, reason, its milliseconds per call and fp32's, per batch size."""
    out = {"format": choice.format, "why": choice.why,
           "ms": {str(b): round(1e3 * s, 4) for b, s in sorted(choice.seconds.items())},
           "fp32_ms": {str(b): round(1e3 * s, 4) for b, s in sorted(choice.fp32.items())}}
    if choice.variant:
        out["variant"] = choice.variant
    if choice.block_size:
        out["block_size"] = choice.block_size
    return out
