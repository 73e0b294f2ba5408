"""Structured channel pruning as a library: trace, group, count, plan and apply channel removal.

For every producer layer (Conv/ConvTranspose with group=1, Gemm, MatMul with a constant weight)
the channels of its output are traced forward through the ops that keep them in place:

* element-wise unary ops (Relu, Clip, Sigmoid, Dropout, Identity, ...) and spatial pooling
  (MaxPool, AveragePool, GlobalAveragePool, ...): followed;
* BatchNormalization (unfused): its scale, bias, mean and variance are sliced, then followed;
* binary element-wise ops (Add, Sub, Mul, Div, Max, Min) with a constant operand: a per-channel
  constant is sliced, a broadcast one is kept; with two computed operands (a residual Add) the
  producers of both sides become one **group** that removes the same channel set;
* Concat along the channel axis: followed with the input's channel offset;
* Flatten(axis=1) or a Reshape to (N, C*H*W): followed in blocks of H*W features (the Reshape
  gets the shape (0, -1) with allowzero=0, so it no longer spells the old size);
* the consumers' input channels are sliced: Conv (group=1) and ConvTranspose weights, Gemm
  columns (blocks after a flatten), MatMul rows.

Anything else that reads the channels (a graph output, a depthwise Conv, Softmax, a shared
constant, an unknown shape where one is needed, a residual Add whose other side cannot be pruned
with it) makes tracing **refuse** that producer (its whole group) with the reason.

The steps, each usable alone (``prune-channels`` runs them all; joint allocation counts channels
with ``count``, offers only layers ``trace`` + ``group`` can prune alone, and removes its planned
channel counts with ``plan`` + ``apply``):

* ``trace(layers)``: each layer's ``Region`` (what its channels touch), or why not;
* ``group(regions, refused)``: producers tied by residual ops, pruned as one;
* ``count(channels, ratio, round_to=, min_channels=)``: how many channels a ratio removes;
* ``plan(model, regions, groups, remove, method=)``: which channels, by importance (``l1``/``l2``
  norm of the output-channel weights, ``bn`` |gamma|, ``taylor`` on the torch module);
* ``apply(model, regions, removed)``: slice every constant, shrink shapes, fix flattening
  Reshapes, drop dead nodes, re-infer shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from bitpass.frontend import Dataset, Layer, Model
from bitpass.frontend.errors import UsageError
from bitpass.passes.pruning.common import is_initializer, output_axis, set_constant

UNARY = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Clip", "Elu", "Selu",
                   "Celu", "Gelu", "Softplus", "Softsign", "Mish", "Erf", "Neg", "Abs", "Dropout", "Identity",
                   "Sqrt", "Exp", "Log", "Reciprocal", "ThresholdedRelu", "Sin", "Cos", "Floor", "Ceil", "Round"})
POOL = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min"})


class Refused(Exception):
    """A producer's channels cannot be removed; the message says why."""


@dataclass
class Point:
    """Where a producer's channel r lands in some tensor: positions ``off + r*blk + k`` for k < blk."""

    off: int = 0
    blk: int = 1

    def positions(self, removed: Iterable[int]) -> set[int]:
        return {self.off + r * self.blk + k for r in removed for k in range(self.blk)}


@dataclass
class Region:
    """What removing a producer's output channels touches."""

    producer: Layer
    channels: int
    #: (value, axis, point): tensors whose channel dimension shrinks
    values: list[tuple[ir.Value, int, Point]] = field(default_factory=list)
    #: (node, input index, axis, point): constants to slice (BN parameters, consumer weights, ...)
    slices: list[tuple[ir.Node, int, int, Point]] = field(default_factory=list)
    reshapes: list[ir.Node] = field(default_factory=list)
    #: (node, input index, point): binary ops with two computed operands that this producer reaches
    ties: list[tuple[ir.Node, int, Point]] = field(default_factory=list)
    #: first BatchNormalization directly after the producer (for method=bn)
    batchnorm: ir.Node | None = None


def _dim(value: ir.Value, axis: int) -> int | None:
    if value.shape is None or axis >= len(value.shape):
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else None


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _single_use_constant(node: ir.Node, index: int) -> ir.Value:
    value = node.inputs[index]
    if not is_initializer(value):
        raise Refused(f"input {index} of {node.op_type} node {node.name!r} is not an initializer")
    if len(value.uses()) > 1:
        raise Refused(f"constant {value.name!r} is shared by {len(value.uses())} nodes")
    return value


