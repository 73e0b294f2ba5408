"""Per-layer records for the manifest: what each quantizable layer became in the artifact."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from bitpass.frontend import Model, annotation
from bitpass.frontend.layers import WEIGHT_INPUT, constant_tensor

_DEQUANTIZE = {"DequantizeLinear"}


def _const_nbytes(value: ir.Value | None) -> int:
    tensor = constant_tensor(value)
    return 0 if tensor is None else int(tensor.nbytes)


def _upstream_constant_bytes(value: ir.Value) -> int:
    """Bytes of the constant tensors a constant-only chain builds ``value`` from (shape tensors excluded)."""
    total, seen, stack = 0, set(), [value]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        tensor = constant_tensor(current)
        if tensor is not None and current.producer() is None:
            if tensor.dtype != ir.DataType.INT64:
                total += int(tensor.nbytes)
            continue
        producer = current.producer()
        if producer is not None:
            stack.extend(producer.inputs)
    return total


def stored_weight(node: ir.Node) -> dict[str, Any] | None:
    """How ``node``'s weight is stored: dtype and bytes (scales and zero points included)."""
    if node.op_type == "MatMulNBits":
        total = sum(_const_nbytes(v) for v in node.inputs[1:4] if v is not None)
        return {"format": f"MatMulNBits int{node.attributes.get_int('bits', 4)}",
                "bytes": total, "block_size": node.attributes.get_int("block_size", 0)}
    index = WEIGHT_INPUT.get(node.op_type)
    if index is None or len(node.inputs) <= index or node.inputs[index] is None:
        return None
    value = node.inputs[index]
    tensor = constant_tensor(value)
    if tensor is not None:
        return {"format": str(tensor.dtype.name).lower(), "bytes": int(tensor.nbytes)}
    producer = value.producer()
    if producer is not None and producer.op_type == "Reshape":  # blocked DQ of a Conv weight is reshaped back
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    if annotation.weight_format(node) == "packed":
        return {"format": f"packed int{annotation.weight_bits(node)}", "bytes": _upstream_constant_bytes(value)}
    if producer is not None and producer.op_type in _DEQUANTIZE:
        quantized = constant_tensor(producer.inputs[0])
        if quantized is not None:
            extra = sum(_const_nbytes(v) for v in producer.inputs[1:] if v is not None)
            block = producer.attributes.get_int("block_size", 0)
            fmt = f"QDQ {str(quantized.dtype.name).lower()}" + (f" block {block}" if block else "")
            return {"format": fmt, "bytes": int(quantized.nbytes) + extra}
    return None


def layer_records(reference: Model, final: Model) -> list[dict[str, Any]]:
    """One record per quantizable layer of ``reference``: shape, params, bits, sparsity, sensitivity, bytes."""
    by_id: dict[str, ir.Node] = {}
    for node in final.graph.all_nodes():
        layer_id = annotation.layer_id(node)
        if layer_id is not None and layer_id not in by_id:
            by_id[layer_id] = node
    records = []
    for layer in reference.layers():
        weight = layer.weight_array
        record: dict[str, Any] = {
            "id": layer.id, "op_type": layer.op_type, "weight_shape": list(weight.shape),
            "params": int(weight.size), "fp32_bytes": int(weight.size * 4),
        }
        node = by_id.get(layer.id)
        if node is None:
            record["status"] = "removed"
            records.append(record)
            continue
        notes = annotation.all_of(node)
        stored = stored_weight(node)
        record.update({
            "node": node.name, "final_op_type": node.op_type,
            "bits": {"weight": notes.get(annotation.WEIGHT_BITS, annotation.FLOAT_BITS),
                     "activation": notes.get(annotation.ACTIVATION_BITS, annotation.FLOAT_BITS)},
            "sparsity": notes.get(annotation.SPARSITY, 0.0),
            "sensitivity": annotation.sensitivities(node),
            "stored": stored,
        })
        if stored is not None:
            record["weight_bytes"] = stored["bytes"]
        records.append(record)
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the layer records: params, fp32 bytes, stored bytes, parameter-weighted bits."""
    params = sum(r["params"] for r in records)
    kept = [r for r in records if r.get("status") != "removed"]
    bits = [(r["params"], r["bits"]["weight"]) for r in kept]
    return {
        "layers": len(records),
        "params": params,
        "fp32_bytes": sum(r["fp32_bytes"] for r in records),
        "stored_bytes": sum(r.get("weight_bytes", r["fp32_bytes"]) for r in kept),
        "average_weight_bits": float(np.average([b for _, b in bits], weights=[p for p, _ in bits]))
        if bits and sum(p for p, _ in bits) else None,
    }
