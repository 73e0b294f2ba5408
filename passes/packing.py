"""Packed low-bit weights that ONNX Runtime unpacks once, at session start.

A layer in the ``packed`` format keeps its fp32 kernel: its weight is stored as
2/4-bit codes packed into bytes (8-bit codes as int8) plus one fp16 scale per
block of ``block_size`` weights along the reduction axis, and a chain of plain
ONNX ops (BitShift, Mod, Cast, Sub, Mul, Reshape) rebuilds the fp32 weight.
Every input of that chain is constant, so ONNX Runtime's constant folding runs
it once when the session is created: the file shrinks like a low-bit model's
while the layer runs exactly as fast as fp32. This is what lets bit allocation
meet a size budget without ever making a layer slower than fp32.

The same storage can feed int8 compute (``widen_int8_weight``): the chain rebuilds the low-bit
weight and a ``QuantizeLinear`` with the layer's per-channel int8 scale turns it into the int8
weight of a QDQ (or MatMulInteger) layer. ONNX Runtime folds that too, so the layer runs the same
int8 kernel as an 8-bit layer while the file holds 2- or 4-bit codes: storage width and compute
width are separate choices.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class LowBitWeight:
    """A float weight as ``bits``-bit codes with one fp16 scale per block of ``block_size`` along the
    reduction axes (the output-channel ``axis`` moved first): what packed storage holds."""

    codes: np.ndarray  # int8, rows x (blocks * block_size)
    scales: np.ndarray  # float16, rows x blocks
    shape: tuple[int, ...]  # the weight's own shape
    axis: int
    bits: int
    block_size: int

    @classmethod
    def of(cls, weight: np.ndarray, axis: int, bits: int, block_size: int) -> LowBitWeight:
        if bits not in PACKED_BITS:
            raise ValueError(f"packed weights take {PACKED_BITS} bits, not {bits}")
        moved = np.moveaxis(np.asarray(weight, np.float32), axis, 0)
        rows = moved.shape[0]
        codes, scales = quantize_blocked(moved.reshape(rows, -1), bits, block_size)
        return cls(codes, scales, tuple(weight.shape), axis, bits, block_size)

    @property
    def moved_shape(self) -> tuple[int, ...]:
        return (self.shape[self.axis], *(d for i, d in enumerate(self.shape) if i != self.axis))

    def dequantized(self) -> np.ndarray:
        """The fp32 weight the unpacking chain rebuilds, in the weight's own layout."""
        moved = self.moved_shape
        flat = dequantize_blocked(self.codes, self.scales, int(math.prod(moved[1:])))
        return np.ascontiguousarray(np.moveaxis(flat.reshape(moved), 0, self.axis))

    def stored(self) -> np.ndarray:
        """The code bytes as the artifact stores them (int8 codes at 8 bits, else packed into uint8)."""
        return self.codes if self.bits == 8 else _pack_codes(self.codes, self.bits)

    def chain(self, prefix: str, const: Callable[[str, np.ndarray], str]) -> tuple[list[onnx.NodeProto], str]:
        """The constant-only ops that rebuild the fp32 weight (see ``_unpacking_chain``)."""
        return _unpacking_chain(prefix, self.moved_shape, self.axis, self.bits, self.block_size, self.stored(),
                                self.codes.size, self.scales, const)


