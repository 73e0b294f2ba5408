"""Which nodes int8 QDQ quantizes, and which stay float and why.

ONNX Runtime's ``quantize_static`` quantizes every operator type it knows by default: on a transformer that
puts Q/DQ on the attention mask (``Where(mask, 0, -3.4e38)``), the ``Add`` that applies it, Softmax,
LayerNormalization and the residual sums. Their ranges are hostile to one int8 scale (a mask value of
-3.4e38 beside scores of ±10 leaves no levels for the scores; residual streams carry a few outlier channels
hundreds of times larger than the rest), and quantizing them buys no speed: only MatMul/Gemm/Conv run
integer kernels. This module decides the scope once, from the graph, with declarative rules (NNCF's ignored
patterns for transformers and ORT's own ``op_types_to_quantize`` / ``nodes_to_exclude`` /
``MatMulConstBOnly`` are the references), and says for every node it keeps float which rule did it.

Two profiles, chosen from the graph's structure (``detect_profile``):

* ``transformer`` (a MatMul/Gemm layer reads a normalization's output, or attention is present): quantize
  only what pays, MatMul/Gemm/Conv with a constant weight and their activation inputs
  (``MatMulConstBOnly``: the attention products of two activations stay float).
* ``convolutional`` (everything else): ONNX Runtime's default operator set, so int8 chains run through
  ReLU, pooling and residual adds (what makes CNNs fast), minus the range-hostile operators.

Rules applied in both profiles (``RULES``): nodes computed only from integer inputs, shapes and constants
(attention masks, position ids, anchor grids); nodes that mix such a value into the activations (the mask
add); range-hostile operator types (normalizations, Softmax, Where); and, given calibrated ranges, nodes
that read or write a float tensor with no calibrated range (``uncalibrated``: ORT would otherwise stop
with "Quantization parameters are not specified for param ...").

The graph is read through ``GraphFacts``, built from an ``onnx.ModelProto`` (what ORT's quantizer sees)
or an ``onnx_ir`` graph (what ``materialize.decide`` sees), without copying any weight.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx
import onnx_ir as ir

TRANSFORMER = "transformer"
CONVOLUTIONAL = "convolutional"
PROFILES = (TRANSFORMER, CONVOLUTIONAL)

#: op types with a constant weight that int8 kernels speed up
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: ops whose output is a normalized activation (a transformer's LayerNorm/RMSNorm, fused or not)
NORMALIZATION_OPS = frozenset({"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
                               "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
                               "EmbedLayerNormalization"})
ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"})
#: ops that only move or re-type data: a path through them keeps "reads the same values"
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast", "Expand",
                        "Slice", "Split", "Concat", "Gather", "Where"})
#: range-hostile op types, kept float in every profile, with the reason
HOSTILE_OPS: dict[str, str] = {
    **{op: "normalization: its input is the residual stream, whose outlier channels no single int8 scale "
           "covers, and it has no int8 kernel" for op in (*NORMALIZATION_OPS, "InstanceNormalization",
                                                          "GroupNormalization", "BatchNormalization")},
    "Softmax": "softmax over masked attention scores: its input holds the mask's huge negative values",
    "Where": "selects between a mask or fill value and the data: one int8 scale cannot hold both",
    "GatherElements": "index lookup on a position or mask path",
    "CumSum": "running sum: its range grows along the axis",
    "TopK": "index selection",
}
#: ONNX Runtime's default operator types for QDQ static quantization (its QDQ and QLinear registries)
ORT_DEFAULT_OPS = frozenset({
    "ArgMax", "AveragePool", "BatchNormalization", "Clip", "Concat", "Conv", "ConvTranspose", "CumSum", "Flatten",
    "Gather", "GatherElements", "Gemm", "GlobalAveragePool", "InstanceNormalization", "LayerNormalization",
    "LeakyRelu", "MatMul", "MaxPool", "Mul", "Add", "Pad", "Relu", "Reshape", "Resize", "Sigmoid", "Slice",
    "Softmax", "Split", "Squeeze", "TopK", "Transpose", "Unsqueeze", "Where",
})
#: why an op type is left out of the transformer profile's operator set (the default reason otherwise)
OUT_OF_SCOPE_WHY: dict[str, str] = {
    "Add": "residual sums and bias adds stay float: residual streams carry outlier channels",
    "Mul": "scaling inside attention and normalization stays float",
    "Gather": "embedding lookup: no compute to speed up (the table keeps its width; --budget stores it low-bit)",
    **HOSTILE_OPS,
}
DEFAULT_OUT_OF_SCOPE_WHY = "not a MatMul/Gemm/Conv: int8 would add Q/DQ without a faster kernel"
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                          onnx.TensorProto.DOUBLE})


@dataclass(frozen=True)
class NodeInfo:
    """One node as the rules see it."""

    name: str
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class GraphFacts:
    """The structure of a graph that the scope rules read: nodes, constants, float tensors, layers."""

    nodes: list[NodeInfo]
    constants: frozenset[str]
    #: tensors known to be floating point (graph inputs, typed values, float constants)
    float_tensors: frozenset[str]
    graph_inputs: frozenset[str]
    #: names of nodes that are quantizable units (a constant float weight at the op's weight input)
    layer_nodes: frozenset[str]
    producer: dict[str, NodeInfo] = field(init=False)
    consumers: dict[str, list[NodeInfo]] = field(init=False)

    def __post_init__(self) -> None:
        self.producer = {out: node for node in self.nodes for out in node.outputs if out}
        self.consumers = {}
        for node in self.nodes:
            for name in node.inputs:
                if name:
                    self.consumers.setdefault(name, []).append(node)

    # --- building -----------------------------------------------------------------------------------------------
    @classmethod
    def from_proto(cls, proto: onnx.ModelProto) -> GraphFacts:
        """Facts of ``proto``'s main graph (value types from its ``value_info``; run shape inference first)."""
        graph = proto.graph
        nodes = [NodeInfo(n.name, n.op_type, n.domain if n.domain != "ai.onnx" else "", tuple(n.input),
                          tuple(n.output)) for n in graph.node]
        constants = {t.name for t in graph.initializer}
        floats = {t.name for t in graph.initializer if t.data_type in _FLOAT_TYPES}
        for n in graph.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                constants.update(n.output)
                value = next((a.t for a in n.attribute if a.name == "value" and a.HasField("t")), None)
                if value is not None and value.data_type in _FLOAT_TYPES:
                    floats.update(n.output)
        for info in (*graph.input, *graph.output, *graph.value_info):
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type in _FLOAT_TYPES:
                floats.add(info.name)
        inputs = frozenset(i.name for i in graph.input if i.name not in constants)
        weights = {t.name for t in graph.initializer if t.data_type in _FLOAT_TYPES} | \
            {name for name in floats if name in constants}
        layers = frozenset(n.name for n in nodes if _is_layer(n, weights, constants))
        return cls(nodes, frozenset(constants), frozenset(floats), inputs, layers)

    @classmethod
    def from_graph(cls, graph: ir.Graph) -> GraphFacts:
        """Facts of an ``onnx_ir`` graph (main graph only)."""
        nodes: list[NodeInfo] = []
        constants: set[str] = set()
        floats: set[str] = set()
        float_dtypes = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
        for name, value in graph.initializers.items():
            constants.add(name)
            if value.dtype in float_dtypes:
                floats.add(name)
        for index, node in enumerate(graph):
            outputs = tuple(v.name or "" for v in node.outputs)
            nodes.append(NodeInfo(node.name or f"{node.op_type}_{index}", node.op_type,
                                  node.domain if node.domain != "ai.onnx" else "",
                                  tuple((v.name or "") if v is not None else "" for v in node.inputs), outputs))
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                constants.update(outputs)
            for value in node.outputs:
                if value.dtype in float_dtypes:
                    floats.add(value.name or "")
        for value in graph.inputs:
            if value.dtype in float_dtypes:
                floats.add(value.name or "")
        inputs = frozenset(v.name or "" for v in graph.inputs if (v.name or "") not in constants)
        weights = {name for name in floats if name in constants}
        layers = frozenset(n.name for n in nodes if _is_layer(n, weights, constants))
        return cls(nodes, frozenset(constants), frozenset(floats), inputs, layers)

    # --- derived facts -------------------------------------------------------------------------------------------
    @functools.cached_property
    def data_path(self) -> frozenset[str]:
        """Tensors that carry the data: float graph inputs, layer outputs (an embedding lookup's too), and
        everything computed from them. What is off it comes from integer inputs, shapes and constants only."""
        on: set[str] = {name for name in self.graph_inputs if name in self.float_tensors}
        for node in self.nodes:  # nodes are in topological order
            if node.name in self.layer_nodes or any(name in on for name in node.inputs if name):
                on.update(o for o in node.outputs if o)
        return frozenset(on)

    @functools.cached_property
    def constant_derived(self) -> frozenset[str]:
        """Constants and everything computed from constants only (an Identity of a shared bias, a folded shape)."""
        known: set[str] = set(self.constants)
        for node in self.nodes:
            if node.inputs and all(name in known for name in node.inputs if name):
                known.update(o for o in node.outputs if o)
        return frozenset(known)

    def is_mask_value(self, name: str) -> bool:
        """A float tensor computed without the data but from some input: an attention mask, position ids made
        float, a grid built from a shape."""
        return bool(name) and name not in self.constant_derived and name not in self.data_path \
            and name not in self.graph_inputs

    def activation_inputs(self, node: NodeInfo) -> list[str]:
        return [name for name in node.inputs if name and name not in self.constant_derived]