def _producer_axis(layer: Layer) -> int:
    out = layer.node.outputs[0]
    if layer.op_type in ("Conv", "ConvTranspose"):
        return 1
    if layer.op_type == "Gemm":
        return 1
    rank = _rank(out)
    if rank is None:
        raise Refused(f"the output rank of MatMul {layer.node.name!r} is unknown")
    return rank - 1


def trace_layer(layer: Layer) -> Region:
    """The region of ``layer``'s output channels; raises ``Refused`` with the reason."""
    node = layer.node
    if node.domain not in ("", "ai.onnx"):
        raise Refused(f"{node.op_type} is not a standard op")
    if layer.op_type in ("Conv", "ConvTranspose") and node.attributes.get_int("group", 1) != 1:
        raise Refused("grouped/depthwise convolution")
    if layer.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        raise Refused("Gemm with transA")
    if layer.op_type == "Gather":
        raise Refused("embedding tables have no output channels to remove")
    channels = layer.weight_shape[output_axis(layer)]
    region = Region(layer, channels)
    weight = _single_use_constant(node, 1)
    region.slices.append((node, 1, output_axis(layer), Point()))
    del weight
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = _single_use_constant(node, 2)
        arr = bias.const_value.numpy()
        if arr.ndim >= 1 and arr.shape[-1] == channels:
            region.slices.append((node, 2, arr.ndim - 1, Point()))
    axis = _producer_axis(layer)
    out = node.outputs[0]
    region.values.append((out, axis, Point()))
    seen: set[tuple[int, int, int]] = set()
    _follow(region, out, axis, Point(), False, seen, first=True)
    return region


def _follow(region: Region, value: ir.Value, axis: int, point: Point, flat: bool,
            seen: set[tuple[int, int, int]], first: bool = False) -> None:
    if value.is_graph_output():
        raise Refused(f"the channels reach the graph output {value.name!r}")
    for node, index in [(u.node, u.idx) for u in value.uses()]:
        key = (id(node), index, point.off)
        if key in seen:
            continue
        seen.add(key)
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise Refused(f"{node.domain}::{op} node {node.name!r} reads the channels")
        where = f"{op} node {node.name!r}"
        if op in UNARY and index == 0:
            _continue(region, node, axis, point, flat, seen)
        elif op in POOL and index == 0 and axis == 1 and not flat:
            _continue(region, node, axis, point, flat, seen)
        elif op == "BatchNormalization" and index == 0 and axis == 1 and not flat:
            if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
                raise Refused(f"{where} in training mode")
            for i in range(1, 5):
                _single_use_constant(node, i)
                region.slices.append((node, i, 0, point))
            if first and region.batchnorm is None and point.off == 0:
                region.batchnorm = node
            _continue(region, node, axis, point, flat, seen, first=first)
        elif op in BINARY:
            _binary(region, node, index, value, axis, point)
            _continue(region, node, axis, point, flat, seen)
        elif op == "Concat":
            rank = _rank(value)
            cat_axis = node.attributes.get_int("axis", 0)
            if rank is None or cat_axis % rank != axis:
                raise Refused(f"{where} concatenates along another axis (or an unknown rank)")
            offset = 0
            for other in node.inputs[:index]:
                d = None if other is None else _dim(other, axis)
                if d is None:
                    raise Refused(f"{where}: the channel count of input {other.name if other else '?'!r} is unknown")
                offset += d
            _continue(region, node, axis, Point(point.off + offset * point.blk, point.blk), flat, seen)
        elif op == "Conv" and index == 0 and axis == 1 and not flat:
            if node.attributes.get_int("group", 1) != 1:
                raise Refused(f"{where} is grouped/depthwise")
            _single_use_constant(node, 1)
            region.slices.append((node, 1, 1, point))
        elif op == "ConvTranspose" and index == 0 and axis == 1 and not flat:
            if node.attributes.get_int("group", 1) != 1:
                raise Refused(f"{where} is grouped")
            _single_use_constant(node, 1)
            region.slices.append((node, 1, 0, point))
        elif op == "Gemm" and index == 0 and axis == 1:
            if node.attributes.get_int("transA", 0):
                raise Refused(f"{where} has transA")
            _single_use_constant(node, 1)
            region.slices.append((node, 1, 1 if node.attributes.get_int("transB", 0) else 0, point))
        elif op == "MatMul" and index == 0 and _rank(value) == axis + 1:
            weight = _single_use_constant(node, 1)
            if weight.const_value.numpy().ndim != 2:
                raise Refused(f"{where} has a batched weight")
            region.slices.append((node, 1, 0, point))
        elif op in ("Flatten", "Reshape") and index == 0 and axis == 1 and not flat:
            block = _flatten_block(node, value)
            if op == "Reshape":
                region.reshapes.append(node)
            _continue(region, node, 1, Point(point.off * block, point.blk * block), True, seen)
        else:
            raise Refused(f"{where} reads the channels (input {index}) and cannot be sliced")