def pack_weight(proto: onnx.ModelProto, node: onnx.NodeProto, input_index: int, axis: int, bits: int,
                block_size: int) -> int:
    """Replace ``node``'s constant weight input by its packed form and the unpacking chain.

    ``axis`` is the weight's output-channel axis (blocks run along the others). Returns the
    bytes the packed weight occupies (codes and scales). The chain is inserted just before ``node``.
    A weight several layers share (a detector's heads over FPN levels) is packed once when they pack it the
    same way: the later layers read the first chain's output, and 0 bytes are returned for them.
    """
    inits = {t.name: t for t in proto.graph.initializer}
    name = node.input[input_index]
    low = LowBitWeight.of(numpy_helper.to_array(inits[name]).astype(np.float32), axis, bits, block_size)
    prefix = f"{name}__packed{bits}"
    nodes, result, consts = _chain_and_constants(low, prefix)
    produced = {output for n in proto.graph.node for output in n.output}
    packed_bytes = int(low.stored().nbytes + low.scales.nbytes)
    if result in produced:
        if _same_constants(inits, consts):  # shared with a layer packed before: take its chain out, to re-insert
            packed_bytes, consts = 0, []
            chain = {n.name for n in nodes}
            nodes = [_copy(n) for n in proto.graph.node if n.name in chain]
            kept = [_copy(n) for n in proto.graph.node if n.name not in chain]
            del proto.graph.node[:]
            proto.graph.node.extend(kept)
        else:  # the same weight packed another way for another layer: a chain of its own
            taken = {*produced, *inits}
            prefix = next(f"{prefix}_{k}" for k in range(2, 1 << 20)
                          if not any(n.startswith(f"{prefix}_{k}") for n in taken))
            nodes, result, consts = _chain_and_constants(low, prefix)
    reader = next(n for n in proto.graph.node if n.output[:1] == node.output[:1])  # the graph's own message
    reader.input[input_index] = result
    proto.graph.initializer.extend(consts)
    # the chain runs before its first reader (this layer, or one that shares the weight and comes earlier)
    _insert_before(proto, next(n for n in proto.graph.node if result in n.input), nodes)
    if not any(name in n.input for n in proto.graph.node):
        proto.graph.initializer.remove(inits[name])
    return packed_bytes


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _same_constants(inits: dict[str, TensorProto], consts: list[TensorProto]) -> bool:
    """Whether the graph already holds exactly these constants (an identical chain was inserted before)."""
    return all(c.name in inits and inits[c.name].SerializeToString() == c.SerializeToString() for c in consts)


def _chain_and_constants(low: LowBitWeight, prefix: str) -> tuple[list[onnx.NodeProto], str, list[TensorProto]]:
    """``low``'s unpacking chain (nodes and the name of the weight it rebuilds) and the initializers it reads,
    named ``{prefix}_c_...``, for the caller to add to the graph."""
    consts: list[TensorProto] = []

    def const(suffix: str, array: np.ndarray) -> str:
        consts.append(numpy_helper.from_array(array, f"{prefix}_c_{suffix}"))
        return consts[-1].name

    nodes, result = low.chain(prefix, const)
    return nodes, result, consts


def widen_int8_weight(proto: onnx.ModelProto, int8_name: str, low: LowBitWeight, scale: str, zero_point: str,
                      axis: int | None) -> str:
    """Replace the int8 weight initializer ``int8_name`` (a QDQ weight's or MatMulInteger's) by ``low``'s
    packed codes, the unpacking chain and ``QuantizeLinear(scale, zero_point, axis)``: the int8 weight is
    rebuilt once at load from low-bit storage. ``low`` must be the weight the int8 one was quantized from
    (its dequantized values), in the same layout. Returns the name of the rebuilt int8 tensor (``int8_name``,
    now produced by the chain, so every consumer keeps reading it)."""
    inits = {t.name: t for t in proto.graph.initializer}
    if int8_name not in inits:
        raise ValueError(f"{int8_name!r} is not an initializer")
    stored = inits[int8_name]
    if tuple(stored.dims) != low.shape:
        raise ValueError(f"{int8_name!r} has shape {tuple(stored.dims)}, the low-bit weight {low.shape}")
    prefix = f"{int8_name}__widened{low.bits}"
    nodes, rebuilt, consts = _chain_and_constants(low, prefix)
    attrs = {} if axis is None else {"axis": axis}
    nodes.append(helper.make_node("QuantizeLinear", [rebuilt, scale, zero_point], [int8_name],
                                  name=f"{prefix}/quantize", **attrs))
    proto.graph.initializer.remove(stored)
    proto.graph.initializer.extend(consts)
    first_use = next((i for i, n in enumerate(proto.graph.node) if int8_name in n.input), None)
    if first_use is None:
        raise ValueError(f"no node reads {int8_name!r}")
    _insert_at(proto, first_use, nodes)
    return int8_name


