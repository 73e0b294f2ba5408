"""The ONNX Runtime backend: legalize by asking the runtime, write model.onnx + session.json, load a runner."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from bitpass.backends.base import Backend, Capabilities, Runner
from bitpass.backends.onnxruntime.runner import DEFAULT_SESSION, OrtRunner
from bitpass.frontend import Model
from bitpass.frontend.errors import BitpassError
from bitpass.passes import execution
from bitpass.passes.format_search import disabled_optimizers

#: ORT's words for "no kernel / no schema for this operator" (anything else a probe hits is not about support)
_UNSUPPORTED_MARKERS = ("NOT_IMPLEMENTED", "Could not find an implementation", "No Op registered",
                        "is not a registered function/op", "No opset import for domain")


@functools.cache
def _cpu_kernels() -> frozenset[tuple[str, str]]:
    """(domain, op_type) pairs the installed ONNX Runtime registers CPU kernels for (informative: ``legalize``
    asks the runtime itself, which also knows the functions it expands and the types each kernel takes)."""
    from onnxruntime.capi import _pybind_state

    return frozenset((k.domain or "", k.op_name) for k in _pybind_state.get_all_opkernel_def()
                     if k.provider == "CPUExecutionProvider")


@functools.cache
def operator_support(domain: str, op_type: str, opset: int, input_types: tuple[int, ...],
                     attributes: bytes = b"") -> str | None:
    """None when ONNX Runtime's CPU provider runs ``op_type`` at ``opset`` on inputs of these element types
    (``onnx.TensorProto`` codes; 0 = an omitted optional input), else ORT's one-line reason.

    Asked by building a one-node session (``execution.create_session``); cached per (domain, op, opset, input
    types, attributes). ``attributes`` is a serialized ``NodeProto`` holding only the node's attributes (some
    kernels depend on them, e.g. Cast's ``to``). A session that fails for another reason (the one-node graph
    lacks shapes a kernel needs) does not count as unsupported."""
    template = onnx.NodeProto()
    if attributes:
        template.ParseFromString(attributes)
    inputs, names = [], []
    for index, code in enumerate(input_types):
        if code == 0:
            names.append("")
            continue
        inputs.append(onnx.helper.make_tensor_value_info(f"in{index}", code, None))
        names.append(f"in{index}")
    node = onnx.helper.make_node(op_type, names, ["out"], domain=domain or None)
    node.attribute.extend(template.attribute)
    graph = onnx.helper.make_graph([node], "probe", inputs, [onnx.helper.make_empty_tensor_value_info("out")])
    imports = [onnx.helper.make_opsetid("", opset if not domain else max(opset, 1))]
    if domain:
        imports = [onnx.helper.make_opsetid(domain, 1), onnx.helper.make_opsetid("", 21)]
    model = onnx.helper.make_model(graph, opset_imports=imports)
    model.ir_version = 10
    try:
        execution.create_session(model, purpose=f"run {op_type}")
    except BitpassError as err:
        text = str(err)
        if any(marker in text for marker in _UNSUPPORTED_MARKERS):
            return text.split(": ", 1)[-1]
    return None


def _attributes_key(node: ir.Node) -> tuple[bytes, bool]:
    """The node's attributes as bytes for the cache key, and whether it has a subgraph (not probed)."""
    proto = onnx.NodeProto()
    for attribute in node.attributes.values():
        if attribute.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            return b"", True
        proto.attribute.append(ir.serde.serialize_attribute(attribute))
    return proto.SerializeToString(deterministic=True), False


#: weights past which an artifact keeps them in ``model.onnx.data`` beside ``model.onnx`` (and always past protobuf's
#: 2 GiB): ONNX Runtime maps external data where it parses a single file into its heap (measured on a 1.42 GB
#: GPT-2-medium artifact: 2.35 GB peak and 2.32 GB held to load one file, 1.61 GB and 1.38 GB with external data)
EXTERNAL_DATA_BYTES = 256 << 20


def share_tied_tables(model: Model) -> int:
    """Store a tied embedding table once, in place; the number of tables shared.

    A transformers LM whose lm_head shares the token embedding exports as ``Gather(E)`` and ``MatMul(x, E^T)``;
    the import folds the transpose into a second initializer, so that the lm_head is a quantizable layer. When both
    stay fp32 (``--pipeline optimize``) that writes the table twice (154 MB more for GPT-2-small): here the Gather
    reads the MatMul's ``E^T`` along axis 1 and a Transpose of its (small) output restores the layout, and ``E``
    goes. Exact: the same values are gathered. The Gather keeps its metadata (layer id, annotations)."""
    graph = model.graph
    matmul_weights: dict[tuple[int, ...], list[ir.Value]] = {}
    for node in graph:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2:
            weight = node.inputs[1]
            if weight is not None and weight.is_initializer() and weight.const_value is not None \
                    and len(weight.const_value.shape) == 2:
                matmul_weights.setdefault(tuple(weight.const_value.shape.numpy()), []).append(weight)
    shared = 0
    for node in list(graph):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        axis = node.attributes.get("axis")
        table, ids = node.inputs
        if (axis is not None and axis.as_int() != 0) or table is None or not table.is_initializer() \
                or table.const_value is None or len(table.const_value.shape) != 2 or ids is None \
                or ids.shape is None or table.name in {v.name for v in graph.outputs}:
            continue
        rows, width = table.const_value.shape.numpy()
        array = None
        for candidate in matmul_weights.get((width, rows), []):
            if candidate.const_value.dtype != table.const_value.dtype:
                continue
            array = table.const_value.numpy() if array is None else array
            if np.array_equal(candidate.const_value.numpy(), array.T):
                _gather_from_transposed(graph, node, candidate, len(ids.shape))
                shared += 1
                break
        if not table.uses():
            graph.initializers.pop(table.name)
    return shared