def _continue(region: Region, node: ir.Node, axis: int, point: Point, flat: bool,
              seen: set[tuple[int, int, int]], first: bool = False) -> None:
    out = node.outputs[0]
    region.values.append((out, axis, point))
    _follow(region, out, axis, point, flat, seen, first=first)


def _flatten_block(node: ir.Node, value: ir.Value) -> int:
    """H*W for a Flatten(axis=1) or a Reshape (N, C, ...) -> (N, C*...); else refuse."""
    where = f"{node.op_type} node {node.name!r}"
    if value.shape is None or any(not isinstance(d, int) for d in list(value.shape)[1:]):
        raise Refused(f"{where}: the input shape {value.shape} is not static beyond the batch")
    dims = [int(d) for d in list(value.shape)[1:]]
    block = int(np.prod(dims[1:])) if len(dims) > 1 else 1
    if node.op_type == "Flatten":
        if node.attributes.get_int("axis", 1) != 1:
            raise Refused(f"{where} does not flatten from axis 1")
        return block
    out = node.outputs[0]
    if _rank(out) != 2 or _dim(out, 1) != int(np.prod(dims)):
        raise Refused(f"{where} is not a flatten to (N, C*H*W) (output shape {out.shape})")
    return block


def _binary(region: Region, node: ir.Node, index: int, value: ir.Value, axis: int, point: Point) -> None:
    where = f"{node.op_type} node {node.name!r}"
    other = node.inputs[1 - index]
    rank = _rank(value)
    if other is None:
        raise Refused(f"{where} has a missing input")
    if other is value:  # x + x: both sides carry the same channels
        return
    size = _dim(value, axis)
    const = other.const_value if is_initializer(other) else None
    if const is not None:
        arr = const.numpy()
        if rank is None:
            raise Refused(f"{where}: rank of {value.name!r} unknown")
        aligned = axis - (rank - arr.ndim)
        if aligned < 0 or arr.shape[aligned] == 1:
            return
        if size is None or arr.shape[aligned] != size:
            raise Refused(f"{where}: constant {other.name!r} of shape {arr.shape} does not broadcast per channel")
        _single_use_constant(node, 1 - index)
        region.slices.append((node, 1 - index, aligned, point))
        return
    other_rank = _rank(other)
    if other_rank is not None and rank is not None:
        aligned = axis - (rank - other_rank)
        if aligned < 0 or _dim(other, aligned) == 1:
            return  # broadcast along the channels
    region.ties.append((node, index, point))



class _Groups:
    """Union-find over producer ids."""

    def __init__(self, ids: Iterable[str]) -> None:
        self.parent = {i: i for i in ids}

    def find(self, i: str) -> str:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for i in self.parent:
            out.setdefault(self.find(i), []).append(i)
        return out


def trace(layers: Iterable[Layer], skip: Callable[[Layer], str | None] = lambda _layer: None
                 ) -> tuple[dict[str, Region], dict[str, str]]:
    """Each layer's channel region, and for the others why not: ``skip`` (a reason, or None to trace) or
    the tracer's refusal."""
    regions: dict[str, Region] = {}
    refused: dict[str, str] = {}
    for layer in layers:
        reason = skip(layer)
        if reason is not None:
            refused[layer.id] = reason
            continue
        try:
            regions[layer.id] = trace_layer(layer)
        except Refused as why:
            refused[layer.id] = str(why)
    return regions, refused


