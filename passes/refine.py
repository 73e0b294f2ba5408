"""``refine-rounding``: layer-wise rounding refinement of packed low-bit weights (AdaRound-style, exact).

Nearest rounding minimises the error of each weight on its own; what matters is the error of the
layer's **output**. For every eligible layer this pass chooses, weight by weight, between the two
grid points that bracket it (the nearest one and the other neighbour) so that the output error on
the calibration inputs,

    ||X W^T - X What^T||^2 = sum_rows (w - what)^T H (w - what),   H = X^T X,

drops (AdaRound, Nagel et al. 2020, optimises the same up/down choice through a soft relaxation;
here it is solved by greedy coordinate descent on the exact quadratic: deterministic, no learning
rate, and every accepted flip provably lowers the calibration error).

Grid and scales. The grid is ``packing.quantize_blocked``'s: symmetric narrow-range codes with one
fp16 scale per (output channel, block of ``block_size`` weights along the reduction axis). The
scales are those of nearest rounding and stay **fixed**: each block's largest-magnitude weight keeps
its code (+-qmax), no code leaves [-qmax, qmax], and a block whose largest code is not +-qmax (an
all-zero block, or an fp16-underflowed scale) is left alone. The refined weight
``What = codes * scales`` (fp32, the weight's own layout) replaces the layer's initializer, so that
``quantize`` re-quantizing it with ``quantize_blocked`` reproduces exactly the refined codes and the
same scales (``block_size`` must equal quantize's, default 32 for both). A weight exactly on the
grid (zeros, e.g. pruned weights) has no other neighbour and never moves.

Eligible layers: weight format ``packed`` (the only format whose grid is ``quantize_blocked``'s) with
2/4/8 weight bits, on Conv (1-D/2-D, any group count, explicit or VALID padding), Gemm and MatMul
whose fp32 weight is an initializer used by that one node. Unannotated formats with < 8 bits go to
ORT's MatMulNBits (asymmetric, its own scales) or blocked DequantizeLinear (fp32 scales, code -8
allowed), whose grids differ: refining for them would not survive their re-quantization, so they
are skipped, as are ConvTranspose and Gather (an embedding row is independent of the others, so
nearest rounding is already optimal); ``ctx.records["refine_rounding"]["skipped"]`` says why.

Inputs. ``X`` is each layer's input on the first ``samples`` calibration samples, measured once,
with ONNX Runtime, on the model as it is (fp32 upstream layers; AdaRound's default), Conv inputs as
im2col patches. Only the Gram matrix ``H`` is kept. ``damping`` adds ``damping * mean(diag H)`` to
the diagonal: a ridge towards plain weight error that stops the search from fitting the null space
of ``H`` when a layer has more inputs than calibration rows (the digits CNN's 1024-input Gemm sees
only 200 images).

Analyses: weights change, so nothing is preserved except what does not depend on weight values at
the sub-grid-step level: ``activation-ranges`` (calibrated on the fp32 model, as ``quantize`` uses
them anyway for an allocated model; each weight moves less than one grid step from fp32), the
allocation's ``bits`` and ``latency-variants``, and the pruning masks and reference (zeros stay
zero). Sensitivity tables, measured on the fp32 weights this pass replaces, are invalidated.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import pydantic

from bitpass.frontend import Dataset, Layer, Model, annotation
from bitpass.frontend.errors import UsageError
from bitpass.passes.activations import layer_inputs
from bitpass.passes.analyses import ACTIVATION_RANGES, BITS, LATENCY_VARIANTS, PRUNING_MASKS, PRUNING_REFERENCE
from bitpass.passes.infra import DATA_CALIBRATION, Pass, PassConfig, PassContext, PassResult
from bitpass.passes.packing import PACKED_BITS, quantize_blocked
from bitpass.passes.pruning.common import is_initializer, set_constant
from bitpass.passes.sensitivity.quant import layer_channel_axis

RECORD = "refine_rounding"
#: patches (float32) gathered per layer before their Gram matrix is accumulated. The product runs in float32
#: (a chunk of ~100k rows sums with ~1e-5 relative error) and is added to a float64 sum: on ResNet-18 224²'s first
#: convolution (800k x 147 patches) the float64 product and the conversion to it took 17 of 25 s under load.
PENDING_BYTES = 64 << 20
#: columns whose gradient updates are applied to the rest of the row as one matrix product (``_sweep``)
COLUMN_BLOCK = 128
PACKED = "packed"
_OPS = ("Conv", "Gemm", "MatMul")


class RefineRoundingConfig(PassConfig):
    @pydantic.field_validator("layers", mode="before")
    @classmethod
    def _ids_are_strings(cls, value: object) -> object:
        """Layer ids of a torch export are module paths such as ``0``: ``[0, 3]`` means those ids."""
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        if isinstance(value, (str, int)):
            return [s.strip() for s in str(value).split(",") if s.strip()]
        return value

    #: block size of the packed weights along the reduction axis: must equal ``quantize``'s
    block_size: int = pydantic.Field(32, ge=1)
    #: calibration samples whose layer inputs define the output error (the first ones)
    samples: int = pydantic.Field(256, ge=1)
    #: sweeps of coordinate descent over every weight (stops early when a sweep changes nothing)
    iterations: int = pydantic.Field(4, ge=1)
    #: ridge added to H's diagonal, relative to its mean (0: pure calibration output error)
    damping: float = pydantic.Field(0.01, ge=0.0)
    #: layer ids to refine (default: every eligible layer); a named layer that is not eligible is an error
    layers: list[str] | None = None
    batch_size: int = pydantic.Field(64, ge=1)


class RefineRounding(Pass):
    """Refine packed low-bit weights' up/down rounding to minimise each layer's output error on calibration data."""

    name = "refine-rounding"
    Config = RefineRoundingConfig
    requires = frozenset({DATA_CALIBRATION})
    in_place = True
    config: RefineRoundingConfig

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        if ctx.calibration is None:
            raise UsageError("refine-rounding needs calibration data (--calib FILE): it minimises each layer's "
                             "output error on the calibration inputs")
        start = time.perf_counter()
        layers, skipped = eligible_layers(model, cfg.layers)
        record: dict[str, Any] = {"block_size": cfg.block_size, "iterations": cfg.iterations,
                                  "damping": cfg.damping, "layers": {}, "skipped": skipped}
        ctx.records[RECORD] = record
        if not layers:
            record["seconds"] = round(time.perf_counter() - start, 4)
            return PassResult(model, modified=False, preserved=frozenset())
        data = ctx.calibration.head(cfg.samples)
        record["samples"] = len(data)
        ctx.progress(f"refine-rounding: measuring inputs of {len(layers)} layer(s) on {len(data)} samples")
        grams = input_grams(model, data, layers, batch_size=cfg.batch_size)
        unfused = [l.id for l in layers if any(u.node.op_type == "BatchNormalization"
                                               for u in l.node.outputs[0].uses())]
        if unfused:
            record["notes"] = [f"layer(s) {', '.join(unfused)} feed a BatchNormalization: run fuse before "
                               f"refine-rounding, else quantize's pre-processing folds it into the refined "
                               f"weights and re-quantizes them with slightly different fp16 scales"]
        with ctx.progress.task("refine-rounding", total=len(layers), unit="layer") as task:
            for layer in layers:
                t0 = time.perf_counter()
                bits = int(annotation.weight_bits(layer.node))
                axis = layer_channel_axis(layer)
                weight = layer.weight_array.astype(np.float32)
                moved = np.moveaxis(weight, axis, 0)
                w2d = moved.reshape(moved.shape[0], -1)
                gram = grams[layer.id]
                result = refine_codes(w2d, bits, cfg.block_size, gram.matrices, gram.row_groups,
                                      iterations=cfg.iterations, damping=cfg.damping)
                elements = gram.rows * w2d.shape[0]  # output elements: input rows x output channels
                refined = _dequantize(result.codes, result.scales, cfg.block_size, w2d.shape[1])
                new = np.moveaxis(refined.reshape(moved.shape), 0, axis)
                set_constant(layer.weight, np.ascontiguousarray(new, dtype=np.float32))
                record["layers"][layer.id] = {
                    "bits": bits, "mse_nearest": result.mse_before / elements,
                    "mse_refined": result.mse_after / elements,
                    "flipped": result.flipped, "weights": int(w2d.size), "sweeps": result.sweeps,
                    "seconds": round(time.perf_counter() - t0, 4)}
                task.advance()
        record["seconds"] = round(time.perf_counter() - start, 4)
        return PassResult(model, modified=True, preserved=frozenset(
            {ACTIVATION_RANGES, BITS, LATENCY_VARIANTS, PRUNING_MASKS, PRUNING_REFERENCE}))


# ----------------------------------------------------------------------
# eligibility
def _why_not(layer: Layer, users: dict[int, int]) -> str | None:
    bits = annotation.weight_bits(layer.node)
    fmt = annotation.weight_format(layer.node)
    if bits not in PACKED_BITS:
        return f"weight bits {bits} (refined: packed {'/'.join(map(str, PACKED_BITS))}-bit)"
    if fmt != PACKED:
        return (f"format {fmt or 'unannotated'}: only the packed format re-quantizes on the grid this pass "
                f"refines (set format=packed)")
    if layer.op_type not in _OPS:
        return f"{layer.op_type} is not refined (Conv, Gemm, MatMul are)"
    if layer.op_type == "Conv":
        rank = len(layer.weight_shape)
        if rank not in (3, 4):
            return f"{rank - 2}-D Conv (1-D and 2-D are refined)"
        auto_pad = layer.node.attributes.get_string("auto_pad", "NOTSET")
        if auto_pad not in ("NOTSET", "VALID"):
            return f"auto_pad={auto_pad}"
    if not is_initializer(layer.weight):
        return "weight is not an initializer (run fold-constants first)"
    if layer.weight.const_value.dtype != ir.DataType.FLOAT:
        return f"weight is {layer.weight.const_value.dtype}, not float32"
    if users.get(id(layer.weight), 0) > 1 or layer.weight in _graph_outputs(layer):
        return "its weight is shared with another node"
    return None


def _graph_outputs(layer: Layer) -> list[ir.Value]:
    graph = layer.node.graph
    return list(graph.outputs) if graph is not None else []


def eligible_layers(model: Model, wanted: list[str] | None) -> tuple[list[Layer], dict[str, str]]:
    """The layers to refine, and ``{layer_id: reason}`` for the annotated low-bit ones left out."""
    layers = model.layers()
    known = {l.id for l in layers}
    unknown = sorted(set(wanted or []) - known)
    if unknown:
        raise UsageError(f"refine-rounding: no layer {', '.join(map(repr, unknown))}; layers are: "
                         f"{', '.join(l.id for l in layers)}")
    users: dict[int, int] = {}
    for layer in layers:
        users[id(layer.weight)] = len(layer.weight.uses())
    chosen: list[Layer] = []
    skipped: dict[str, str] = {}
    for layer in layers:
        if wanted is not None and layer.id not in wanted:
            continue
        bits = annotation.weight_bits(layer.node)
        if wanted is None and (bits is None or bits >= annotation.FLOAT_BITS):
            continue  # fp32 or int8-QDQ by default: nothing to refine, nothing to report
        why = _why_not(layer, users)
        if why is None:
            chosen.append(layer)
        elif wanted is not None:
            raise UsageError(f"refine-rounding: layer {layer.id!r} cannot be refined: {why}")
        else:
            skipped[layer.id] = why
    return chosen, skipped


# ----------------------------------------------------------------------
# layer inputs -> Gram matrices
@dataclass
class Gram:
    """``matrices[g] = X_g^T X_g`` (float64) for each group of output rows ``row_groups[g]``;
    ``rows`` is the number of input rows (samples x positions) behind them."""

    matrices: list[np.ndarray]
    row_groups: list[slice]
    rows: int


def _im2col(layer: Layer, x: np.ndarray) -> np.ndarray:
    """Conv input (N, C, [H,] W) -> patches (N * positions, C * prod(kernel)), ONNX weight-flattening order.

    A strided view over the padded input (numpy's sliding windows), copied once into the patch matrix:
    ``torch``'s ``unfold`` took 0.5 CPU s on a (64, 512, 1, 1) input with a 3x3 kernel."""
    attrs = layer.node.attributes
    kernel = list(layer.weight_shape[2:])
    dims = len(kernel)
    strides = list(attrs.get_ints("strides", [1] * dims))
    dilations = list(attrs.get_ints("dilations", [1] * dims))
    pads = list(attrs.get_ints("pads", [0] * 2 * dims))
    if attrs.get_string("auto_pad", "NOTSET") == "VALID":
        pads = [0] * 2 * dims
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + dims]) for i in range(dims)]
    x = np.pad(np.asarray(x, np.float32), width)
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]  # the receptive field of one output
    axes = tuple(range(2, 2 + dims))
    windows = np.lib.stride_tricks.sliding_window_view(x, spans, axis=axes)  # (N, C, *positions, *spans)
    picked = (slice(None), slice(None), *[slice(None, None, s) for s in strides],
              *[slice(None, None, d) for d in dilations])
    windows = windows[picked]  # (N, C, *out positions, *kernel)
    # -> (N, *out positions, C, *kernel): one row per output position, columns in weight order
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    windows = windows.transpose(order)
    return windows.reshape(-1, x.shape[1] * int(np.prod(kernel)))


