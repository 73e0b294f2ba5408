"""``smooth-quant``: migrate activation outliers into the weights before calibration (SmoothQuant, Xiao et al. 2023).

Transformer activations carry a few channels far larger than the rest, so one int8 scale per tensor rounds
the ordinary channels to a handful of levels, while the weights are easy to quantize per output channel.
For the layers that read one activation ``X`` (Q, K and V read the same tensor), each input channel ``j``
gets a factor ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``: ``X`` is divided by ``s`` and each weight's
row ``j`` multiplied by it, which leaves the fp32 outputs unchanged and evens out the activation ranges.

Where the division goes: into the LayerNormalization that produced ``X`` (its scale and bias) when the
layers are its only readers; otherwise into one new ``Mul`` by ``1/s`` in front of those layers (a post-LN
encoder such as BERT also feeds the normalized tensor to the residual sum, which must keep it unscaled).

``smooth`` is the library core (``activation_maxima`` measures ``max|X_j|`` with ONNX Runtime); the pass
runs it before ``calibrate``; ``enabled=auto`` turns it on for the transformer profile of ``quant_scope``
(MatMul layers reading a normalization, or attention).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import pydantic

from bitpass.frontend import Dataset, Layer, Model
from bitpass.frontend.layers import constant_tensor
from bitpass.frontend.errors import UsageError
from bitpass.passes import execution
from bitpass.passes.infra import DATA_CALIBRATION, PRESERVE_ALL, Pass, PassConfig, PassContext, PassResult
from bitpass.passes.quant_scope import TRANSFORMER, GraphFacts, detect_profile

#: the largest factor either way: keeps a dead channel (max 0) or a tiny weight from blowing up
MAX_FACTOR = 1e4


@dataclass
class Group:
    """Layers that read the same activation, and where that activation comes from."""

    tensor: ir.Value
    layers: list[Layer]
    #: the LayerNormalization whose scale/bias absorb the factors, or None (a Mul is inserted)
    norm: ir.Node | None


def _in_features_axis(layer: Layer) -> int:
    """Axis of the weight that runs over input channels (the one ``X``'s last axis meets)."""
    if layer.op_type == "Gemm":
        return 1 if layer.node.attributes.get_int("transB", 0) else 0
    return 0


def smoothing_groups(model: Model) -> list[Group]:
    """MatMul/Gemm layers grouped by the activation they read (weights initializers used by no other node)."""
    by_tensor: dict[int, Group] = {}
    for layer in model.layers():
        if layer.op_type not in ("MatMul", "Gemm") or layer.weight.const_value is None:
            continue
        if layer.op_type == "Gemm" and layer.node.attributes.get_int("transA", 0):
            continue
        if len(layer.weight.uses()) != 1 or layer.weight.name not in model.graph.initializers:
            continue  # a shared or non-initializer weight cannot be rescaled for this layer alone
        x = layer.node.inputs[0]
        if x is None or x.const_value is not None:
            continue
        group = by_tensor.setdefault(id(x), Group(x, [], None))
        group.layers.append(layer)
    groups = []
    for group in by_tensor.values():
        widths = {layer.weight_shape[_in_features_axis(layer)] for layer in group.layers}
        if len(widths) != 1:
            continue
        readers = {id(use.node) for use in group.tensor.uses() if use.node.op_type not in ("Shape", "Size")}
        if readers == {id(layer.node) for layer in group.layers}:
            group.norm = _absorbing_norm(group.tensor, widths.pop())
        groups.append(group)
    return groups


#: ops between a LayerNormalization and the layers that keep its last axis as the last axis
_RESHAPES = ("Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze")


def _absorbing_norm(tensor: ir.Value, channels: int) -> ir.Node | None:
    """The LayerNormalization (last axis, constant scale/bias of its own) whose output reaches ``tensor`` alone,
    through reshapes only (GPT-2's ``x.view(-1, nx)``); else None.

    A row-major reshape keeps every element's flat index, so when both ends have ``channels`` as their last
    axis (the norm's scale, the layers' input) an element's channel is its flat index modulo ``channels`` at
    both ends and a per-channel factor commutes with the reshapes. Shape/Size readers do not read values."""
    value = tensor
    for _ in range(4):
        producer = value.producer()
        if producer is None or producer.domain not in ("", "ai.onnx"):
            return None
        if producer.op_type == "LayerNormalization":
            scale = _constant(producer, 1)
            ok = (producer.attributes.get_int("axis", -1) == -1 and scale is not None and scale.shape[-1] == channels
                  and (len(producer.inputs) < 3 or producer.inputs[2] is None or _constant(producer, 2) is not None))
            return producer if ok else None
        if producer.op_type not in _RESHAPES:
            return None
        source = producer.inputs[0]
        if source is None or [u for u in source.uses() if u.node.op_type not in ("Shape", "Size")] != \
                [u for u in source.uses() if u.node is producer]:
            return None
        value = source
    return None


def _constant(node: ir.Node, index: int) -> np.ndarray | None:
    """The constant at ``node``'s input ``index`` (an initializer, a Constant, or an Identity of one), else None."""
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is not None and value.producer() is not None and value.producer().op_type == "Identity":
        value = value.producer().inputs[0]
    tensor = constant_tensor(value)
    return None if tensor is None else tensor.numpy()


def _scale_private(model: Model, node: ir.Node, index: int, factor: np.ndarray) -> None:
    """Multiply ``node``'s constant input ``index`` by ``factor`` for this node alone: an initializer of its own is
    replaced; a shared one (exporters deduplicate equal LayerNorm scales) is copied into a new one first."""
    value = node.inputs[index]
    array = _constant(node, index)
    if value is None or array is None:
        return
    scaled = (array.astype(np.float64) * factor).astype(array.dtype)
    if value.producer() is None and len(value.uses()) == 1 and value.name in model.graph.initializers:
        value.const_value = ir.tensor(scaled, name=value.name)
        return
    name = f"{node.name or node.op_type}__smoothed_{index}"
    private = ir.Value(name=name, const_value=ir.tensor(scaled, name=name))
    private.shape, private.dtype = ir.Shape(scaled.shape), ir.DataType.from_numpy(scaled.dtype)
    model.graph.register_initializer(private)
    node.replace_input_with(index, private)


def activation_maxima(model: Model, data: Dataset, tensors: Iterable[str], *,
                      batch_size: int = 32) -> dict[str, np.ndarray]:
    """``{tensor: max |x| per last-axis channel}`` over ``data``, measured in ONNX Runtime."""
    names = list(dict.fromkeys(tensors))
    maxima: dict[str, np.ndarray] = {}
    for batch in execution.intermediates(model, data, names, batch_size=batch_size,
                                         purpose="run the model to measure activation channels"):
        for name in names:
            value = np.abs(np.asarray(batch[name], dtype=np.float32))
            channel = value.reshape(-1, value.shape[-1]).max(axis=0)
            maxima[name] = channel if name not in maxima else np.maximum(maxima[name], channel)
    return maxima


def smoothing_factors(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """``s = act^alpha / w^(1-alpha)`` per channel, 1 where either is zero, clipped to [1/MAX_FACTOR, MAX_FACTOR]."""
    act = act_max.astype(np.float64)
    weight = weight_max.astype(np.float64)
    usable = (act > 0) & (weight > 0)
    s = np.ones_like(act)
    s[usable] = act[usable] ** alpha / weight[usable] ** (1.0 - alpha)
    return np.clip(s, 1.0 / MAX_FACTOR, MAX_FACTOR)


def smooth(model: Model, data: Dataset, *, alpha: float = 0.5, samples: int | None = 64,
           batch_size: int = 32) -> dict[str, Any]:
    """Migrate activation outliers of every group of MatMul/Gemm layers into their weights, in place.

    Returns what was done: per group, the layers, where ``1/s`` went, and the activation range before/after."""
    groups = smoothing_groups(model)
    if not groups:
        return {"groups": 0}
    subset = data.head(samples) if samples and samples < len(data) else data
    maxima = activation_maxima(model, subset, [g.tensor.name or "" for g in groups], batch_size=batch_size)
    done: list[dict[str, Any]] = []
    for index, group in enumerate(groups):
        act = maxima[group.tensor.name or ""]
        if act.shape[0] != group.layers[0].weight_shape[_in_features_axis(group.layers[0])]:
            continue
        weight_max = np.zeros_like(act, dtype=np.float64)
        for layer in group.layers:
            w = np.abs(layer.weight_array)
            weight_max = np.maximum(weight_max, w.max(axis=1 - _in_features_axis(layer)))
        s = smoothing_factors(act, weight_max, alpha)
        for layer in group.layers:
            axis = _in_features_axis(layer)
            shape = [1, 1]
            shape[axis] = -1
            scaled = (layer.weight_array.astype(np.float64) * s.reshape(shape)).astype(layer.weight_array.dtype)
            layer.weight.const_value = ir.tensor(scaled, name=layer.weight.name)
        where = _divide(model, group, s, index)
        done.append({"tensor": group.tensor.name, "layers": [layer.id for layer in group.layers], "into": where,
                     "activation_max": round(float(act.max()), 4),
                     "activation_max_after": round(float((act / s).max()), 4),
                     "factor_range": [round(float(s.min()), 6), round(float(s.max()), 6)]})
    return {"alpha": alpha, "samples": len(subset), "groups": len(done), "smoothed": done}


def _divide(model: Model, group: Group, s: np.ndarray, index: int) -> str:
    """Divide the group's activation by ``s``: in its LayerNormalization when it can absorb it, else a Mul."""
    inverse = (1.0 / s)
    if group.norm is not None:
        for position in (1, 2):
            if len(group.norm.inputs) > position and group.norm.inputs[position] is not None:
                _scale_private(model, group.norm, position, inverse)
        return f"LayerNormalization {group.norm.name}"
    graph = model.graph
    x = group.tensor
    dtype = x.dtype.numpy() if x.dtype is not None else np.dtype(np.float32)
    base = f"{x.name}__smooth"
    # not "<tensor>_scale": ORT's quantizer names the Q/DQ scale of the Mul's output so, and would overwrite it
    scale = ir.Value(name=f"{base}_inverse_factors",
                     const_value=ir.tensor(inverse.astype(dtype), name=f"{base}_inverse_factors"))
    graph.register_initializer(scale)
    mul = ir.Node("", "Mul", [x, scale], name=f"{base}_{index}/Mul", num_outputs=1)
    mul.outputs[0].name = base
    if x.type is not None:
        mul.outputs[0].type = x.type
        mul.outputs[0].shape = x.shape
    first = min(group.layers, key=lambda layer: _position(graph, layer.node)).node
    graph.insert_before(first, mul)
    for layer in group.layers:
        layer.node.replace_input_with(0, mul.outputs[0])
    return "Mul (inserted)"


def _position(graph: ir.Graph, node: ir.Node) -> int:
    for index, candidate in enumerate(graph):
        if candidate is node:
            return index
    return 1 << 30


class SmoothQuantConfig(PassConfig):
    #: auto: on for transformers (MatMul layers reading a normalization, or attention); on; off
    enabled: Literal["auto", "on", "off"] = "auto"
    #: migration strength: 0 leaves activations as they are, 1 moves all of their range into the weights
    alpha: float = pydantic.Field(0.5, ge=0.0, le=1.0)
    #: calibration samples measured for the channel maxima (the first ones)
    samples: int = pydantic.Field(64, ge=1)
    batch_size: int = pydantic.Field(32, ge=1)


class SmoothQuant(Pass):
    """Migrate activation outliers into weights per channel (SmoothQuant) before calibration; auto: transformers."""

    name = "smooth-quant"
    Config = SmoothQuantConfig
    requires = frozenset({DATA_CALIBRATION})
    in_place = True
    config: SmoothQuantConfig

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        if cfg.enabled == "off":
            ctx.records["smooth_quant"] = {"enabled": False, "why": "enabled=off"}
            return PassResult(model, modified=False, preserved=PRESERVE_ALL)
        if cfg.enabled == "auto":
            profile, why = detect_profile(GraphFacts.from_graph(model.graph))
            if profile != TRANSFORMER:
                ctx.records["smooth_quant"] = {"enabled": False, "why": f"auto: not a transformer ({why})"}
                return PassResult(model, modified=False, preserved=PRESERVE_ALL)
        if ctx.calibration is None:
            raise UsageError("smooth-quant needs calibration data (--calib FILE) to measure activation channels")
        ctx.progress(f"smooth-quant(alpha={cfg.alpha}): measuring activation channels")
        record = smooth(model, ctx.calibration, alpha=cfg.alpha, samples=cfg.samples, batch_size=cfg.batch_size)
        ctx.records["smooth_quant"] = {"enabled": True, **record}
        return PassResult(model, modified=bool(record.get("groups")))


__all__ = ["Group", "SmoothQuant", "activation_maxima", "smooth", "smoothing_factors", "smoothing_groups"]
