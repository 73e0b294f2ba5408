"""The bit-allocation problem: layers × candidate widths, each with costs and a loss estimate.

Every layer ``l`` may take one width ``b`` out of its candidates (weights 8/4/2
bits, 32 = keep floating point). Each (layer, width) has

* a cost in every budget dimension (``DIMENSIONS``):

  - ``size``: weight bytes at that width, scales included (8-bit: one fp32
    scale per output channel; 4/2-bit: one fp32 scale, plus a ``b``-bit zero
    point when asymmetric, per block of ``group_size`` weights along the
    reduction axis; 16/32: 2/4 bytes a weight). The model's other constants
    (biases, non-quantizable tensors) are a fixed ``base`` the budget includes.
  - ``avg-bits``: ``params_l × b / Σ params`` so the totals add up to the
    parameter-weighted average weight width.
  - ``bops``: MACs per sample × weight bits × activation bits
    (``activation_bits(b)``: 8 for a quantized layer, 32 for a float one).
  - ``latency``: seconds, from a per-layer per-width table measured elsewhere.

  A cost that cannot be known (no latency table, MACs of a Conv whose output
  size shape inference could not find) is ``nan``; asking for a budget in that
  dimension is then a ``UsageError`` naming the layers.

* a loss estimate Ω(l, b): from a per-bit table when the sensitivity analysis
  has one, else HAWQ-V2 style ``s_l × ‖Q_b(W) − W‖²`` with symmetric
  per-channel (8-bit) or per-block (lower widths) fake quantization.

Solvers (``solvers.py``) read only this object, so they are tested on
synthetic instances (``Problem.from_tables``) exactly as they run on models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from bitpass.frontend import annotation
from bitpass.frontend.errors import BitpassError, UsageError
from bitpass.passes.analyses import SENSITIVITY
from bitpass.passes.infra import AnalysisManager
from bitpass.passes.sensitivity.quant import fake_quantize as _per_channel_fake_quantize
from bitpass.passes.sensitivity.quant import layer_channel_axis

SIZE, AVG_BITS, BOPS, LATENCY = "size", "avg-bits", "bops", "latency"
#: budget dimensions, in the order totals are shown
DIMENSIONS = (SIZE, AVG_BITS, BOPS, LATENCY)
#: widths offered when nothing narrower is known (32 = floating point)
DEFAULT_WIDTHS = (32, 8, 4, 2)
FLOAT_BITS = 32
DEFAULT_GROUP_SIZE = 32

Plan = dict[str, int]
#: what decides a layer's widths: a ``Capabilities``-like object, op type -> widths, or a callable
WidthSource = Callable[[str], Iterable[int]] | Mapping[str, Iterable[int]] | Any


def activation_bits(weight_bits: int) -> int:
    """Activation width that goes with a weight width: float stays float, anything quantized runs 8-bit."""
    return weight_bits if weight_bits >= 16 else 8


# --------------------------------------------------------------------------- fake quantization
def fake_quantize(w: np.ndarray, bits: int, axis: int = 0, group_size: int | None = None) -> np.ndarray:
    """``Q_b(w)``: symmetric fake quantization, per channel along ``axis``, optionally per block.

    The grid, rounding and per-channel scale are those of
    ``bitpass.passes.sensitivity.quant.fake_quantize`` (reused, so "b bits"
    means the same everywhere); with ``group_size`` each channel's weights
    (flattened, in order) are cut into blocks of ``group_size`` with a scale
    each, as MatMulNBits and blocked DequantizeLinear store them.
    ``bits >= 16`` rounds through float16 (16) or returns a copy of ``w`` (32).
    """
    w = np.asarray(w)
    if bits >= 32:
        return w.copy()
    if bits >= 16:
        return w.astype(np.float16).astype(w.dtype)
    if w.ndim == 0:
        return _per_channel_fake_quantize(w, bits, None)
    rows = np.moveaxis(w, axis, 0)
    shape = rows.shape
    flat = rows.reshape(shape[0], -1)
    width = flat.shape[1]
    if group_size is None or group_size <= 0 or group_size >= width:
        return _per_channel_fake_quantize(w, bits, axis)
    pad = (-width) % group_size  # zero padding changes no block's largest magnitude
    blocks = np.pad(flat, ((0, 0), (0, pad))).reshape(-1, group_size)
    q = _per_channel_fake_quantize(blocks, bits, 0).reshape(shape[0], -1)[:, :width]
    return np.moveaxis(q.reshape(shape), 0, axis)


def quantization_error(w: np.ndarray, bits: int, axis: int = 0, group_size: int | None = None) -> float:
    """``‖Q_b(w) − w‖²`` (squared Frobenius norm) in float64."""
    diff = fake_quantize(w, bits, axis, group_size).astype(np.float64) - np.asarray(w, dtype=np.float64)
    return float(np.sum(diff * diff))


# --------------------------------------------------------------------------- the problem
@dataclass(frozen=True)
class Candidate:
    """One width a layer may take: its loss estimate and its cost in each dimension (nan = unknown)."""

    bits: int
    loss: float
    cost: Mapping[str, float]


@dataclass(frozen=True)
class LayerChoices:
    """A layer's candidates, highest width first, and what the closed-form solver needs."""

    id: str
    op_type: str
    params: int
    candidates: tuple[Candidate, ...]
    #: ``s_l × σ_l²`` (sensitivity × weight variance) for BAQ; None: derived from the losses
    distortion: float | None = None

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(c.bits for c in self.candidates)

    def candidate(self, bits: int) -> Candidate:
        for c in self.candidates:
            if c.bits == bits:
                return c
        raise KeyError(f"layer {self.id!r} has no width {bits} (widths: {self.widths})")