def input_grams(model: Model, data: Dataset, layers: Iterable[Layer], *, batch_size: int = 64) -> dict[str, Gram]:
    """``{layer_id: Gram}`` of each layer's input (im2col patches for Conv) over ``data``, with ONNX Runtime
    (``bitpass.passes.activations.layer_inputs``)."""
    layers = list(layers)
    by_id = {layer.id: layer for layer in layers}
    sums: dict[str, list[np.ndarray]] = {}
    counts: dict[str, int] = {}
    groups: dict[str, list[slice]] = {}
    pending: dict[str, list[np.ndarray]] = {}

    def flush(layer_id: str) -> None:
        """Add the pending patches' Gram matrices (one product over all of them: a batch of 64 images gives a
        4608-wide layer only 64 rows, too few for an efficient product of its own)."""
        layer = by_id[layer_id]
        patches = np.concatenate(pending.pop(layer_id))  # float32: one product per chunk, summed in float64
        group = layer.node.attributes.get_int("group", 1) if layer.op_type == "Conv" else 1
        k = patches.shape[1] // group
        for g in range(group):
            part = patches[:, g * k:(g + 1) * k]
            sums[layer_id][g] += (part.T @ part).astype(np.float64)

    for batch in layer_inputs(model, data, layers, batch_size=batch_size):
        for layer_id, x in batch.items():
            layer = by_id[layer_id]
            x = np.asarray(x, dtype=np.float32)
            rows = layer.weight_shape[layer_channel_axis(layer)]
            patches = _im2col(layer, x) if layer.op_type == "Conv" else x.reshape(-1, x.shape[-1])
            if layer_id not in sums:
                group = layer.node.attributes.get_int("group", 1) if layer.op_type == "Conv" else 1
                k = patches.shape[1] // group
                sums[layer_id] = [np.zeros((k, k)) for _ in range(group)]
                per = rows // group
                groups[layer_id] = [slice(g * per, (g + 1) * per) for g in range(group)]
            pending.setdefault(layer_id, []).append(np.ascontiguousarray(patches, dtype=np.float32))
            counts[layer_id] = counts.get(layer_id, 0) + patches.shape[0]
            if sum(p.size for p in pending[layer_id]) * 4 >= PENDING_BYTES:
                flush(layer_id)
    for layer_id in list(pending):
        flush(layer_id)
    return {lid: Gram(sums[lid], groups[lid], counts[lid]) for lid in sums}


