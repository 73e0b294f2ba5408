"""Dynamic int8 MatMul/Gemm layers: int8 weights, activations quantized at run time.

What ONNX Runtime's ``quantize_dynamic`` writes for a MatMul, node for node, so that ORT fuses it
into one ``DynamicQuantizeMatMul`` kernel at session start::

    x -> DynamicQuantizeLinear -> (xq, x_scale, x_zero_point)
    MatMulInteger(xq, w_int8, x_zero_point, w_zero_point) -> Cast(float) -> Mul(x_scale * w_scale) -> y

It is written here rather than by calling ``quantize_dynamic`` because that function first turns
*every* Gemm of the model into MatMul + Add, renaming them, which breaks the QDQ layers next to the
dynamic ones and bitpass's layer tracking. Weights are per output channel, symmetric (zero points
0), on the narrow int8 grid [-127, 127] ([-63, 63] with ``reduce_range``). Layers that read the same
activation (a transformer's Q, K and V projections) share one ``DynamicQuantizeLinear``, as ORT's
quantizer writes them: one quantization of that activation instead of one per reader (the outputs
are the same bit for bit; on the sentence encoder the speed-up was within noise). With ``low`` (2/4-bit
storage), the int8 weight is not stored: the packed codes and the chain that widens them are
(``packing.widen_int8_weight``), folded by ORT at load.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bitpass.frontend.errors import BitpassError
from bitpass.passes.packing import LowBitWeight, widen_int8_weight


#: activation tensor -> the (codes, scale, zero point) its DynamicQuantizeLinear produces
QuantizedInputs = dict[str, tuple[str, str, str]]


def quantize_layer(proto: onnx.ModelProto, node_name: str, *, per_channel: bool = True, reduce_range: bool = False,
                   low: LowBitWeight | None = None, quantized_inputs: QuantizedInputs | None = None) -> str:
    """Rewrite the MatMul or Gemm ``node_name`` (constant weight) in place as dynamic int8; returns the name
    of the tensor the rewritten layer's last node produces (the layer's output, or its pre-bias output).

    ``quantized_inputs`` (updated in place) lets layers rewritten one after the other in graph order share
    the quantization of an activation they all read."""
    index, node = next(((i, n) for i, n in enumerate(proto.graph.node) if n.name == node_name), (None, None))
    if node is None or node.op_type not in ("MatMul", "Gemm"):
        raise BitpassError(f"dynamic int8: no MatMul/Gemm node {node_name!r}")
    inits = {t.name: t for t in proto.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.input[1] not in inits or attrs.get("transA", 0):
        raise BitpassError(f"dynamic int8: layer {node_name!r} needs a constant weight (and Gemm without transA)")
    weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    if weight.ndim != 2:
        raise BitpassError(f"dynamic int8: layer {node_name!r} has a {weight.ndim}-D weight, not 2-D")
    transposed = node.op_type == "Gemm" and bool(attrs.get("transB", 0))
    if node.op_type == "Gemm" and float(attrs.get("alpha", 1.0)) != 1.0:
        if low is not None:
            raise BitpassError(f"dynamic int8 of low-bit storage takes Gemm with alpha=1 ({node_name!r})")
        weight = weight * np.float32(attrs["alpha"])
    w = weight.T if transposed else weight  # (K, N): MatMulInteger's layout
    if low is not None:
        if transposed:  # the same codes, read in (K, N) layout: the output axis (rows of the codes) is N
            low = LowBitWeight(low.codes, low.scales, (low.shape[1], low.shape[0]), 1, low.bits, low.block_size)
        w = low.dequantized()
    qmax = 63 if reduce_range else 127
    amax = np.abs(w).max(axis=0) if per_channel else np.array(np.abs(w).max())
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
    zero = np.zeros(scale.shape, np.int8)
    prefix = node_name
    names = {k: f"{prefix}__dyn_{k}" for k in ("w", "w_scale", "w_zero", "xq", "x_scale", "x_zero", "scale", "acc",
                                                 "accf")}
    new_inits = [numpy_helper.from_array(q, names["w"]), numpy_helper.from_array(scale, names["w_scale"]),
                 numpy_helper.from_array(zero, names["w_zero"])]
    output = node.output[0]
    has_bias = node.op_type == "Gemm" and len(node.input) > 2 and bool(node.input[2])
    product = f"{output}__dyn_matmul" if has_bias else output
    shared = quantized_inputs.get(node.input[0]) if quantized_inputs is not None else None
    nodes = []
    if shared is None:
        shared = (names["xq"], names["x_scale"], names["x_zero"])
        nodes.append(helper.make_node("DynamicQuantizeLinear", [node.input[0]], list(shared),
                                      name=f"{prefix}/dynamic_quantize"))
        if quantized_inputs is not None:
            quantized_inputs[node.input[0]] = shared
    xq, x_scale, x_zero = shared
    nodes += [
        helper.make_node("Mul", [x_scale, names["w_scale"]], [names["scale"]], name=f"{prefix}/scales"),
        helper.make_node("MatMulInteger", [xq, names["w"], x_zero, names["w_zero"]],
                         [names["acc"]], name=f"{prefix}/matmul_integer"),
        helper.make_node("Cast", [names["acc"]], [names["accf"]], name=f"{prefix}/cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", [names["accf"], names["scale"]], [product], name=prefix),
    ]
    if has_bias:
        bias = node.input[2]
        beta = float(attrs.get("beta", 1.0))
        if beta != 1.0:
            scaled = numpy_helper.to_array(inits[bias]).astype(np.float32) * np.float32(beta)
            bias = f"{prefix}__dyn_bias"
            new_inits.append(numpy_helper.from_array(scaled, bias))
        nodes.append(helper.make_node("Add", [product, bias], [output], name=f"{prefix}/bias"))
    old_weight = node.input[1]
    graph_nodes = list(proto.graph.node)
    graph_nodes[index:index + 1] = nodes
    del proto.graph.node[:]
    proto.graph.node.extend(graph_nodes)
    proto.graph.initializer.extend(new_inits)
    if not any(old_weight in n.input for n in proto.graph.node):
        proto.graph.initializer.remove(inits[old_weight])
    if low is not None:
        widen_int8_weight(proto, names["w"], low, names["w_scale"], names["w_zero"], 1 if per_channel else None)
    _drop_stale_types(proto, [output, product])
    return product


def _drop_stale_types(proto: onnx.ModelProto, names: list[str]) -> None:
    kept = [v for v in proto.graph.value_info if v.name not in names]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)


def quantize_layers(proto: onnx.ModelProto, node_names: list[str], *, per_channel: bool = True,
                    reduce_range: bool = False,
                    low: Mapping[str, LowBitWeight] | None = None) -> dict[str, str]:
    """``quantize_layer`` on each node, in graph order, layers reading the same activation sharing its
    quantization; returns {tensor the rewritten layer's last node produces: node name}."""
    position = {n.name: i for i, n in enumerate(proto.graph.node)}
    quantized_inputs: QuantizedInputs = {}
    return {quantize_layer(proto, name, per_channel=per_channel, reduce_range=reduce_range,
                           low=(low or {}).get(name), quantized_inputs=quantized_inputs): name
            for name in sorted(node_names, key=lambda name: position.get(name, -1))}


__all__ = ["quantize_layer", "quantize_layers"]
