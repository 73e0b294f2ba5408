"""Typed access to bitpass's per-node annotations.

Annotations live in ONNX node ``metadata_props`` under ``bitpass.<key>`` with
JSON values, so they survive a save and a load. This is the only module that
spells the raw keys; passes use the accessors below.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import onnx_ir as ir

SCHEMA_VERSION = 1
PREFIX = "bitpass."
SCHEMA_KEY = PREFIX + "schema_version"

LAYER_ID = "layer_id"
WEIGHT_BITS = "bits.weight"
ACTIVATION_BITS = "bits.activation"
SPARSITY = "sparsity"
WEIGHT_FORMAT = "format.weight"
#: how a quantized weight is materialized (see passes/materialize.py): compute in int8 QDQ, int8 with
#: activations quantized at run time (``dynamic``), ORT's MatMulNBits, blocked DequantizeLinear, or
#: ``packed`` (stored low-bit, unpacked once at load); embedding tables as ORT's GatherBlockQuantized
#: (rows unpacked only when looked up)
#: ``codebook-fp4`` / ``-nf4`` / ``-fp8``: floating-point codebook codes widened to fp32 at load (weight-only)
WEIGHT_FORMATS = ("qdq", "dynamic", "matmulnbits", "blocked-dq", "packed", "gather-block-quantized",
                  "codebook-fp4", "codebook-nf4", "codebook-fp8")
#: weights per scale of a blocked format (MatMulNBits, blocked DequantizeLinear, packed storage)
BLOCK_SIZE = "format.block_size"
BLOCK_SIZES = (16, 32, 64, 128, 256)
SENSITIVITY_PREFIX = "sensitivity."

#: Bits meaning "leave this layer in floating point".
FLOAT_BITS = 32


def _key(name: str) -> str:
    return PREFIX + name


def get(node: ir.Node, name: str, default: Any = None) -> Any:
    raw = node.metadata_props.get(_key(name))
    return default if raw is None else json.loads(raw)


def set(node: ir.Node, name: str, value: Any) -> None:  # noqa: A001 - mirrors dict API
    node.metadata_props[_key(name)] = json.dumps(value, sort_keys=True)


def delete(node: ir.Node, name: str) -> None:
    node.metadata_props.pop(_key(name), None)


def all_of(node: ir.Node) -> dict[str, Any]:
    """Every bitpass annotation on ``node``, keys without the prefix."""
    return {
        k[len(PREFIX) :]: json.loads(v)
        for k, v in sorted(node.metadata_props.items())
        if k.startswith(PREFIX)
    }


def layer_id(node: ir.Node) -> str | None:
    return get(node, LAYER_ID)


def set_layer_id(node: ir.Node, value: str) -> None:
    set(node, LAYER_ID, value)


def weight_bits(node: ir.Node) -> int | None:
    return get(node, WEIGHT_BITS)


def set_weight_bits(node: ir.Node, bits: int) -> None:
    set(node, WEIGHT_BITS, int(bits))


def activation_bits(node: ir.Node) -> int | None:
    return get(node, ACTIVATION_BITS)


def set_activation_bits(node: ir.Node, bits: int) -> None:
    set(node, ACTIVATION_BITS, int(bits))


def weight_format(node: ir.Node) -> str | None:
    return get(node, WEIGHT_FORMAT)


def set_weight_format(node: ir.Node, value: str) -> None:
    if value not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {value!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    set(node, WEIGHT_FORMAT, value)


def block_size(node: ir.Node) -> int | None:
    return get(node, BLOCK_SIZE)


def set_block_size(node: ir.Node, value: int) -> None:
    if value not in BLOCK_SIZES:
        raise ValueError(f"block size {value!r} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    set(node, BLOCK_SIZE, int(value))


def sparsity(node: ir.Node) -> float | None:
    return get(node, SPARSITY)


def set_sparsity(node: ir.Node, value: float) -> None:
    set(node, SPARSITY, float(value))


def sensitivity(node: ir.Node, method: str) -> float | None:
    return get(node, SENSITIVITY_PREFIX + method)


def set_sensitivity(node: ir.Node, method: str, value: float) -> None:
    set(node, SENSITIVITY_PREFIX + method, float(value))


def sensitivities(node: ir.Node) -> dict[str, float]:
    return {
        k[len(SENSITIVITY_PREFIX) :]: v
        for k, v in all_of(node).items()
        if k.startswith(SENSITIVITY_PREFIX)
    }


def carried(model: ir.Model, name: str) -> bool:
    """Whether some node carries annotation ``name`` or one under it (``bits`` matches ``bits.weight``)."""
    key, below = _key(name), _key(name) + "."
    return any(k == key or k.startswith(below) for node in model.graph.all_nodes() for k in node.metadata_props)


def stamp_schema(model: ir.Model) -> None:
    model.metadata_props[SCHEMA_KEY] = str(SCHEMA_VERSION)


def check_schema(model: ir.Model) -> list[str]:
    """Problems with the annotations of ``model`` (empty when all is well)."""
    problems: list[str] = []
    version = model.metadata_props.get(SCHEMA_KEY)
    if version is not None and version != str(SCHEMA_VERSION):
        problems.append(f"annotation schema {version} is not {SCHEMA_VERSION}")
    for node in model.graph.all_nodes():
        for key, raw in node.metadata_props.items():
            if not key.startswith(PREFIX):
                continue
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                problems.append(f"node {node.name!r}: {key} is not JSON: {raw[:40]!r}")
                continue
            name = key[len(PREFIX) :]
            if name in (WEIGHT_BITS, ACTIVATION_BITS) and value not in (2, 3, 4, 8, 16, FLOAT_BITS):
                problems.append(f"node {node.name!r}: {key}={value} is not a supported width")
            if name == LAYER_ID and not (isinstance(value, str) and value):
                problems.append(f"node {node.name!r}: {key}={value!r} is not a non-empty string")
            if name.startswith(SENSITIVITY_PREFIX) and not (isinstance(value, (int, float)) and math.isfinite(value)):
                problems.append(f"node {node.name!r}: {key}={value!r} is not a finite number")
            if name == WEIGHT_FORMAT and value not in WEIGHT_FORMATS:
                problems.append(f"node {node.name!r}: {key}={value!r} is not one of {', '.join(WEIGHT_FORMATS)}")
            if name == BLOCK_SIZE and value not in BLOCK_SIZES:
                problems.append(f"node {node.name!r}: {key}={value!r} is not one of {BLOCK_SIZES}")
            if name == SPARSITY and not (isinstance(value, (int, float)) and 0 <= value < 1):
                problems.append(f"node {node.name!r}: {key}={value} is not in [0, 1)")
    return problems


# How fused nodes combine annotations (fusion keeps the weight-bearing node's id).
_MERGE_POLICY: dict[str, Callable[[Any, Any], Any]] = {
    WEIGHT_BITS: max,
    ACTIVATION_BITS: max,
    SPARSITY: min,
    LAYER_ID: lambda first, _second: first,
}


def merge(name: str, first: Any, second: Any) -> Any:
    """Combine two nodes' values for annotation ``name`` when they fuse into one."""
    if name.startswith(SENSITIVITY_PREFIX):
        return first + second
    return _MERGE_POLICY.get(name, lambda a, _b: a)(first, second)


def merge_raw(key: str, first: str, second: str) -> str:
    """``merge`` on raw metadata strings; used as onnxscript's metadata merger."""
    if not key.startswith(PREFIX):
        return first
    name = key[len(PREFIX) :]
    return json.dumps(merge(name, json.loads(first), json.loads(second)), sort_keys=True)
