"""``inline-functions``: expand ONNX functions into their bodies before anything measures the graph.

Two kinds of function calls reach bitpass: model-local functions (some exporters wrap modules in them) and
standard operators that ONNX defines as functions (HardSwish, and at some opsets Gelu, LayerNormalization,
Mish...). ONNX Runtime has no kernel for some of the latter and expands them itself when it loads the
model, inside ``quant_pre_process`` too: the quantizer then meets tensors (``_inlfunc_HardSwish_HS_X``) that
calibration never saw and stops ("Quantization parameters are not specified for param ..."). Expanding them
here, before calibration, makes the graph bitpass calibrates the graph ORT quantizes and runs.

``inline_functions`` (the library core) expands every model-local function, and every standard function
operator the runtime has no kernel for (``runtime_has_kernel``: asked of ONNX Runtime's kernel registry by
default); the pass records what it expanded.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import Any

import onnx
import onnx.defs
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from bitpass.frontend import Model
from bitpass.frontend.layers import assign_layer_ids
from bitpass.passes.infra import Pass, PassContext, PassResult

#: the private domain standard function operators are moved to so onnx-ir's inliner expands them
EXPAND_DOMAIN = "bitpass.expand"

KernelQuery = Callable[[str, str, int], bool]


@functools.cache
def _ort_kernel_ranges() -> dict[tuple[str, str], tuple[tuple[int, int], ...]]:
    from onnxruntime.capi import _pybind_state

    ranges: dict[tuple[str, str], set[tuple[int, int]]] = {}
    for kernel in _pybind_state.get_all_opkernel_def():
        if kernel.provider == "CPUExecutionProvider":
            ranges.setdefault((kernel.domain or "", kernel.op_name), set()).add(tuple(kernel.version_range))
    return {key: tuple(sorted(value)) for key, value in ranges.items()}


def runtime_has_kernel(domain: str, op_type: str, since_version: int) -> bool:
    """Whether ONNX Runtime's CPU provider registers a kernel for this operator version (else ORT expands it)."""
    return any(low <= since_version <= high for low, high in _ort_kernel_ranges().get((domain, op_type), ()))


def _function_body(node: ir.Node, opset: int) -> tuple[onnx.FunctionProto, int] | None:
    """The standard function body of ``node`` at ``opset`` (static, or built for its input types), and the
    schema's ``since_version``; None when the operator is not a function."""
    domain = node.domain if node.domain != "ai.onnx" else ""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, domain)
    except onnx.defs.SchemaError:
        return None
    if schema.has_function:
        body = onnx.FunctionProto()
        body.CopyFrom(schema.function_body)
        return body, schema.since_version
    if not schema.has_context_dependent_function:
        return None
    if any(v is not None and v.name and (v.dtype is None) for v in node.inputs):
        return None  # the body depends on the input types, which are unknown here
    call = ir.serde.serialize_node(node)
    call.domain = domain
    types = [ir.serde.serialize_type(ir.TensorType(v.dtype)).SerializeToString() if v is not None and v.name
             else onnx.TypeProto().SerializeToString() for v in node.inputs]
    try:
        raw = schema.get_context_dependent_function(call.SerializeToString(), types)
    except Exception:  # noqa: BLE001 - no body for this signature: leave the node alone
        return None
    body = onnx.FunctionProto()
    body.ParseFromString(raw)
    return body, schema.since_version