def _is_layer(node: NodeInfo, weights: Collection[str], constants: Collection[str]) -> bool:
    """A quantizable unit, as ``bitpass.frontend.layers`` defines it (a constant float weight)."""
    index = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "Gather": 0}.get(node.op_type)
    if node.domain or index is None or len(node.inputs) <= index:
        return False
    weight = node.inputs[index]
    if weight not in weights:
        return False
    if node.op_type == "Gather":  # an embedding table read by (non-constant) indices
        return len(node.inputs) > 1 and node.inputs[1] not in constants
    return True


# --- the profile ---------------------------------------------------------------------------------------------------
def detect_profile(facts: GraphFacts) -> tuple[str, str]:
    """``(profile, why)``: ``transformer`` when a MatMul/Gemm layer reads a normalization's output or the graph
    has attention; else ``convolutional``."""
    for node in facts.nodes:
        if node.op_type in ATTENTION_OPS:
            return TRANSFORMER, f"attention operator {node.op_type} ({node.name})"
    for node in facts.nodes:
        if node.op_type in ("MatMul", "Gemm") and node.name in facts.layer_nodes:
            source = _source_through_layout(facts, node.inputs[0])
            if source is not None and source.op_type in NORMALIZATION_OPS:
                return TRANSFORMER, f"MatMul/Gemm layer {node.name} reads {source.op_type} {source.name}"
    for node in facts.nodes:
        if node.op_type == "Softmax":
            for reader in _readers_through_layout(facts, node.outputs[0]):
                if reader.op_type == "MatMul" and reader.name not in facts.layer_nodes:
                    return TRANSFORMER, f"attention: Softmax {node.name} feeds MatMul {reader.name}"
    return CONVOLUTIONAL, "no normalization feeding a MatMul/Gemm layer and no attention"


