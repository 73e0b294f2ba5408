"""Quantizable units: the layers passes act on, each with a stable id.

A quantizable unit is a Conv, ConvTranspose or Gemm, a MatMul whose second
input is a constant, or an embedding-like Gather over a constant table. The id
is written once, at import, into the node's ``bitpass.layer_id`` annotation, so
it survives renaming, saving and fusion (fusion keeps the weight-bearing node's
annotations; see ``annotation.merge``).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from bitpass.frontend import annotation

# op type -> index of the constant weight input
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "Gather": 0}


@dataclass(frozen=True)
class Layer:
    """One quantizable unit of a model."""

    id: str
    node: ir.Node
    weight: ir.Value

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def weight_array(self) -> np.ndarray:
        tensor = constant_tensor(self.weight)
        assert tensor is not None, "a layer's weight is constant by construction"
        return tensor.numpy()

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.weight_array.shape)

    @property
    def params(self) -> int:
        return int(np.prod(self.weight_shape))


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant behind ``value`` (an initializer or a Constant node), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.as_tensor()
    return None


def weight_value(node: ir.Node) -> ir.Value | None:
    """The constant weight of ``node`` if it is a quantizable unit, else None."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_INPUT:
        return None
    index = WEIGHT_INPUT[node.op_type]
    if len(node.inputs) <= index:
        return None
    value = node.inputs[index]
    tensor = constant_tensor(value)
    if tensor is None or tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        return None
    if node.op_type == "MatMul" and len(tensor.shape) != 2:
        return None
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0) != 0:
        return None
    return value


def quantizable_layers(graph: ir.Graph) -> list[Layer]:
    """The graph's quantizable units, in topological order, with their ids."""
    layers = []
    for node in graph:
        weight = weight_value(node)
        layer_id = annotation.layer_id(node)
        if weight is not None and layer_id is not None:
            layers.append(Layer(layer_id, node, weight))
    return layers


def _candidate_id(node: ir.Node, weight: ir.Value, index: int) -> str:
    name = weight.name or ""
    for suffix in (".weight", "_weight", ".W", "_W"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    scope = _torch_module_path(node)
    if scope:
        return scope
    if node.name:
        return re.sub(r"[^A-Za-z0-9_.\-/]", "_", node.name)
    return f"{node.op_type.lower()}_{index}"


def _torch_module_path(node: ir.Node) -> str | None:
    """The torch module path a dynamo-exported node came from (its ``pkg.torch.onnx.name_scopes``
    metadata: ``['', 'blocks.0', 'blocks.0.fc1', 'linear_3']`` -> ``blocks.0.fc1``). An ``nn.Linear``
    on a 3-D input exports as MatMul(x, Transpose(weight)): after folding, its weight is an anonymous
    ``val_N`` and the module path is the only name that lets gradient sensitivity find the weight."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    try:
        names = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(names, list) or len(names) < 2 or not isinstance(names[-2], str) or not names[-2]:
        return None
    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", names[-2])


def assign_layer_ids(graph: ir.Graph) -> int:
    """Give every quantizable unit without an id a unique one; returns how many were new."""
    taken = {annotation.layer_id(n) for n in graph} - {None}
    assigned = 0
    for index, node in enumerate(graph):
        weight = weight_value(node)
        if weight is None or annotation.layer_id(node) is not None:
            continue
        base = candidate = _candidate_id(node, weight, index)
        suffix = 1
        while candidate in taken:
            suffix += 1
            candidate = f"{base}#{suffix}"
        annotation.set_layer_id(node, candidate)
        taken.add(candidate)
        assigned += 1
    return assigned