def inline_functions(model: Model, *, has_kernel: KernelQuery = runtime_has_kernel) -> dict[str, Any]:
    """Expand, in place, every model-local function call and every standard function operator for which
    ``has_kernel(domain, op_type, since_version)`` is False. Returns what was expanded (empty when nothing)."""
    ir_model = model.ir
    opset = ir_model.opset_imports.get("", 1)
    local = Counter(f"{node.domain}::{node.op_type}" for node in ir_model.graph.all_nodes()
                    if node.op_identifier() in ir_model.functions)
    expanded: Counter[str] = Counter()
    bodies: dict[bytes, str] = {}
    for node in list(ir_model.graph):
        domain = node.domain if node.domain != "ai.onnx" else ""
        if domain or node.op_identifier() in ir_model.functions:
            continue
        found = _function_body(node, opset)
        if found is None:
            continue
        body, since = found
        if has_kernel(domain, node.op_type, since):
            continue
        signature = body.SerializeToString(deterministic=True)
        name = bodies.get(signature)
        if name is None:
            name = f"{node.op_type}_v{since}_{len(bodies)}"
            bodies[signature] = name
            body.domain, body.name = EXPAND_DOMAIN, name
            # the body is written against the schema's version; the inliner needs the model's (bodies use
            # long-stable operators, as ONNX Runtime's own expansion at load assumes)
            del body.opset_import[:]
            body.opset_import.append(onnx.helper.make_opsetid("", opset))
            function = ir.serde.deserialize_function(body)
            ir_model.functions[function.identifier()] = function
        expanded[node.op_type] += 1
        node.domain, node.op_type = EXPAND_DOMAIN, name
    if not expanded and not local:
        return {}
    if expanded:
        ir_model.opset_imports[EXPAND_DOMAIN] = 1
    calls = [(node.name or node.op_type, len(ir_model.functions[node.op_identifier()]))
             for node in ir_model.graph if node.op_identifier() in ir_model.functions]
    before = {id(node) for node in ir_model.graph}
    names_before = {v.name for node in ir_model.graph for v in node.outputs if v.name}
    ir_passes.InlinePass()(ir_model)
    ir_model.opset_imports.pop(EXPAND_DOMAIN, None)
    _name_after_call_sites(ir_model.graph, before, names_before, calls)
    new_layers = assign_layer_ids(ir_model.graph)
    result: dict[str, Any] = {}
    if expanded:
        result["operators"] = dict(sorted(expanded.items()))
        result["why"] = "function operators without a runtime kernel, expanded as the runtime would"
    if local:
        result["local_functions"] = dict(sorted(local.items()))
    if new_layers:
        result["new_layers"] = new_layers
    return result


def _name_after_call_sites(graph: ir.Graph, before: set[int], names_before: set[str],
                           calls: list[tuple[str, int]]) -> None:
    """Name the inlined nodes and their inner values ``<call node>/<op>_<k>`` (the inliner names them after the
    function body: ``node``, ``HS_X``), so reports and exclusions point at the call they came from. The inliner
    puts each body where its call was, in order; a nested body (rare) falls back to ``inlined/...``."""
    taken_nodes = {node.name for node in graph if id(node) in before and node.name}
    taken_values = set(names_before) | {v.name for v in graph.inputs if v.name} | set(graph.initializers)
    fresh = [node for node in graph if id(node) not in before]
    owners: list[str] = []
    for call, size in calls:
        owners.extend([call] * size)
    for index, node in enumerate(fresh):
        owner = owners[index] if len(owners) == len(fresh) else "inlined"
        node.name = _unique(f"{owner}/{node.op_type}", taken_nodes)
        for value in node.outputs:
            if value.name and value.name not in names_before:
                value.name = _unique(f"{owner}/{value.name}", taken_values)


def _unique(name: str, taken: set[str]) -> str:
    candidate, suffix = name, 1
    while candidate in taken:
        suffix += 1
        candidate = f"{name}_{suffix}"
    taken.add(candidate)
    return candidate


class InlineFunctions(Pass):
    """Expand model-local functions and function operators the runtime lacks (HardSwish...) before calibration."""

    name = "inline-functions"
    in_place = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        done = inline_functions(model)
        if done:
            ctx.records["inline_functions"] = done
        return PassResult(model, modified=bool(done))


__all__ = ["EXPAND_DOMAIN", "InlineFunctions", "inline_functions", "runtime_has_kernel"]