def _source_through_layout(facts: GraphFacts, name: str, depth: int = 8) -> NodeInfo | None:
    node = facts.producer.get(name)
    while node is not None and node.op_type in LAYOUT_OPS and depth > 0:
        node = facts.producer.get(node.inputs[0]) if node.inputs else None
        depth -= 1
    return node


def _readers_through_layout(facts: GraphFacts, name: str, depth: int = 8) -> list[NodeInfo]:
    found: list[NodeInfo] = []
    frontier = [name]
    for _ in range(depth):
        following: list[str] = []
        for tensor in frontier:
            for reader in facts.consumers.get(tensor, []):
                if reader.op_type in LAYOUT_OPS:
                    following.extend(o for o in reader.outputs if o)
                else:
                    found.append(reader)
        if not following:
            break
        frontier = following
    return found


# --- rules -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """A declarative reason to keep a node float: a name, the reason, and the condition."""

    name: str
    why: str
    matches: Callable[[NodeInfo, GraphFacts], bool]


def _off_data_path(node: NodeInfo, facts: GraphFacts) -> bool:
    if node.name in facts.layer_nodes or all(o in facts.constant_derived for o in node.outputs if o):
        return False  # a layer, or constant folding's business
    return not any(name in facts.data_path for name in node.inputs if name)


def _reads_mask(node: NodeInfo, facts: GraphFacts) -> bool:
    return any(facts.is_mask_value(name) and name in facts.float_tensors for name in node.inputs) and \
        any(name in facts.data_path for name in node.inputs)


def _hostile(node: NodeInfo, facts: GraphFacts) -> bool:
    return node.op_type in HOSTILE_OPS


def _activation_product(node: NodeInfo, facts: GraphFacts) -> bool:
    return node.op_type == "MatMul" and node.name not in facts.layer_nodes


RULES: tuple[Rule, ...] = (
    Rule("mask-or-index-path", "computed only from integer inputs, shapes and constants (an attention mask, "
         "position ids, a grid): its values are not the data's", _off_data_path),
    Rule("reads-mask", "mixes an attention mask or index-derived value into the activations: the mask's huge "
         "values would take the whole int8 range", _reads_mask),
    Rule("range-hostile-op", "range-hostile operator (see HOSTILE_OPS)", _hostile),
)
#: rules of the transformer profile only
TRANSFORMER_RULES: tuple[Rule, ...] = (
    Rule("activation-product", "product of two activations (attention scores or context): kept float, as "
         "MatMulConstBOnly does", _activation_product),
)
UNCALIBRATED = "uncalibrated"


# --- the scope ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeptFloat:
    node: str
    op_type: str
    rule: str
    why: str