def group(regions: Mapping[str, Region], refused: dict[str, str],
          explicit: Iterable[str] | None = None) -> list[list[str]]:
    """Producers tied by residual ops become one group (they must remove the same channels); a group with a
    refused or missing side, or (with ``explicit``) a member outside it, is refused: its members move to
    ``refused`` with the reason. Returns the groups, each a sorted list of layer ids."""
    wanted = None if explicit is None else set(explicit)
    uf = _Groups(regions)
    reached: dict[int, list[tuple[str, int, Point]]] = {}
    nodes: dict[int, ir.Node] = {}
    for lid, region in regions.items():
        for node, index, point in region.ties:
            reached.setdefault(id(node), []).append((lid, index, point))
            nodes[id(node)] = node
    for entries in reached.values():
        for lid, _, _ in entries[1:]:
            uf.union(entries[0][0], lid)
    out = []
    for members in uf.groups().values():
        members.sort()
        reason = None
        counts = {regions[m].channels for m in members}
        if len(counts) > 1:
            reason = f"tied producers {', '.join(members)} have different channel counts {sorted(counts)}"
        for key, entries in reached.items():
            if entries[0][0] not in members or reason:
                continue
            node = nodes[key]
            sides = {index for _, index, _ in entries}
            computed = {i for i, v in enumerate(node.inputs) if v is not None and not is_initializer(v)}
            if not computed <= sides:
                reason = (f"{node.op_type} node {node.name!r} adds a tensor that is not produced by a prunable "
                          f"layer of this group ({', '.join(members)})")
            elif len({(p.off, p.blk) for _, _, p in entries}) > 1:
                reason = f"{node.op_type} node {node.name!r} joins channels at different offsets"
        if reason is None and wanted is not None:
            outside = [m for m in members if m not in wanted]
            if outside:
                reason = f"tied by a residual op to {', '.join(outside)}, which is not in layers="
        if reason is not None:
            for m in members:
                refused[m] = reason
            continue
        out.append(members)
    return out


def count(channels: int, ratio: float, *, round_to: int = 8, min_channels: int = 1) -> int:
    """How many of ``channels`` to remove: ``ratio`` of them, the kept count rounded to a multiple of
    ``round_to`` (when ``channels`` is one), at least ``min_channels`` kept."""
    keep = channels - int(round(ratio * channels))
    step = round_to
    if step > 1 and channels % step == 0 and channels > step and ratio > 0:
        keep = max(step, int(round(keep / step)) * step)
    keep = max(keep, min_channels)
    return max(channels - keep, 0)


