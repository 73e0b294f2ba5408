"""Bias correction for int8 layers (Nagel et al., data-free quantization, sec. 4.2).

Rounding a layer's weight to int8 shifts the mean of its output by ``(W_q - W) @ E[x]``; subtracting
that from the bias removes the shift. ``E[x]`` per input channel is measured with ONNX Runtime on
calibration data, on the model exactly as written (no graph optimizations); ``W_q`` is the
per-output-channel symmetric int8 rounding ONNX Runtime's QDQ quantizer applies.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir

from bitpass.frontend import Dataset
from bitpass.frontend.layers import constant_tensor
from bitpass.passes import execution


def correctable(graph: ir.Graph, node_names: Iterable[str]) -> list[ir.Node]:
    """The named nodes whose bias can be corrected: Conv, or Gemm with transB=1, with a constant bias."""
    nodes = {n.name: n for n in graph}
    targets = []
    for name in node_names:
        node = nodes[name]
        if len(node.inputs) < 3 or node.inputs[2] is None or constant_tensor(node.inputs[2]) is None:
            continue
        if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) != 1:
            continue
        if node.op_type not in ("Conv", "Gemm"):
            continue
        targets.append(node)
    return targets


def input_means(proto: onnx.ModelProto, names: list[str], data: Dataset, *,
                batch_size: int = 64) -> dict[str, np.ndarray]:
    """``{tensor: mean over every axis but 1}`` of each tensor in ``names`` over ``data`` (float64)."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in execution.intermediates(proto, data, names, batch_size=batch_size, config=execution.UNOPTIMIZED,
                                         purpose="run the model to measure layer input means"):
        for name in dict.fromkeys(names):
            value = np.asarray(batch[name], dtype=np.float64)
            axes = tuple(i for i in range(value.ndim) if i != 1)
            sums[name] = sums.get(name, 0) + value.sum(axis=axes)
            counts[name] = counts.get(name, 0) + int(np.prod([value.shape[i] for i in axes]))
    return {name: sums[name] / counts[name] for name in sums}


def correct_biases(proto: onnx.ModelProto, node_names: Iterable[str], data: Dataset, *,
                   reduce_range: bool = False) -> onnx.ModelProto:
    """``proto`` with the bias of each named int8 layer corrected for its weight rounding (a layer
    without a bias, or a Gemm without transB, is left as it is)."""
    ir_model = ir.serde.deserialize_model(proto)  # no Model(): it would stamp annotations
    graph = ir_model.graph
    targets = correctable(graph, node_names)
    if not targets:
        return proto
    means = input_means(ir.serde.serialize_model(ir_model), [n.inputs[0].name for n in targets], data)
    qmax = 63 if reduce_range else 127
    for node in targets:
        mean = means[node.inputs[0].name]
        w = constant_tensor(node.inputs[1]).numpy().astype(np.float64)
        flat = w.reshape(w.shape[0], -1)
        scale = np.abs(flat).max(axis=1) / qmax
        scale[scale == 0] = 1.0
        wq = (np.clip(np.round(flat / scale[:, None]), -qmax, qmax) * scale[:, None]).reshape(w.shape)
        delta = wq - w
        if node.op_type == "Conv":
            # E[x] per input channel, spatially uniform (ignores zero padding at the borders)
            if delta.shape[1] != len(mean):
                continue
            shift = delta.reshape(delta.shape[0], delta.shape[1], -1).sum(axis=2) @ mean
        else:
            shift = delta @ mean
        _replace_bias(graph, node, constant_tensor(node.inputs[2]).numpy().astype(np.float64) - shift)
    return ir.serde.serialize_model(ir_model)


def _replace_bias(graph: ir.Graph, node: ir.Node, bias: np.ndarray) -> None:
    """Give ``node`` the new bias: in place when only it reads the old one, else as a new initializer."""
    value = node.inputs[2]
    new = ir.tensor(bias.astype(np.float32), name=value.name)
    if value.const_value is not None and len(value.uses()) == 1:
        value.const_value = new
        return
    name = f"{value.name}__bias_corrected"
    fresh = ir.Value(name=name, shape=value.shape, type=value.type, const_value=ir.tensor(new.numpy(), name=name))
    graph.register_initializer(fresh)
    node.replace_input_with(2, fresh)