@dataclass(frozen=True)
class Scope:
    """What ORT's quantizer is told: the operator types, the nodes to leave alone and why, extra options."""

    profile: str
    profile_why: str
    op_types: tuple[str, ...]
    kept_float: tuple[KeptFloat, ...]
    extra_options: Mapping[str, Any]
    #: op type -> node count, for the nodes outside ``op_types`` (transformer profile)
    out_of_scope: Mapping[str, int] = field(default_factory=dict)

    @property
    def exclude(self) -> list[str]:
        return sorted({k.node for k in self.kept_float})

    def record(self) -> dict[str, Any]:
        """For the manifest: the profile, the operator types quantized, and each node kept float, by rule."""
        by_rule: dict[str, dict[str, Any]] = {}
        for kept in self.kept_float:
            entry = by_rule.setdefault(kept.rule, {"why": kept.why, "nodes": []})
            entry["nodes"].append(kept.node)
        out = {op: {"nodes": count, "why": OUT_OF_SCOPE_WHY.get(op, DEFAULT_OUT_OF_SCOPE_WHY)}
               for op, count in sorted(self.out_of_scope.items())}
        return {"profile": self.profile, "profile_why": self.profile_why, "op_types": list(self.op_types),
                "kept_float": {rule: {"why": e["why"], "count": len(e["nodes"]), "nodes": sorted(e["nodes"])}
                               for rule, e in sorted(by_rule.items())},
                "out_of_scope": out, "extra_options": dict(self.extra_options)}


def profile_op_types(profile: str) -> frozenset[str]:
    """The operator types ORT's quantizer may quantize in ``profile``."""
    if profile == TRANSFORMER:
        return COMPUTE_OPS
    return ORT_DEFAULT_OPS - frozenset(HOSTILE_OPS)


def layer_kept_float(op_type: str, profile: str) -> str | None:
    """Why a quantizable layer of ``op_type`` stays float under int8 QDQ in ``profile`` (None: it is quantized)."""
    if op_type in profile_op_types(profile):
        return None
    return OUT_OF_SCOPE_WHY.get(op_type, DEFAULT_OUT_OF_SCOPE_WHY)


def quant_scope(facts: GraphFacts, *, ranges: Collection[str] | None = None, profile: str | None = None,
                int8_nodes: Iterable[str] | None = None) -> Scope:
    """The int8 QDQ scope of a graph.

    ``ranges``: the tensors with a calibrated range (None: not checked). ``profile``: force one (default:
    ``detect_profile``). ``int8_nodes``: the layer nodes the plan makes int8 (None: every layer); other layers
    are not listed here, the caller excludes them by its plan."""
    if profile is None:
        profile, why = detect_profile(facts)
    else:
        why = "chosen by the caller"
    op_types = profile_op_types(profile)
    rules = RULES + (TRANSFORMER_RULES if profile == TRANSFORMER else ())
    wanted = None if int8_nodes is None else set(int8_nodes)
    kept: list[KeptFloat] = []
    out_of_scope: dict[str, int] = {}
    for node in facts.nodes:
        if node.domain:
            continue
        if node.op_type not in op_types:
            if profile == TRANSFORMER and node.op_type in ORT_DEFAULT_OPS and _has_float_tensor(node, facts):
                out_of_scope[node.op_type] = out_of_scope.get(node.op_type, 0) + 1
            continue
        if node.name in facts.layer_nodes and wanted is not None and node.name not in wanted:
            continue
        if not _has_float_tensor(node, facts):
            continue
        rule = next((r for r in rules if r.matches(node, facts)), None)
        if rule is not None:
            reason = HOSTILE_OPS[node.op_type] if rule.name == "range-hostile-op" else rule.why
            kept.append(KeptFloat(node.name, node.op_type, rule.name, reason))
            continue
        if ranges is not None:
            missing = [t for t in (*facts.activation_inputs(node), *node.outputs)
                       if t and t in facts.float_tensors and t not in ranges and t not in facts.constant_derived]
            if missing:
                kept.append(KeptFloat(node.name, node.op_type, UNCALIBRATED,
                                      "reads or writes a float tensor with no calibrated range (the graph changed "
                                      "after calibration)"))
    extra: dict[str, Any] = {"MatMulConstBOnly": True} if profile == TRANSFORMER else {}
    return Scope(profile, why, tuple(sorted(op_types)), tuple(kept), extra, out_of_scope)


def _has_float_tensor(node: NodeInfo, facts: GraphFacts) -> bool:
    return any(name in facts.float_tensors for name in (*node.inputs, *node.outputs) if name)


__all__ = ["CONVOLUTIONAL", "COMPUTE_OPS", "GraphFacts", "HOSTILE_OPS", "KeptFloat", "NodeInfo", "PROFILES", "RULES",
           "Rule", "Scope", "TRANSFORMER", "detect_profile", "layer_kept_float", "profile_op_types", "quant_scope"]