# ----------------------------------------------------------------------
# the refinement itself
@dataclass
class Refined:
    """Refined codes and (unchanged) scales in ``quantize_blocked``'s layout, with the summed squared
    output errors ``sum_rows e^T H e`` (undamped H) of nearest rounding and of the refined codes."""

    codes: np.ndarray
    scales: np.ndarray
    nearest: np.ndarray
    mse_before: float
    mse_after: float
    flipped: int
    sweeps: int


def _dequantize(codes: np.ndarray, scales: np.ndarray, block_size: int, cols: int) -> np.ndarray:
    rows = codes.shape[0]
    grouped = codes.reshape(rows, scales.shape[1], block_size).astype(np.float32)
    return (grouped * scales.astype(np.float32)[:, :, None]).reshape(rows, -1)[:, :cols]


def refine_codes(w2d: np.ndarray, bits: int, block_size: int, grams: list[np.ndarray] | np.ndarray,
                 row_groups: list[slice] | None = None, *, iterations: int = 4,
                 damping: float = 0.01, column_block: int = COLUMN_BLOCK) -> Refined:
    """Refine ``quantize_blocked(w2d, bits, block_size)``'s codes against ``sum_rows e^T H e``.

    ``w2d`` is (rows, cols) with the reduction axis last; ``grams`` one (cols, cols) matrix ``X^T X``,
    or one per group of rows (``row_groups``, for grouped convolutions). Each weight may only take the
    two grid points bracketing it; the block maxima, and blocks whose largest code is not +-qmax, stay.
    ``column_block`` only changes how the gradient updates are batched (see ``_sweep``), not what is chosen.
    """
    w2d = np.asarray(w2d, np.float32)
    rows, cols = w2d.shape
    if isinstance(grams, np.ndarray):
        grams = [grams]
    if row_groups is None:
        row_groups = [slice(0, rows)]
    codes, scales = quantize_blocked(w2d, bits, block_size)
    nearest = codes.copy()
    qmax = 2 ** (bits - 1) - 1
    blocks = scales.shape[1]
    scale = np.repeat(scales.astype(np.float64), block_size, axis=1)[:, :cols]  # per weight
    w = w2d.astype(np.float64)
    c0 = codes[:, :cols].astype(np.float64)
    frac = w / scale
    alt = np.clip(c0 + np.sign(frac - c0), -qmax, qmax)
    movable = alt != c0
    # keep each block's largest-magnitude weight (and every weight of a degenerate block) where it is
    padded = np.zeros((rows, blocks * block_size))
    padded[:, :cols] = np.abs(w)
    top = padded.reshape(rows, blocks, block_size).argmax(axis=2)
    block_max = np.abs(codes.reshape(rows, blocks, block_size)).max(axis=2)
    frozen = np.zeros((rows, blocks, block_size), bool)
    np.put_along_axis(frozen, top[:, :, None], True, axis=2)
    frozen |= (block_max < qmax)[:, :, None]
    movable &= ~frozen.reshape(rows, -1)[:, :cols]

    code = c0.copy()
    before = after = 0.0
    flipped = sweeps = 0
    for gram, part in zip(grams, row_groups):
        h = np.asarray(gram, np.float64)
        err = (c0[part] * scale[part] - w[part])
        ridge = damping * float(np.mean(np.diag(h))) if damping else 0.0
        damped = h
        if ridge:
            damped = h.copy()
            damped[np.diag_indices_from(damped)] += ridge
        gradient = err @ damped  # gradient/2 of e^T H e per row (damped)
        before += _quadratic(err, gradient, ridge)
        # column-major copies (weights of one input column contiguous): the sweep reads one column at a time
        c = np.ascontiguousarray(code[part].T)
        other = np.ascontiguousarray(np.where(code[part] == c0[part], alt[part], c0[part]).T)
        st = np.ascontiguousarray(scale[part].T)
        m = np.ascontiguousarray(movable[part].T)
        g = np.ascontiguousarray(gradient.T)  # one row per input column, kept up to date by the sweeps
        active = np.flatnonzero(m.any(axis=1))
        for sweep in range(iterations):
            changed = _sweep(c, other, st, m, g, damped, active, column_block)
            sweeps = max(sweeps, sweep + 1)
            if not changed:
                break
        c = c.T
        code[part] = c
        err = c * scale[part] - w[part]
        after += _quadratic(err, g.T, ridge)
        flipped += int((c != c0[part]).sum())
    codes[:, :cols] = code.astype(np.int8)
    return Refined(codes, scales, nearest, before, after, flipped, sweeps)