def _insert_before(proto: onnx.ModelProto, node: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> None:
    """Insert ``nodes`` just before ``node``, found by its first output (names may be empty or repeated)."""
    _insert_at(proto, next(i for i, n in enumerate(proto.graph.node) if n.output[:1] == node.output[:1]), nodes)


def _insert_at(proto: onnx.ModelProto, index: int, nodes: list[onnx.NodeProto]) -> None:
    graph_nodes = list(proto.graph.node)
    graph_nodes[index:index] = nodes
    del proto.graph.node[:]
    proto.graph.node.extend(graph_nodes)


@functools.lru_cache(maxsize=65536)
def stored_bytes(shape: tuple[int, ...], axis: int, bits: int, block_size: int = 32) -> int:
    """Bytes a float weight of ``shape`` (output axis ``axis``) takes in the artifact at ``bits``: the codes,
    scales and every constant of the chain ``pack_weight`` writes (2/4/8 bits), or the fp32 (32) / fp16 (16)
    tensor. Computed from the same chain ``pack_weight`` builds, without building the codes."""
    n = int(math.prod(shape))
    if bits >= 32:
        return 4 * n
    if bits >= 16:
        return 2 * n
    if bits not in PACKED_BITS:
        raise ValueError(f"packed weights take {PACKED_BITS} bits, not {bits}")
    moved = (int(shape[axis]), *(int(d) for i, d in enumerate(shape) if i != axis)) if shape else (1,)
    rows = moved[0]
    blocks = math.ceil(n // max(rows, 1) / block_size)
    codes = rows * blocks * block_size
    if bits == 8:
        stored = np.broadcast_to(np.int8(0), (rows, blocks * block_size))
    else:
        stored = np.broadcast_to(np.uint8(0), (math.ceil(codes / (8 // bits)), 1))
    scales = np.broadcast_to(np.float16(0), (rows, blocks))
    total = 0

    def count(_suffix: str, array: np.ndarray) -> str:
        nonlocal total
        total += int(array.nbytes)
        return _suffix

    _unpacking_chain("w", moved, axis, bits, block_size, stored, codes, scales, count)
    return total


def _unpacking_chain(prefix: str, moved_shape: tuple[int, ...], axis: int, bits: int, block_size: int,
                     stored: np.ndarray, n_codes: int, scales: np.ndarray,
                     const: Callable[[str, np.ndarray], str]) -> tuple[list[onnx.NodeProto], str]:
    """The constant-only ops that rebuild the fp32 weight from ``stored`` codes and fp16 ``scales``.

    ``const(suffix, array)`` registers each constant and returns its name; returns the nodes and the
    name of the rebuilt weight (original layout: the output axis moved back to ``axis``)."""
    rows, blocks = scales.shape
    cols = int(math.prod(moved_shape[1:]))
    nodes: list[onnx.NodeProto] = []

    def op(op_type: str, inputs: list[str], suffix: str, **attrs) -> str:
        out = f"{prefix}_{suffix}"  # op outputs and constants (``_c_``) never share a name
        nodes.append(helper.make_node(op_type, inputs, [out], name=f"{prefix}/{suffix}", **attrs))
        return out

    if bits == 8:
        value = op("Cast", [const("codes", stored)], "float", to=TensorProto.FLOAT)
    else:
        per = 8 // bits
        packed = const("codes", stored)
        shifts = const("shifts", np.arange(0, 8, bits, dtype=np.uint8))
        lanes = op("BitShift", [packed, shifts], "lanes", direction="RIGHT")
        masked = op("Mod", [lanes, const("modulus", np.array(2 ** bits, np.uint8))], "masked")
        flat_codes = op("Reshape", [masked, const("flat", np.array([-1], np.int64))], "flat")
        if n_codes % per:
            flat_codes = op("Slice", [flat_codes, const("start", np.array([0], np.int64)),
                                      const("stop", np.array([n_codes], np.int64))], "trimmed")
        as_float = op("Cast", [flat_codes], "float", to=TensorProto.FLOAT)
        value = op("Sub", [as_float, const("offset", np.array(2 ** (bits - 1), np.float32))], "centred")
    grouped = op("Reshape", [value, const("grouped", np.array([rows, blocks, block_size], np.int64))], "grouped")
    scale = op("Cast", [const("scales", scales.reshape(rows, blocks, 1))], "scale", to=TensorProto.FLOAT)
    scaled = op("Mul", [grouped, scale], "scaled")
    rows_2d = op("Reshape", [scaled, const("rows", np.array([rows, blocks * block_size], np.int64))], "rows")
    if cols != blocks * block_size:
        rows_2d = op("Slice", [rows_2d, const("col0", np.array([0], np.int64)),
                               const("cols", np.array([cols], np.int64)),
                               const("axis1", np.array([1], np.int64))], "unpadded")
    result = op("Reshape", [rows_2d, const("shape", np.array(moved_shape, np.int64))], "moved")
    if axis != 0:
        perm = list(range(1, len(moved_shape)))
        perm.insert(axis, 0)
        result = op("Transpose", [result], "weight", perm=perm)
    return nodes, result
