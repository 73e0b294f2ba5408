"""Write pre-quantized weights into a model's graph in place (onnx-ir), one layer at a time.

* A linear layer (``MatMul`` with a constant ``(K, N)`` weight, or ``Gemm`` with a constant weight and no
  ``transA``) becomes ONNX Runtime's ``MatMulNBits`` holding its codes (``matmulnbits.py`` has the layout;
  a layer whose K-slices have several widths becomes one node per width over a ``Gather`` of its input
  features, summed; a low-rank correction adds ``(x A) B``); a Gemm's bias and ``alpha``/``beta`` stay exact.
* An embedding table (``Gather`` on axis 0 of a constant ``(V, E)``) becomes ``GatherBlockQuantized``: rows
  blocked along E with a scale and zero point per block, 4 or 8 bits, unpacked only for the gathered rows.

Each edit drops the fp32 weight as soon as nothing else reads it, so a large model never holds both forms of
more than one layer. The replacing node keeps the original's metadata (the layer id and annotations), and
its output is the original output value: everything downstream is untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from bitpass.frontend.layers import Layer
from bitpass.passes.weight_only.codebooks import CodebookQuantized, codebook
from bitpass.passes.weight_only.grid import GroupQuantized
from bitpass.passes.weight_only.matmulnbits import MATMULNBITS_BITS, pack_rows, width_parts

MS_DOMAIN = "com.microsoft"
#: code widths ``GatherBlockQuantized`` takes for uint8 data (4: two codes per byte)
GATHER_BITS = (4, 8)


def linear_weight(layer: Layer) -> np.ndarray | None:
    """The layer's weight as a MatMul's ``(K, N)`` float32 matrix; None when it is not a plain linear layer."""
    node = layer.node
    weight = np.asarray(layer.weight_array, np.float32)
    if node.op_type == "MatMul" and weight.ndim == 2:
        return weight
    if node.op_type == "Gemm" and weight.ndim == 2 and not node.attributes.get_int("transA", 0):
        matrix = weight.T if node.attributes.get_int("transB", 0) else weight
        return np.ascontiguousarray(matrix * np.float32(node.attributes.get_float("alpha", 1.0)))
    return None


def input_features(layer: Layer) -> int | None:
    """K of a linear layer's ``(K, N)`` weight, read off the constant's shape (no weight bytes touched)."""
    node = layer.node
    tensor = layer.weight.const_value
    shape = tuple(tensor.shape) if tensor is not None else layer.weight_shape
    if len(shape) != 2:
        return None
    if node.op_type == "MatMul":
        return int(shape[0])
    if node.op_type == "Gemm" and not node.attributes.get_int("transA", 0):
        return int(shape[1] if node.attributes.get_int("transB", 0) else shape[0])
    return None


def embedding_table(layer: Layer) -> np.ndarray | None:
    """A ``Gather`` layer's ``(V, E)`` table when it looks rows up along axis 0 (an embedding)."""
    node = layer.node
    if node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0:
        return None
    table = np.asarray(layer.weight_array, np.float32)
    return table if table.ndim == 2 else None


