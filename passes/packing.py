"""Packed low-bit weights that ONNX Runtime unpacks once, at session start.

A layer in the ``packed`` format keeps its fp32 kernel: its weight is stored as
2/4-bit codes packed into bytes (8-bit codes as int8) plus one fp16 scale per
block of ``block_size`` weights along the reduction axis, and a chain of plain
ONNX ops (BitShift, Mod, Cast, Sub, Mul, Reshape) rebuilds the fp32 weight.
Every input of that chain is constant, so ONNX Runtime's constant folding runs
it once when the session is created: the file shrinks like a low-bit model's
while the layer runs exactly as fast as fp32. This is what lets bit allocation
meet a size budget without ever making a layer slower than fp32.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PACKED_BITS = (2, 4, 8)


def quantize_blocked(w2d: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric narrow-range codes and fp16 scales, one per (row, block of ``block_size`` columns).

    Returns ``codes`` (int8, shape of ``w2d`` padded to whole blocks) and ``scales``
    (float16, rows × blocks). Scales are rounded to fp16 *before* quantizing so the
    codes match the scales the artifact stores.
    """
    rows, cols = w2d.shape
    blocks = math.ceil(cols / block_size)
    padded = np.zeros((rows, blocks * block_size), np.float64)
    padded[:, :cols] = w2d
    grouped = padded.reshape(rows, blocks, block_size)
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(grouped).max(axis=2)
    scales = np.where(amax > 0, amax / qmax, 1.0).astype(np.float16)
    scales[scales == 0] = np.float16(1.0)  # an fp16 underflow would divide by zero
    codes = np.clip(np.rint(grouped / scales.astype(np.float64)[:, :, None]), -qmax, qmax).astype(np.int8)
    return codes.reshape(rows, -1), scales


def dequantize_blocked(codes: np.ndarray, scales: np.ndarray, cols: int) -> np.ndarray:
    """The fp32 weight (rows × cols) the artifact rebuilds from ``quantize_blocked``'s output."""
    rows = codes.shape[0]
    grouped = codes.reshape(rows, scales.shape[1], -1).astype(np.float32) * scales.astype(np.float32)[:, :, None]
    return grouped.reshape(rows, -1)[:, :cols]


def packed_bytes(params: int, rows: int, bits: int, block_size: int) -> int:
    """Bytes a ``params``-element weight with ``rows`` output channels takes in the packed format."""
    blocks = math.ceil(params / rows / block_size)
    padded = rows * blocks * block_size
    return math.ceil(padded * bits / 8) + 2 * rows * blocks


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (code + 2**(bits-1)) packed little-end-first, ``8 // bits`` per byte: shape (bytes, 1)."""
    per = 8 // bits
    unsigned = (codes.astype(np.int16).ravel() + 2 ** (bits - 1)).astype(np.uint8)
    unsigned = np.concatenate([unsigned, np.zeros((-len(unsigned)) % per, np.uint8)])
    lanes = unsigned.reshape(-1, per).astype(np.uint16)
    packed = np.zeros(len(lanes), np.uint16)
    for j in range(per):
        packed |= lanes[:, j] << (bits * j)
    return packed.astype(np.uint8).reshape(-1, 1)


def pack_weight(proto: onnx.ModelProto, node: onnx.NodeProto, input_index: int, axis: int, bits: int,
                block_size: int) -> int:
    """Replace ``node``'s constant weight input by its packed form and the unpacking chain.

    ``axis`` is the weight's output-channel axis (blocks run along the others). Returns the
    bytes the packed weight occupies. The chain is inserted just before ``node``.
    """
    if bits not in PACKED_BITS:
        raise ValueError(f"packed weights take {PACKED_BITS} bits, not {bits}")
    inits = {t.name: t for t in proto.graph.initializer}
    name = node.input[input_index]
    weight = numpy_helper.to_array(inits[name]).astype(np.float32)
    moved = np.moveaxis(weight, axis, 0)
    rows = moved.shape[0]
    flat = moved.reshape(rows, -1)
    codes, scales = quantize_blocked(flat, bits, block_size)
    blocks = scales.shape[1]
    prefix = f"{name}__packed{bits}"
    consts: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(suffix: str, array: np.ndarray) -> str:
        consts.append(numpy_helper.from_array(array, f"{prefix}_c_{suffix}"))
        return consts[-1].name

    def op(op_type: str, inputs: list[str], suffix: str, **attrs) -> str:
        out = f"{prefix}_{suffix}"  # op outputs and constants (``_c_``) never share a name
        nodes.append(helper.make_node(op_type, inputs, [out], name=f"{prefix}/{suffix}", **attrs))
        return out

    if bits == 8:
        value = op("Cast", [const("codes", codes)], "float", to=TensorProto.FLOAT)
    else:
        per = 8 // bits
        packed = const("codes", _pack_codes(codes, bits))
        shifts = const("shifts", np.arange(0, 8, bits, dtype=np.uint8))
        lanes = op("BitShift", [packed, shifts], "lanes", direction="RIGHT")
        masked = op("Mod", [lanes, const("modulus", np.array(2 ** bits, np.uint8))], "masked")
        flat_codes = op("Reshape", [masked, const("flat", np.array([-1], np.int64))], "flat")
        if codes.size % per:
            flat_codes = op("Slice", [flat_codes, const("start", np.array([0], np.int64)),
                                      const("stop", np.array([codes.size], np.int64))], "trimmed")
        as_float = op("Cast", [flat_codes], "float", to=TensorProto.FLOAT)
        value = op("Sub", [as_float, const("offset", np.array(2 ** (bits - 1), np.float32))], "centred")
    grouped = op("Reshape", [value, const("grouped", np.array([rows, blocks, block_size], np.int64))], "grouped")
    scale = op("Cast", [const("scales", scales.reshape(rows, blocks, 1))], "scale", to=TensorProto.FLOAT)
    scaled = op("Mul", [grouped, scale], "scaled")
    rows_2d = op("Reshape", [scaled, const("rows", np.array([rows, blocks * block_size], np.int64))], "rows")
    if flat.shape[1] != blocks * block_size:
        rows_2d = op("Slice", [rows_2d, const("col0", np.array([0], np.int64)),
                               const("cols", np.array([flat.shape[1]], np.int64)),
                               const("axis1", np.array([1], np.int64))], "unpadded")
    result = op("Reshape", [rows_2d, const("shape", np.array(moved.shape, np.int64))], "moved")
    if axis != 0:
        perm = list(range(1, weight.ndim))
        perm.insert(axis, 0)
        result = op("Transpose", [result], "weight", perm=perm)
    node.input[input_index] = result
    proto.graph.initializer.extend(consts)
    graph_nodes = list(proto.graph.node)
    index = next(i for i, n in enumerate(graph_nodes) if n.name == node.name)
    graph_nodes[index:index] = nodes
    del proto.graph.node[:]
    proto.graph.node.extend(graph_nodes)
    if not any(name in n.input for n in proto.graph.node):
        proto.graph.initializer.remove(inits[name])
    stored = [c for c in consts if c.name in (f"{prefix}_c_codes", f"{prefix}_c_scales")]
    return sum(numpy_helper.to_array(c).nbytes for c in stored)