def scores(model: Model, regions: Mapping[str, Region], groups: Sequence[Sequence[str]], method: str = "l1", *,
           data: Dataset | None = None, notes: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """``{first member of a group: summed mean-normalised channel score}`` (higher = more important).

    ``method``: ``l1`` / ``l2`` norm of the producer's output-channel weights, ``bn`` |gamma| of the
    BatchNormalization right after it (l2 where there is none), ``taylor`` first-order Taylor on the
    torch module (needs ``data``). What it measured or fell back on goes into ``notes``."""
    notes = {} if notes is None else notes
    per: dict[str, np.ndarray] = {}
    if method == "taylor":
        if model.torch_module is None:
            raise UsageError("prune-channels: method=taylor needs gradients from the torch module the model came "
                             "from; this model has none: use method=l1|l2|bn")
        if data is None:
            raise UsageError("prune-channels: method=taylor needs calibration data (--calib FILE)")
        from bitpass.passes.pruning.gradients import channel_taylor

        per, info = channel_taylor(model, data, [regions[m].producer for g in groups for m in g])
        notes["gradients"] = info
    fallback = []
    for members in groups:
        for lid in members:
            if lid in per:
                continue
            region = regions[lid]
            w = region.producer.weight_array.astype(np.float64)
            rows = np.moveaxis(w, output_axis(region.producer), 0).reshape(region.channels, -1)
            if method == "bn" and region.batchnorm is not None:
                per[lid] = np.abs(region.batchnorm.inputs[1].const_value.numpy().astype(np.float64))
            elif method == "l1":
                per[lid] = np.abs(rows).sum(axis=1)
            else:
                if method == "bn":
                    fallback.append(lid)
                per[lid] = np.sqrt((rows ** 2).sum(axis=1))
    if fallback:
        notes["bn_fallback_l2"] = fallback
    out = {}
    for members in groups:
        total = np.zeros(regions[members[0]].channels)
        for lid in members:
            total += per[lid] / max(float(np.mean(per[lid])), 1e-30)
        out[members[0]] = total
    return out


def plan(model: Model, regions: Mapping[str, Region], groups: Sequence[Sequence[str]],
         remove: Callable[[int], int], method: str = "l1", *, data: Dataset | None = None,
         notes: dict[str, Any] | None = None) -> dict[str, list[int]]:
    """``{layer_id: sorted output channels to remove}``: per group, the ``remove(channels)`` lowest-scored
    channels (``scores``), the same set for every member. Groups that remove none are left out."""
    group_scores = scores(model, regions, groups, method, data=data, notes=notes)
    removed_of: dict[str, list[int]] = {}
    for members in groups:
        gone = remove(regions[members[0]].channels)
        if gone <= 0:
            continue
        removed = sorted(np.argsort(group_scores[members[0]], kind="stable")[:gone].tolist())
        for lid in members:
            removed_of[lid] = removed
    return removed_of


def apply(model: Model, regions: Mapping[str, Region], removed_of: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """Remove ``removed_of[layer]`` output channels of each layer from the graph, with everything its region
    touches; then drop dead nodes and re-infer shapes. The torch module (its shapes no longer match) is
    detached. Returns notes for the record (``shape_inference`` failure, ``torch_module``)."""
    values: dict[int, tuple[ir.Value, int, set[int]]] = {}
    slices: dict[tuple[int, int, int], tuple[ir.Node, int, int, set[int]]] = {}
    reshapes: dict[int, ir.Node] = {}
    for lid, removed in removed_of.items():
        region = regions[lid]
        for value, axis, point in region.values:
            values.setdefault(id(value), (value, axis, set()))[2].update(point.positions(removed))
        for node, index, axis, point in region.slices:
            slices.setdefault((id(node), index, axis), (node, index, axis, set()))[3].update(point.positions(removed))
        for node in region.reshapes:
            reshapes[id(node)] = node
    for node, index, axis, positions in slices.values():
        value = node.inputs[index]
        arr = value.const_value.numpy()
        set_constant(value, np.delete(arr, sorted(positions), axis=axis))
    for value, axis, positions in values.values():
        _shrink(value, axis, len(positions))
    for node in reshapes.values():
        _flatten_shape(model, node)
    notes: dict[str, Any] = {}
    ir_passes.RemoveUnusedNodesPass()(model.ir)
    try:
        ir_passes.ShapeInferencePass(strict_mode=False)(model.ir)
    except Exception as err:  # shape inference is a check here, not a requirement
        notes["shape_inference"] = f"failed: {str(err).strip().splitlines()[0]}"
    if removed_of and model.torch_module is not None:
        model.torch_module = None
        notes["torch_module"] = "detached: its shapes no longer match the pruned graph"
    return notes


def prune_layer(model: Model, layer_id: str, kept: int, method: str = "l1") -> list[int] | None:
    """Keep only ``kept`` output channels of one layer (its lowest-scored removed), alone: trace, group, plan
    and apply for that layer. Returns the removed channels, or None when the layer cannot be pruned alone."""
    regions, refused = trace([model.layer(layer_id)])
    groups = group(regions, refused, explicit=[layer_id])
    if not groups:
        return None
    removed = plan(model, regions, groups, lambda channels: channels - kept, method)
    apply(model, regions, removed)
    return removed.get(layer_id)


def _shrink(value: ir.Value, axis: int, removed: int) -> None:
    shape = value.shape
    if shape is None or axis >= len(shape):
        value.shape = None
        return
    dims = list(shape)
    if isinstance(dims[axis], int):
        dims[axis] = dims[axis] - removed
        value.shape = ir.Shape(dims)
    else:
        value.shape = None

def _flatten_shape(model: Model, node: ir.Node) -> None:
    """Give a flattening Reshape the shape (0, -1): it no longer spells the old feature count."""
    graph = model.graph
    base = f"{node.name or 'reshape'}_flatten_shape"
    name, i = base, 1
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.INT64),
                     const_value=ir.tensor(np.array([0, -1], dtype=np.int64), name=name))
    graph.register_initializer(value)
    node.replace_input_with(1, value)
    if node.attributes.get_int("allowzero", 0):  # the batch dimension is never 0 here: 0 means "copy"
        node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)


__all__ = ["Point", "Refused", "Region", "apply", "count", "group", "plan", "prune_layer", "scores", "trace",
           "trace_layer"]