def _gather_from_transposed(graph: ir.Graph, gather: ir.Node, transposed: ir.Value, ids_rank: int) -> None:
    """Replace ``Gather(E, ids)`` by ``Transpose(Gather(E^T, ids, axis=1))`` (``ids`` of rank ``ids_rank``)."""
    columns = ir.Node("", "Gather", [transposed, gather.inputs[1]], [ir.AttrInt64("axis", 1)],
                      name=f"{gather.name}_columns", metadata_props=dict(gather.metadata_props))
    perm = [*range(1, ids_rank + 1), 0]
    restored = ir.Node("", "Transpose", [columns.outputs[0]], [ir.AttrInt64s("perm", perm)],
                       name=f"{gather.name}_rows")
    old = gather.outputs[0]
    restored.outputs[0].name, old.name = old.name, f"{old.name}_tied"
    restored.outputs[0].shape, restored.outputs[0].type = old.shape, old.type
    graph.insert_before(gather, [columns, restored])
    ir.convenience.replace_all_uses_with(old, restored.outputs[0])
    if old in graph.outputs:
        graph.outputs[graph.outputs.index(old)] = restored.outputs[0]
    graph.remove(gather, safe=True)


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU: QDQ int8, MatMulNBits low-bit weights, fp32 elsewhere."""

    name = "onnxruntime"
    targets = {"cpu": "ONNX Runtime CPU execution provider (x86-64 or aarch64)"}
    default_target = "cpu"

    def capabilities(self, target: str) -> Capabilities:
        self.check_target(target)
        # NOTES.md: MatMulNBits takes 2/4/8 bits on MatMul (Gemm after rewriting to MatMul+Add);
        # QDQ int8 everywhere ORT quantizes; blocked int4 DequantizeLinear -> Conv at opset 21.
        return Capabilities(
            ops=_cpu_kernels(),
            # every width runs everywhere in the packed format (unpacked at load, fp32 speed); the
            # compute formats (QDQ, MatMulNBits, blocked DQ) are offered where measured faster
            weight_bits={"Conv": (2, 4, 8, 32), "ConvTranspose": (2, 4, 8, 32), "Gemm": (2, 4, 8, 32),
                         "MatMul": (2, 4, 8, 32), "Gather": (2, 4, 8, 32)},
            activation_bits=(8, 32),
        )

    def legalize(self, model: Model, target: str) -> list[str]:
        """Operators ONNX Runtime cannot run, judged by the runtime itself: one one-node session per distinct
        (domain, operator, opset, input types, attributes), cached for the process."""
        self.check_target(target)
        opsets = dict(model.ir.opset_imports)
        local_functions = {(f.domain, f.name) for f in model.ir.functions.values()}
        problems: list[str] = []
        for node in model.graph.all_nodes():
            domain = node.domain if node.domain != "ai.onnx" else ""
            if (node.domain, node.op_type) in local_functions:
                continue  # a model-local function: ORT inlines it
            attributes, has_subgraph = _attributes_key(node)
            if has_subgraph:
                continue  # control flow (If/Loop/Scan): ORT runs it; its body's nodes are checked themselves
            types = tuple(0 if v is None or not v.name else (int(v.dtype) if v.dtype is not None else -1)
                          for v in node.inputs)
            guessed = -1 in types
            types = tuple(onnx.TensorProto.FLOAT if t == -1 else t for t in types)
            why = operator_support(domain, node.op_type, int(opsets.get(node.domain, opsets.get(domain, 1))),
                                   types, attributes)
            if why is None or guessed:  # an input of unknown type was probed as float: not a verdict
                continue
            label = f"{domain}.{node.op_type}" if domain else node.op_type
            problems.append(f"operator {label} (node {node.name!r}) is not supported by {self.name} on target "
                            f"{target!r}: {why}")
        return problems

    def latency_probe(self, target: str, *, threads: int = 0):
        """The target's timer (``latency.LatencyProbe``): called as ``(model, variants, progress, batches=(1, 64),
        calibration=None) -> {layer: {(bits, variant): {batch: seconds}}}``, one-layer models timed in a fresh
        process; ``.graphs(models, feeds)`` times whole candidate artifacts against each other."""
        from bitpass.backends.onnxruntime import latency

        self.check_target(target)
        return latency.LatencyProbe(threads=threads)

    def emit(self, model: Model, directory: Path, target: str) -> list[str]:
        self.check_target(target)
        written = model.clone()  # shares the tensors; only the file's graph changes
        share_tied_tables(written)
        path = directory / "model.onnx"
        if written.weight_bytes() > EXTERNAL_DATA_BYTES:
            written.save_external(path)
            files = [path.name, path.name + ".data"]
        else:  # streamed tensor by tensor (no serialized copy of the model held)
            files = written.save(path)
        # the format search's timed choice of ORT's load-time fusions (format_search.set_disabled_optimizers)
        session = {**DEFAULT_SESSION, "disabled_optimizers": disabled_optimizers(model)}
        (directory / "session.json").write_text(json.dumps(session, indent=2, sort_keys=True) + "\n")
        return [*files, "session.json"]

    def load(self, directory: Path, manifest: Mapping[str, Any] | None = None, *,
             threads: int | None = None, for_timing: bool = False) -> Runner:
        return OrtRunner.from_directory(directory, threads=threads, for_timing=for_timing)