@dataclass(frozen=True)
class Problem:
    """Layers × widths with costs and losses; ``base`` is cost outside the layers (e.g. bias bytes)."""

    layers: tuple[LayerChoices, ...]
    base: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.layers:
            raise UsageError("no quantizable layers to allocate bits to")
        seen: set[str] = set()
        for layer in self.layers:
            if not layer.candidates:
                raise UsageError(f"layer {layer.id!r} has no candidate width")
            if layer.id in seen:
                raise UsageError(f"layer {layer.id!r} appears twice")
            seen.add(layer.id)

    # --- reading ---------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        return [layer.id for layer in self.layers]

    def layer(self, layer_id: str) -> LayerChoices:
        for layer in self.layers:
            if layer.id == layer_id:
                return layer
        raise KeyError(layer_id)

    def cost_matrix(self, dim: str) -> list[np.ndarray]:
        """Per layer, the cost of each candidate in ``dim`` (same order as ``candidates``)."""
        return [np.array([c.cost.get(dim, math.nan) for c in layer.candidates], dtype=float)
                for layer in self.layers]

    def loss_matrix(self) -> list[np.ndarray]:
        return [np.array([c.loss for c in layer.candidates], dtype=float) for layer in self.layers]

    def known(self, dim: str) -> bool:
        return all(not math.isnan(c.cost.get(dim, math.nan)) for layer in self.layers for c in layer.candidates)

    def unknown_layers(self, dim: str) -> list[str]:
        return [layer.id for layer in self.layers
                if any(math.isnan(c.cost.get(dim, math.nan)) for c in layer.candidates)]

    def cost(self, plan: Mapping[str, int], dim: str) -> float:
        return float(self.base.get(dim, 0.0)) + sum(layer.candidate(plan[layer.id]).cost.get(dim, math.nan)
                                                      for layer in self.layers)

    def loss(self, plan: Mapping[str, int]) -> float:
        return float(sum(layer.candidate(plan[layer.id]).loss for layer in self.layers))

    def totals(self, plan: Mapping[str, int]) -> dict[str, float]:
        """The plan's value in every known dimension, plus ``loss`` (ΣΩ)."""
        out = {dim: self.cost(plan, dim) for dim in DIMENSIONS if self.known(dim)}
        out["loss"] = self.loss(plan)
        return out

    def cheapest(self, dim: str) -> float:
        """The smallest achievable total in ``dim`` (each layer at its cheapest width there)."""
        return float(self.base.get(dim, 0.0)) + sum(float(np.min(c)) for c in self.cost_matrix(dim))

    def highest_plan(self) -> Plan:
        return {layer.id: max(layer.widths) for layer in self.layers}

    def lowest_plan(self) -> Plan:
        return {layer.id: min(layer.widths) for layer in self.layers}

    # --- deriving --------------------------------------------------------
    def restrict(self, allowed: Mapping[str, Iterable[int]]) -> Problem:
        """A copy where the named layers keep only the ``allowed`` widths (unnamed layers are unchanged)."""
        layers = []
        for layer in self.layers:
            if layer.id in allowed:
                keep = set(allowed[layer.id])
                candidates = tuple(c for c in layer.candidates if c.bits in keep)
                if not candidates:
                    raise UsageError(f"layer {layer.id!r}: none of the widths {sorted(keep)} is available "
                                     f"(widths: {layer.widths})")
                layer = replace(layer, candidates=candidates)
            layers.append(layer)
        return replace(self, layers=tuple(layers))

    # --- building --------------------------------------------------------
    @classmethod
    def from_tables(
        cls,
        params: Mapping[str, int],
        loss: Mapping[str, Mapping[int, float]],
        costs: Mapping[str, Mapping[str, Mapping[int, float]]] | None = None,
        *,
        macs: Mapping[str, int] | None = None,
        distortion: Mapping[str, float] | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        channels: Mapping[str, int] | None = None,
        latency: Mapping[str, Mapping[int, float]] | None = None,
    ) -> Problem:
        """A problem from plain tables (synthetic instances, tests, other frontends).

        ``loss[layer][bits]`` gives the widths and Ω; ``size`` and ``avg-bits``
        are derived from ``params`` (and ``channels``, default 1 per 32
        weights), ``bops`` from ``macs``, ``latency`` from ``latency``; any
        dimension in ``costs[dim][layer][bits]`` overrides the derived one.
        """
        total = sum(params.values())
        layers = []
        for layer_id, table in loss.items():
            n = int(params[layer_id])
            ch = int(channels[layer_id]) if channels and layer_id in channels else max(1, n // 32)
            if not table:
                raise UsageError(f"layer {layer_id!r} has no candidate width")
            candidates = []
            for bits in sorted((int(b) for b in table), reverse=True):
                cost = {SIZE: weight_bytes(n, ch, bits, group_size),
                        AVG_BITS: n * bits / total,
                        BOPS: (macs[layer_id] * bits * activation_bits(bits)) if macs and layer_id in macs
                        else math.nan,
                        LATENCY: _lookup(latency, layer_id, bits)}
                for dim, per_layer in (costs or {}).items():
                    cost[dim] = float(per_layer[layer_id][bits])
                candidates.append(Candidate(bits, float(_lookup(loss, layer_id, bits, what="loss table")), cost))
            layers.append(LayerChoices(layer_id, "synthetic", n, tuple(candidates),
                                       None if distortion is None else distortion.get(layer_id)))
        return cls(tuple(layers))

    @classmethod
    def from_model(
        cls,
        model: Any,
        sensitivity: Mapping[str, Any],
        *,
        widths: WidthSource = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        zero_point: bool = False,
        latency: Mapping[str, Mapping[Any, float]] | None = None,
        keep_fp32: Iterable[str] = (),
    ) -> Problem:
        """The problem for a ``bitpass.frontend.Model``.

        ``sensitivity``: {layer_id: s} (Ω = s × ‖Q_b(W) − W‖²) or
        {layer_id: {bits: Ω}} (used as is). ``widths``: a ``Capabilities``
        (its ``widths_for``), a mapping op type -> widths, or a callable; 32
        is always offered. ``latency``: {layer_id: {bits: seconds}}.
        ``keep_fp32``: layer ids that only get 32.
        """
        layers = list(model.layers())
        keep = set(keep_fp32)
        missing = [layer.id for layer in layers if layer.id not in sensitivity]
        if missing:
            raise UsageError(f"no sensitivity for layer(s) {', '.join(missing)}: run the sensitivity pass on "
                             f"this model (or give one value per layer)")
        macs = layer_macs(model, layers)
        total = sum(layer.params for layer in layers) or 1
        choices = []
        stored = 0
        for layer in layers:
            w = layer.weight_array
            stored += int(w.nbytes)
            n = int(w.size)
            axis = layer_channel_axis(layer)
            channels = int(w.shape[axis]) if w.ndim else 1
            allowed = {FLOAT_BITS} if layer.id in keep else {FLOAT_BITS, *_widths_for(widths, layer.op_type)}
            entry = sensitivity[layer.id]
            per_bit = isinstance(entry, Mapping)
            if per_bit:  # a per-bit table decides which widths have a loss; fp32 costs nothing
                allowed = {b for b in allowed if b == FLOAT_BITS or _has(entry, b)}
            distortion = None if per_bit else float(entry) * float(np.var(w, dtype=np.float64))
            candidates = []
            for bits in sorted(allowed, reverse=True):
                if per_bit:
                    loss = 0.0 if bits == FLOAT_BITS and not _has(entry, bits) else float(_lookup(
                        {layer.id: entry}, layer.id, bits, what="sensitivity table"))
                else:
                    group = None if bits >= 8 else group_size
                    loss = float(entry) * quantization_error(w, bits, axis, group)
                cost = {SIZE: weight_bytes(n, channels, bits, group_size, zero_point),
                        AVG_BITS: n * bits / total,
                        BOPS: math.nan if macs[layer.id] is None else float(macs[layer.id] * bits
                                                                             * activation_bits(bits)),
                        LATENCY: _lookup(latency, layer.id, bits)}
                candidates.append(Candidate(bits, loss, cost))
            choices.append(LayerChoices(layer.id, layer.op_type, n, tuple(candidates), distortion))
        base = {SIZE: float(max(0, model.weight_bytes() - stored))}
        return cls(tuple(choices), base)


def weight_bytes(params: int, channels: int, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                 zero_point: bool = False) -> float:
    """Bytes of ``params`` weights in ``channels`` output channels stored at ``bits``, scales included."""
    if bits >= 16:
        return float(params * bits // 8)
    packed = math.ceil(params * bits / 8)
    if bits >= 8:
        return float(packed + 4 * channels)  # per-channel fp32 scale
    per_channel = math.ceil(params / max(channels, 1))
    blocks = channels * math.ceil(per_channel / group_size)
    return float(packed + blocks * 4 + (math.ceil(blocks * bits / 8) if zero_point else 0))


def _widths_for(source: WidthSource, op_type: str) -> tuple[int, ...]:
    if source is None:
        return DEFAULT_WIDTHS
    if hasattr(source, "widths_for"):
        return tuple(int(b) for b in source.widths_for(op_type))
    if isinstance(source, Mapping):
        return tuple(int(b) for b in source.get(op_type, (FLOAT_BITS,)))
    if callable(source):
        return tuple(int(b) for b in source(op_type))
    if isinstance(source, Sequence):
        return tuple(int(b) for b in source)
    raise TypeError(f"widths must be a Capabilities, a mapping or a callable, not {type(source).__name__}")


def _has(table: Mapping[Any, float], bits: int) -> bool:
    return bits in table or str(bits) in table


def _lookup(table: Mapping[str, Mapping[Any, float]] | None, layer_id: str, bits: int,
            what: str = "latency table") -> float:
    """``table[layer][bits]`` tolerating JSON's string keys; nan when there is no table, error when incomplete."""
    if table is None:
        return math.nan
    row = table.get(layer_id)
    if row is None:
        return math.nan if what == "latency table" else _missing(what, layer_id, bits)
    for key in (bits, str(bits)):
        if key in row:
            return float(row[key])
    return math.nan if what == "latency table" else _missing(what, layer_id, bits)


def _missing(what: str, layer_id: str, bits: int) -> float:
    raise UsageError(f"the {what} has no value for layer {layer_id!r} at {bits} bits")


# --------------------------------------------------------------------------- MACs
def layer_macs(model: Any, layers: Sequence[Any]) -> dict[str, int | None]:
    """MACs per sample of each layer (leading output dimension = batch); None where a size is unknown.

    Conv: weight size × output spatial size; ConvTranspose: weight size × input
    spatial size; Gemm/MatMul: weight size × rows per sample; Gather: 0. Shapes
    come from the IR, and from ONNX shape inference where the IR has none.
    """
    inferred: dict[str, tuple[Any, ...]] | None = None

    def shape_of(value: Any) -> tuple[Any, ...] | None:
        nonlocal inferred
        shape = _static(getattr(value, "shape", None))
        if shape is not None:
            return shape
        if inferred is None:
            inferred = _inferred_shapes(model)
        return inferred.get(value.name)

    out: dict[str, int | None] = {}
    for layer in layers:
        n = layer.params
        op = layer.op_type
        if op == "Gather":
            out[layer.id] = 0
            continue
        probe = layer.node.inputs[0] if op == "ConvTranspose" else layer.node.outputs[0]
        shape = shape_of(probe)
        if shape is None:
            out[layer.id] = None
            continue
        per = shape[2:] if op in ("Conv", "ConvTranspose") else shape[1:-1]
        if any(not isinstance(d, int) for d in per):
            out[layer.id] = None
            continue
        out[layer.id] = int(n * math.prod(per))
    return out


def _static(shape: Any) -> tuple[Any, ...] | None:
    if shape is None:
        return None
    dims = tuple(d if isinstance(d, int) else None for d in shape)
    return dims if all(isinstance(d, int) for d in dims[1:]) else None


def _inferred_shapes(model: Any) -> dict[str, tuple[Any, ...]]:
    import onnx

    try:
        proto = onnx.shape_inference.infer_shapes(model.to_proto(), strict_mode=False)
    except Exception:  # noqa: BLE001 - shape inference is best effort here; unknown sizes are reported later
        return {}
    shapes = {}
    for info in [*proto.graph.value_info, *proto.graph.output, *proto.graph.input]:
        t = info.type.tensor_type
        if t.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return shapes


def layer_sensitivity(model: Any, analyses: AnalysisManager, method: str, *,
                      who: str = "allocation") -> tuple[Mapping[str, Any], str]:
    """The ``sensitivity`` analysis (``{layer_id: s}`` or per-bit ``{layer_id: {bits: Ω}}``; a
    ``{method: {...}}`` table gives its ``method`` entry), else the layers' ``sensitivity.<method>``
    annotations; and where it came from (``analysis``, ``analysis:per-bit``, ``annotation:<method>``)."""
    try:
        value = analyses.require(SENSITIVITY)
    except BitpassError as err:
        scores = {}
        for layer in model.layers():
            score = annotation.sensitivity(layer.node, method)
            if score is not None:
                scores[layer.id] = score
        if not scores:
            raise UsageError(f"{who} needs sensitivity: {err}; nor do the layers carry a {method!r} sensitivity "
                             f"annotation") from None
        return scores, f"annotation:{method}"
    if method in value and isinstance(value[method], Mapping) and not any(l.id == method for l in model.layers()):
        return value[method], f"analysis:{method}"  # {method: {layer_id: ...}}
    per_bit = any(isinstance(v, Mapping) for v in value.values())
    return value, "analysis:per-bit" if per_bit else "analysis"


def random_problem(layers: int, seed: int = 0, *, widths: Sequence[int] = (32, 8, 4, 2),
                   latency: bool = False) -> Problem:
    """A synthetic problem for solver tests and timings: layers of random size and sensitivity, with
    Ω(b) = s·n·4^-b (the shape quantization noise has), random MACs and, optionally, latencies."""
    rng = np.random.default_rng(seed)
    ids = [f"l{i}" for i in range(layers)]
    params = {i: int(rng.integers(500, 50_000)) for i in ids}
    loss = {}
    for i in ids:
        s = rng.lognormal(0.0, 1.5)
        loss[i] = {b: 0.0 if b == 32 else s * params[i] * 4.0 ** -b * rng.uniform(0.8, 1.25) for b in widths}
    macs = {i: params[i] * int(rng.integers(1, 64)) for i in ids}
    table = None
    if latency:
        speed = {32: 4, 16: 2, 8: 1.5, 4: 1.2, 3: 1.15, 2: 1.1}
        table = {i: {b: params[i] * 1e-9 * speed[b] * rng.uniform(0.7, 1.3) for b in widths} for i in ids}
    return Problem.from_tables(params, loss, macs=macs, latency=table)
