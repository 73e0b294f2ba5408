"""Weight-only low-bit layers on an ONNX protobuf: ORT's MatMulNBits for MatMul/Gemm, blocked
DequantizeLinear for Conv (ORT has no Conv weight-only quantizer, so it is written here).

``rewrite`` is what ``materialize`` runs for the layers it decided are ``matmulnbits`` or
``blocked-dq``; ``gemm_to_matmul_add`` and ``conv_blocked_dq`` are its two graph edits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bitpass.frontend.errors import BitpassError
from bitpass.passes.execution import first_line

MATMUL_NBITS = "matmulnbits"
BLOCKED_DQ = "blocked-dq"


class WeightOnlyLayer(Protocol):
    """What ``rewrite`` needs to know of a layer (``materialize.Decision`` is one)."""

    layer_id: str
    node_name: str
    weight_bits: int
    result: str


def rewrite(proto: onnx.ModelProto, plans: Sequence[WeightOnlyLayer], *, block_size: int, accuracy_level: int,
            symmetric: bool) -> tuple[onnx.ModelProto, dict[str, str]]:
    """MatMulNBits for MatMul/Gemm, blocked DequantizeLinear for Conv. Returns the model and
    {output tensor of the new node: original node name} for annotation restoring."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    output_to_layer: dict[str, str] = {}
    inits = {t.name: t for t in proto.graph.initializer}
    matmul_bits: dict[str, int] = {}
    matmul_out: dict[str, str] = {}
    for plan in plans:
        # Look the node up afresh: each rewrite rebuilds graph.node, detaching earlier NodeProto references.
        node = next((n for n in proto.graph.node if n.name == plan.node_name), None)
        if node is None:
            raise BitpassError(f"layer {plan.layer_id!r}: node {plan.node_name!r} vanished before weight-only "
                               f"quantization")
        if plan.result == MATMUL_NBITS:
            if node.op_type == "Gemm":
                node = gemm_to_matmul_add(proto, node, inits)
            output_to_layer[node.output[0]] = plan.node_name
            matmul_bits[node.name] = plan.weight_bits
            matmul_out[node.name] = node.output[0]
        else:
            output_to_layer[node.output[0]] = plan.node_name
            conv_blocked_dq(proto, node, inits, plan.weight_bits, block_size)
    if opset(proto) < 21 and any(p.result == BLOCKED_DQ for p in plans):
        raise BitpassError("blocked int4 DequantizeLinear needs opset 21; the model is at opset "
                           f"{opset(proto)}")
    all_matmuls = [n.name for n in proto.graph.node if n.op_type == "MatMul"]
    for bits in sorted(set(matmul_bits.values())):
        chosen = {name for name, b in matmul_bits.items() if b == bits}
        try:
            quantizer = mnb.MatMulNBitsQuantizer(
                proto, bits=bits, block_size=block_size, is_symmetric=symmetric,
                accuracy_level=accuracy_level or None, op_types_to_quantize=("MatMul",),
                nodes_to_exclude=[n for n in all_matmuls if n not in chosen],
            )
            quantizer.process()
        except Exception as err:
            raise BitpassError(f"ONNX Runtime's MatMulNBits quantizer failed ({bits}-bit, "
                               f"{', '.join(sorted(chosen))}): {first_line(err)}") from err
        proto = quantizer.model.model
        produced = {n.output[0] for n in proto.graph.node if n.op_type == "MatMulNBits"}
        missing = sorted(name for name in chosen if matmul_out[name] not in produced)
        if missing:
            raise BitpassError(f"MatMulNBits did not quantize {', '.join(missing)} ({bits}-bit): the weight must "
                               f"be a constant 2-D tensor")
    return proto, output_to_layer


def opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def gemm_to_matmul_add(proto: onnx.ModelProto, node: onnx.NodeProto,
                       inits: dict[str, onnx.TensorProto]) -> onnx.NodeProto:
    """Rewrite a Gemm with constant B in place as MatMul (named after the Gemm) + Add."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0):
        raise BitpassError(f"Gemm {node.name!r} with transA cannot become MatMulNBits")
    weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    if attrs.get("transB", 0):
        weight = weight.T
    weight = np.ascontiguousarray(weight * np.float32(attrs.get("alpha", 1.0)))
    base = node.name
    weight_name = f"{node.input[1]}__matmul"
    proto.graph.initializer.append(numpy_helper.from_array(weight, weight_name))
    inits[weight_name] = proto.graph.initializer[-1]
    output = node.output[0]
    matmul = helper.make_node("MatMul", [node.input[0], weight_name], [f"{output}__matmul"], name=base)
    replacement = [matmul]
    if len(node.input) > 2 and node.input[2]:
        bias_name = node.input[2]
        beta = float(attrs.get("beta", 1.0))
        if beta != 1.0:
            bias = numpy_helper.to_array(inits[bias_name]).astype(np.float32) * np.float32(beta)
            bias_name = f"{bias_name}__beta"
            proto.graph.initializer.append(numpy_helper.from_array(bias, bias_name))
        replacement.append(helper.make_node("Add", [matmul.output[0], bias_name], [output], name=f"{base}/bias"))
    else:
        matmul.output[0] = output
    nodes = list(proto.graph.node)
    index = next(i for i, n in enumerate(nodes) if n.name == node.name)
    nodes[index : index + 1] = replacement
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return matmul


def conv_blocked_dq(proto: onnx.ModelProto, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                    bits: int, block_size: int) -> None:
    """Conv weight → int4/int8 [O, I*kh*kw] blocked along axis 1, DequantizeLinear, Reshape back."""
    name = node.input[1]
    weight = numpy_helper.to_array(inits[name]).astype(np.float32)
    out_ch = weight.shape[0]
    flat = weight.reshape(out_ch, -1)
    k = flat.shape[1]
    blocks = math.ceil(k / block_size)
    padded = np.zeros((out_ch, blocks * block_size), np.float32)
    padded[:, :k] = flat
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(padded.reshape(out_ch, blocks, block_size)).max(axis=2) / qmax
    scale[scale == 0] = 1.0
    q = np.clip(np.round(padded.reshape(out_ch, blocks, block_size) / scale[:, :, None]), -qmax - 1, qmax)
    q = q.reshape(out_ch, -1)[:, :k]
    dtype = onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8
    prefix = f"{name}_DQ_Q{bits}"
    if bits == 4:
        q_tensor = helper.make_tensor(prefix, dtype, q.shape, q.astype(np.int8).flatten().tolist())
    else:
        q_tensor = numpy_helper.from_array(q.astype(np.int8), prefix)
    scale_tensor = numpy_helper.from_array(scale.astype(np.float32), f"{prefix}_scales")
    shape_tensor = numpy_helper.from_array(np.array(weight.shape, dtype=np.int64), f"{prefix}_shape")
    proto.graph.initializer.extend([q_tensor, scale_tensor, shape_tensor])
    dq_attrs: dict[str, Any] = {"axis": 1}
    if blocks > 1 or bits == 4:
        dq_attrs["block_size"] = block_size
    dq = helper.make_node("DequantizeLinear", [prefix, f"{prefix}_scales"], [f"{prefix}_flat"],
                          name=f"{node.name}/weight_dq", **dq_attrs)
    reshape = helper.make_node("Reshape", [f"{prefix}_flat", f"{prefix}_shape"], [f"{prefix}_weight"],
                               name=f"{node.name}/weight_reshape")
    node.input[1] = f"{prefix}_weight"
    nodes = list(proto.graph.node)
    index = next(i for i, n in enumerate(nodes) if n.name == node.name)
    nodes[index:index] = [dq, reshape]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    still_used = any(name in n.input for n in proto.graph.node)
    if not still_used:
        proto.graph.initializer.remove(inits.pop(name))