def _quadratic(err: np.ndarray, gradient: np.ndarray, ridge: float) -> float:
    """``sum_rows e^T H e`` from the damped gradient ``e @ (H + ridge I)``, which the search keeps anyway:
    no (rows x cols x cols) product of its own (``einsum`` over the three operands, as it was, does not even
    use BLAS: 25 s on a 512 x 4608 weight)."""
    return float(np.sum(gradient * err) - ridge * np.sum(err * err))


def _sweep(c: np.ndarray, other: np.ndarray, s: np.ndarray, m: np.ndarray, g: np.ndarray, h: np.ndarray,
           active: np.ndarray, column_block: int) -> int:
    """One coordinate-descent sweep over the ``active`` input columns, in place; returns the weights flipped.

    Arrays are column-major (``c[j]`` is input column ``j`` of every output row); ``h`` is the damped,
    symmetric Gram matrix and ``g[k, r]`` row ``r``'s gradient/2 at column ``k``. Flipping column ``j`` of
    row ``r`` by ``delta`` adds ``delta * h[:, j]`` to ``g[:, r]``. The decision for column ``j`` reads only
    ``g[j]``, so the updates are applied at once only inside a block of ``column_block`` columns (those decided
    next) and deferred, for the other columns, to one product per block, sparse since few weights flip:
    the same decisions as updating every column after every flip (up to float rounding), without a
    rank-1 update of the whole gradient per column (GPTQ's lazy batch updates)."""
    from scipy import sparse

    changed = 0
    cols = g.shape[0]
    diag = np.diag(h)
    for first in range(0, len(active), column_block):
        block = active[first:first + column_block]
        lo, hi = int(block[0]), int(block[-1]) + 1  # the block's span of columns, updated eagerly
        steps = np.zeros((hi - lo, g.shape[1]))
        for j in block:
            delta = (other[j] - c[j]) * s[j]
            gj = g[j]
            gain = delta * (2.0 * gj + delta * diag[j])
            take = m[j] & (gain < -1e-12 * (np.abs(gj * delta) + 1e-300))
            if not take.any():
                continue
            step = np.where(take, delta, 0.0)
            flips = np.flatnonzero(take)  # few rows flip per column: update only theirs
            g[lo:hi, flips] += h[lo:hi, j][:, None] * step[flips][None, :]
            steps[j - lo] = step
            c[j], other[j] = np.where(take, other[j], c[j]), np.where(take, c[j], other[j])
            changed += int(take.sum())
        if (lo > 0 or hi < cols) and steps.any():
            # update[k, r] = sum_j h[k, j] * steps[j, r] = (steps^T @ h[lo:hi])^T, steps^T sparse
            update = np.asarray(sparse.csr_matrix(steps.T) @ h[lo:hi]).T
            g[:lo] += update[:lo]
            g[hi:] += update[hi:]
    return changed
