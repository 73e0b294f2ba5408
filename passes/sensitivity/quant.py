"""Symmetric per-channel fake quantization (quantize, then dequantize) of weights, in numpy.

One helper that every pass measuring or applying weight quantization error reuses,
so "quantized at b bits" means the same thing everywhere.
"""

from __future__ import annotations

import numpy as np

#: the bit widths the allocator chooses from; per-bit sensitivity tables cover these
TABLE_BITS = (2, 4, 8)


def fake_quantize(w: np.ndarray, bits: int, axis: int | None = 0) -> np.ndarray:
    """``w`` quantized to signed ``bits``-bit integers and back, symmetric, one scale per channel.

    The grid is the narrow range ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` (so 2 bits is ternary),
    the scale of a channel is its largest magnitude over that maximum, and values are rounded
    half to even. ``axis`` is the channel axis (``None``: one scale for the whole tensor). An
    all-zero channel stays zero. The result has ``w``'s dtype and shape.
    """
    if not 2 <= int(bits) <= 16:
        raise ValueError(f"fake_quantize: bits={bits} is outside 2..16")
    array = np.asarray(w)
    x = array.astype(np.float64, copy=False)
    qmax = float(2 ** (int(bits) - 1) - 1)
    if axis is None or x.ndim == 0:
        amax = np.abs(x).max(initial=0.0)
    else:
        axis = axis % x.ndim
        reduce = tuple(a for a in range(x.ndim) if a != axis)
        amax = np.abs(x).max(axis=reduce, keepdims=True, initial=0.0)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    q = np.clip(np.rint(x / scale), -qmax, qmax)
    return (q * scale).astype(array.dtype, copy=False)


def quantization_error(w: np.ndarray, bits: int, axis: int | None = 0) -> float:
    """``||fake_quantize(w, bits, axis) - w||^2`` (squared Frobenius norm, in float64)."""
    x = np.asarray(w, dtype=np.float64)
    return float(np.sum((fake_quantize(x, bits, axis) - x) ** 2))


def channel_axis(op_type: str, *, trans_b: bool = True) -> int:
    """The output-channel axis of an ONNX layer's weight (what per-channel scales run along).

    Conv weights are (out, in, ...) -> 0; ConvTranspose (in, out, ...) -> 1; Gemm is (out, in)
    when ``transB=1`` else (in, out); MatMul's constant right operand is (in, out) -> 1; a
    Gather table is (rows, dim) and each row is a channel -> 0.
    """
    if op_type in ("Conv", "Gather"):
        return 0
    if op_type in ("ConvTranspose", "MatMul"):
        return 1
    if op_type == "Gemm":
        return 0 if trans_b else 1
    raise ValueError(f"channel_axis: {op_type} is not a quantizable layer type")


def layer_channel_axis(layer) -> int:  # layer: bitpass.frontend.Layer
    """``channel_axis`` for a bitpass ``Layer`` (reads Gemm's ``transB``)."""
    trans_b = bool(layer.node.attributes.get_int("transB", 0)) if layer.op_type == "Gemm" else True
    return channel_axis(layer.op_type, trans_b=trans_b)


def torch_channel_axis(module) -> int:  # module: torch.nn.Module
    """The output-channel axis of a torch module's ``weight`` (ConvTranspose keeps out on axis 1)."""
    import torch.nn as nn

    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return 1
    return 0
