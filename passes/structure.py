"""A model's structure without its weights: what graph rules, shape inference and the version converter read.

A transformer's weights are hundreds of megabytes; the graph around them is a few. ``skeleton`` serializes an
``onnx_ir`` model with its large initializers left empty (name, type and dims kept) and returns the tensors it
left out, so a caller can re-attach them by name; ``typed_structure`` does the same for a protobuf and types
every value with ONNX shape inference. Neither copies a weight.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

#: initializers above this many bytes are left out (small ones stay: shape inference reads shape tensors)
DETACH_BYTES = 4096


def skeleton(model: ir.Model) -> tuple[onnx.ModelProto, dict[str, ir.TensorProtocol]]:
    """``model`` as a protobuf whose large initializers hold no data, and ``{name: tensor}`` of those left out."""
    graph = model.graph
    detached = {name: value.const_value for name, value in graph.initializers.items()
                if value.const_value is not None and value.const_value.nbytes > DETACH_BYTES}
    saved = {name: graph.initializers[name] for name in detached}
    for name in detached:
        graph.initializers.pop(name)
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        for name, value in saved.items():
            graph.initializers[name] = value
    for name, tensor in detached.items():
        proto.graph.initializer.add(name=name, dims=list(tensor.shape), data_type=int(tensor.dtype))
    return proto, detached


def typed_structure(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto``'s graph with every value typed by shape inference and large weights left out (their names, dims
    and types stay), built without copying a weight."""
    out = onnx.ModelProto(ir_version=proto.ir_version)
    out.opset_import.extend(proto.opset_import)
    out.functions.extend(proto.functions)
    graph = out.graph
    graph.name = proto.graph.name
    graph.node.extend(proto.graph.node)
    graph.input.extend(proto.graph.input)
    graph.output.extend(proto.graph.output)
    graph.value_info.extend(proto.graph.value_info)
    for tensor in proto.graph.initializer:
        if tensor.ByteSize() <= DETACH_BYTES:
            graph.initializer.append(tensor)
        else:
            graph.initializer.add(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)
    return infer_types(out)


def typed_skeleton(model: ir.Model) -> onnx.ModelProto:
    """``skeleton(model)`` with every value typed by shape inference."""
    return infer_types(skeleton(model)[0])


def infer_types(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - untyped values only make the callers more conservative
        return proto


def float_values(proto: onnx.ModelProto) -> set[str]:
    """Names of the floating-point values a typed proto declares (inputs, outputs, value_info)."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    return {info.name for info in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info)
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type in floats}


__all__ = ["DETACH_BYTES", "float_values", "infer_types", "skeleton", "typed_skeleton", "typed_structure"]
