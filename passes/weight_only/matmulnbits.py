"""Write pre-quantized group-wise weights into an ONNX graph as ONNX Runtime ``MatMulNBits`` nodes.

ORT's own quantizers compute their codes themselves; GPTQ's or a mixed-width plan's codes need the node
built directly. Layout (com.microsoft MatMulNBits, as ORT's quantizer writes it): ``B`` uint8
``(N, K / block, block * bits / 8)`` with the codes of one column's block packed low bits first; ``scales``
``(N * K / block)``; ``zero_points`` uint8 ``(N * ceil(K / block * bits / 8))`` packed the same way.
MatMulNBits runs 2, 4 and 8 bits only. A layer whose K-slices have several widths becomes one
MatMulNBits per width, each reading its slices' input features through a Gather, summed; a low-rank
correction ``A B`` adds ``(x A) B``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bitpass.passes.weight_only.grid import GroupQuantized

#: widths ORT 1.32's MatMulNBits CPU kernel accepts (3 is rejected at session creation)
MATMULNBITS_BITS = (2, 4, 8)
LAYER_ID_KEY = "bitpass.layer_id"


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of uint8 codes, ``8 // bits`` per byte, first code in the low bits."""
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        pad = per_byte - codes.shape[-1] % per_byte
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), codes.dtype)], axis=-1)
    grouped = codes.reshape(*codes.shape[:-1], -1, per_byte).astype(np.uint8)
    packed = np.zeros(grouped.shape[:-1], np.uint8)
    for j in range(per_byte):
        packed |= (grouped[..., j] << (bits * j)).astype(np.uint8)
    return packed


def matmulnbits_tensors(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int,
                        block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(B, scales, zero_points)`` of a ``(K, N)`` code matrix with one width."""
    if bits not in MATMULNBITS_BITS:
        raise ValueError(f"MatMulNBits runs {MATMULNBITS_BITS} bits, not {bits}")
    k, n = codes.shape
    blocks = k // block
    b = pack_rows(codes.T.reshape(n, blocks, block), bits)
    return (np.ascontiguousarray(b), np.ascontiguousarray(scales.T.reshape(-1).astype(np.float32)),
            np.ascontiguousarray(pack_rows(zeros.T, bits).reshape(-1)))


class WidthPart(NamedTuple):
    """The part of a layer quantized at one width: one MatMulNBits node's tensors."""

    bits: int
    #: the input features (rows of the ``(K, N)`` weight) it covers: what its Gather reads when a layer
    #: has several widths
    rows: np.ndarray
    b: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray


def width_parts(quantized: GroupQuantized) -> list[WidthPart]:
    """One ``WidthPart`` per bit width of ``quantized``'s K-slices, narrowest first (a single part where the
    layer has one width): the graph builders (``replace_matmul`` on a ModelProto, ``emit.replace_linear``
    on onnx-ir) turn each into a MatMulNBits node."""
    parts = []
    for bits in sorted({int(b) for b in quantized.bits}):
        slices = np.flatnonzero(quantized.bits == bits)
        rows = (slices[:, None] * quantized.group_size + np.arange(quantized.group_size)).reshape(-1)
        b, scales, zeros = matmulnbits_tensors(quantized.codes[rows], quantized.scales[slices],
                                               quantized.zeros[slices], bits, quantized.group_size)
        parts.append(WidthPart(bits, rows, b, scales, zeros))
    return parts


def find_layer_node(proto: onnx.ModelProto, layer_id: str) -> onnx.NodeProto:
    for node in proto.graph.node:
        for prop in node.metadata_props:
            if prop.key == LAYER_ID_KEY and prop.value == f'"{layer_id}"':
                return node
    raise KeyError(f"no node carries layer id {layer_id!r}")


def replace_matmul(proto: onnx.ModelProto, layer_id: str, quantized: GroupQuantized, *, accuracy_level: int = 4,
                   lowrank: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Replace the MatMul of ``layer_id`` (in place) by MatMulNBits node(s) holding ``quantized``."""
    node = find_layer_node(proto, layer_id)
    if node.op_type != "MatMul":
        raise ValueError(f"layer {layer_id!r} is a {node.op_type}; MatMulNBits replaces a MatMul")
    x, weight_name = node.input[0], node.input[1]
    output = node.output[0]
    k, n = quantized.shape
    base = weight_name.replace("/", "_")
    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    partials: list[str] = []
    parts = width_parts(quantized)
    widths = [part.bits for part in parts]
    for bits, rows, b, scales, zeros in parts:
        tag = f"{base}_q{bits}"
        initializers += [numpy_helper.from_array(b, f"{tag}_B"), numpy_helper.from_array(scales, f"{tag}_scales"),
                         numpy_helper.from_array(zeros, f"{tag}_zero_points")]
        source = x
        if len(widths) > 1:
            initializers.append(numpy_helper.from_array(rows.astype(np.int64), f"{tag}_features"))
            source = f"{tag}_input"
            nodes.append(helper.make_node("Gather", [x, f"{tag}_features"], [source], name=f"{tag}_Gather", axis=-1))
        partial = output if len(widths) == 1 and lowrank is None else f"{tag}_output"
        nodes.append(helper.make_node(
            "MatMulNBits", [source, f"{tag}_B", f"{tag}_scales", f"{tag}_zero_points"], [partial],
            name=f"{tag}_MatMulNBits", domain="com.microsoft", K=int(len(rows)), N=int(n), bits=int(bits),
            block_size=int(quantized.group_size), accuracy_level=int(accuracy_level)))
        partials.append(partial)
    if lowrank is not None:
        a, bmat = lowrank
        initializers += [numpy_helper.from_array(np.asarray(a, np.float32), f"{base}_lorc_A"),
                         numpy_helper.from_array(np.asarray(bmat, np.float32), f"{base}_lorc_B")]
        nodes += [helper.make_node("MatMul", [x, f"{base}_lorc_A"], [f"{base}_lorc_xa"], name=f"{base}_lorc_MatMul_A"),
                  helper.make_node("MatMul", [f"{base}_lorc_xa", f"{base}_lorc_B"], [f"{base}_lorc_output"],
                                   name=f"{base}_lorc_MatMul_B")]
        partials.append(f"{base}_lorc_output")
    if len(partials) > 1:
        nodes.append(helper.make_node("Sum", partials, [output], name=f"{base}_Sum"))
    for created in nodes:
        if created.op_type == "MatMulNBits":
            created.metadata_props.extend(node.metadata_props)
    position = list(proto.graph.node).index(node)
    proto.graph.node.remove(node)
    for offset, created in enumerate(nodes):
        proto.graph.node.insert(position + offset, created)
    proto.graph.initializer.extend(initializers)
    if not any(weight_name in n.input for n in proto.graph.node):
        kept = [t for t in proto.graph.initializer if t.name != weight_name]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