def _constant(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    value = ir.Value(name=_unique(graph, name), const_value=ir.tensor(np.ascontiguousarray(array)))
    value.const_value.name = value.name  # type: ignore[union-attr]
    graph.register_initializer(value)
    return value


def _unique(graph: ir.Graph, name: str) -> str:
    taken = graph.initializers
    candidate, suffix = name, 1
    while candidate in taken:
        suffix += 1
        candidate = f"{name}__{suffix}"
    return candidate


def _drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    if value is not None and value.name in graph.initializers and not value.uses() and not value.is_graph_output():
        del graph.initializers[value.name]


def _replace(graph: ir.Graph, old: ir.Node, new_nodes: Sequence[ir.Node], result: ir.Value) -> None:
    """Insert ``new_nodes`` where ``old`` was; ``result`` takes over ``old``'s output (name included)."""
    output = old.outputs[0]
    weights = list(old.inputs[1:])
    ir.convenience.replace_nodes_and_values(graph, old, [old], list(new_nodes), [output], [result])
    for value in weights:
        _drop_if_unused(graph, value)


def _ensure_domain(graph: ir.Graph) -> None:
    if MS_DOMAIN not in graph.opset_imports:
        graph.opset_imports[MS_DOMAIN] = 1


def codebook_weight(graph: ir.Graph, quantized: CodebookQuantized, tag: str) -> tuple[list[ir.Node], ir.Value]:
    """Constant-only nodes that rebuild the fp32 ``(K, N)`` weight from codebook codes: 4-bit codes two to a byte
    (low nibble first), 8-bit codes one per byte; ``Gather`` from the format's table, times each group's scale.
    Every input is an initializer, so ONNX Runtime folds the chain once at session start (the layer then runs
    the fp32 MatMul; the file holds the codes)."""
    k, n = quantized.shape
    g = quantized.group_size
    flat = np.ascontiguousarray(quantized.codes).reshape(-1)
    nodes: list[ir.Node] = []

    def op(op_type: str, inputs: list[ir.Value], suffix: str, **attributes: object) -> ir.Value:
        nodes.append(ir.node(op_type, inputs, attributes, name=f"{tag}_{suffix}"))
        return nodes[-1].outputs[0]

    if int(quantized.bits[0]) == 4:
        packed = _constant(graph, (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).reshape(-1, 1), f"{tag}_codes")
        shifts = _constant(graph, np.array([0, 4], np.uint8), f"{tag}_shifts")
        lanes = op("BitShift", [packed, shifts], "lanes", direction="RIGHT")
        nibbles = op("Mod", [lanes, _constant(graph, np.array(16, np.uint8), f"{tag}_modulus")], "nibbles")
        codes = op("Reshape", [nibbles, _constant(graph, np.array([-1], np.int64), f"{tag}_flat")], "codes")
    else:
        codes = _constant(graph, flat, f"{tag}_codes")
    indices = op("Cast", [codes], "indices", to=ir.DataType.INT64)
    table = graph.initializers.get(f"codebook_{quantized.format}")  # one table per graph, shared by the layers
    if table is None or not np.array_equal(table.const_value.numpy(), codebook(quantized.format)):  # type: ignore
        table = _constant(graph, codebook(quantized.format), f"codebook_{quantized.format}")
    values = op("Gather", [table, indices], "values", axis=0)
    grouped = op("Reshape", [values, _constant(graph, np.array([k // g, g, n], np.int64), f"{tag}_grouped")],
                 "grouped")
    scales = _constant(graph, quantized.scales.reshape(k // g, 1, n).astype(np.float32), f"{tag}_scales")
    scaled = op("Mul", [grouped, scales], "scaled")
    weight = op("Reshape", [scaled, _constant(graph, np.array([k, n], np.int64), f"{tag}_shape")], "weight")
    return nodes, weight


def replace_linear(graph: ir.Graph, layer: Layer, quantized: GroupQuantized | CodebookQuantized, *,
                   lowrank: tuple[np.ndarray, np.ndarray] | None = None, accuracy_level: int = 4) -> list[ir.Node]:
    """Replace ``layer`` (MatMul or Gemm) by MatMulNBits node(s) holding ``quantized`` (integer grids), or by a
    MatMul of the weight a codebook chain rebuilds at load (FP4/NF4/FP8); returns the new nodes."""
    node = layer.node
    k, n = quantized.shape
    x = node.inputs[0]
    base = (node.name or layer.id).replace("/", "_")
    metadata = dict(node.metadata_props)
    new_nodes: list[ir.Node] = []
    partials: list[ir.Value] = []
    if isinstance(quantized, CodebookQuantized):
        new_nodes, weight = codebook_weight(graph, quantized, f"{base}_{quantized.format}")
        matmul = ir.node("MatMul", [x, weight], name=node.name or base, metadata_props=metadata)
        new_nodes.append(matmul)
        partials.append(matmul.outputs[0])
        parts = []
    else:
        widths = sorted({int(b) for b in quantized.bits})
        if any(b not in MATMULNBITS_BITS for b in widths):
            raise ValueError(f"layer {layer.id!r}: MatMulNBits runs {MATMULNBITS_BITS} bits, not {widths}")
        parts = width_parts(quantized)
    for bits, rows, b, scales, zeros in parts:
        tag = f"{base}_q{bits}"
        source = x
        if len(parts) > 1:
            features = _constant(graph, rows.astype(np.int64), f"{tag}_features")
            gather = ir.node("Gather", [x, features], {"axis": -1}, name=f"{tag}_Gather")
            new_nodes.append(gather)
            source = gather.outputs[0]
        matmul = ir.node("MatMulNBits", [source, _constant(graph, b, f"{tag}_B"),
                                         _constant(graph, scales, f"{tag}_scales"),
                                         _constant(graph, zeros, f"{tag}_zero_points")],
                         {"K": int(len(rows)), "N": int(n), "bits": int(bits), "block_size": int(quantized.group_size),
                          "accuracy_level": int(accuracy_level)},
                         domain=MS_DOMAIN, name=f"{tag}_MatMulNBits" if partials else (node.name or tag),
                         metadata_props=dict(metadata) if not partials else None)
        new_nodes.append(matmul)
        partials.append(matmul.outputs[0])
    if lowrank is not None:
        a, bmat = lowrank
        first = ir.node("MatMul", [x, _constant(graph, np.asarray(a, np.float32), f"{base}_lorc_A")],
                        name=f"{base}_lorc_MatMul_A")
        second = ir.node("MatMul", [first.outputs[0], _constant(graph, np.asarray(bmat, np.float32), f"{base}_lorc_B")],
                         name=f"{base}_lorc_MatMul_B")
        new_nodes += [first, second]
        partials.append(second.outputs[0])
    result = partials[0]
    if len(partials) > 1:
        total = ir.node("Sum", partials, name=f"{base}_Sum")
        new_nodes.append(total)
        result = total.outputs[0]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = node.inputs[2]
        beta = node.attributes.get_float("beta", 1.0)
        if beta != 1.0:
            bias = _constant(graph, np.asarray(bias.const_value.numpy(), np.float32) * np.float32(beta),  # type: ignore
                             f"{base}_bias")
        add = ir.node("Add", [result, bias], name=f"{base}_bias")
        new_nodes.append(add)
        result = add.outputs[0]
    _ensure_domain(graph)
    _replace(graph, node, new_nodes, result)
    return new_nodes


def quantize_table(table: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest codes, scales and zero points of a ``(V, E)`` table blocked along E (asymmetric, the
    range holding 0): ``(codes uint8 (V, E), scales (V, E / block), zeros uint8 (V, E / block))``."""
    v, e = table.shape
    if e % block:
        raise ValueError(f"block {block} does not divide the embedding width {e}")
    blocks = table.reshape(v, e // block, block).astype(np.float32)
    low, high = np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)
    top = 2 ** bits - 1
    scales = np.where(high > low, (high - low) / top, 1.0).astype(np.float32)
    zeros = np.clip(np.round(-low / scales), 0, top)
    codes = np.clip(np.round(blocks / scales[..., None] + zeros[..., None]), 0, top)
    return codes.reshape(v, e).astype(np.uint8), scales, zeros.astype(np.uint8)


def replace_embedding(graph: ir.Graph, layer: Layer, bits: int, block: int) -> tuple[list[ir.Node], np.ndarray]:
    """Replace a ``Gather`` embedding lookup by ``GatherBlockQuantized`` (round-to-nearest, ``bits`` 4 or 8);
    returns the new node and the dequantized table (what the model now computes with)."""
    if bits not in GATHER_BITS:
        raise ValueError(f"layer {layer.id!r}: GatherBlockQuantized takes {GATHER_BITS} bits, not {bits}")
    table = embedding_table(layer)
    if table is None:
        raise ValueError(f"layer {layer.id!r} is not an embedding lookup (Gather on axis 0 of a 2-D table)")
    node = layer.node
    codes, scales, zeros = quantize_table(table, bits, block)
    packed = pack_rows(codes, bits) if bits < 8 else codes
    packed_zeros = pack_rows(zeros, bits) if bits < 8 else zeros
    base = (node.name or layer.id).replace("/", "_")
    gather = ir.node("GatherBlockQuantized",
                     [_constant(graph, packed, f"{base}_q{bits}_data"), node.inputs[1],
                      _constant(graph, scales, f"{base}_q{bits}_scales"),
                      _constant(graph, packed_zeros, f"{base}_q{bits}_zero_points")],
                     {"gather_axis": 0, "quantize_axis": 1, "block_size": int(block), "bits": int(bits)},
                     domain=MS_DOMAIN, name=node.name or f"{base}_GatherBlockQuantized",
                     metadata_props=dict(node.metadata_props))
    _ensure_domain(graph)
    output = node.outputs[0]
    table_value = node.inputs[0]
    ir.convenience.replace_nodes_and_values(graph, node, [node], [gather], [output], [gather.outputs[0]])
    _drop_if_unused(graph, table_value)
    dequantized = ((codes.reshape(*scales.shape, block).astype(np.float32) - zeros[..., None])
                   * scales[..., None]).reshape(table.shape)
    return [gather], dequantized
