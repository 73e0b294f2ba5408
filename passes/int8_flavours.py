"""Int8 flavours of a QDQ model: the type of its activations and the range of its weights.

ONNX Runtime runs int8 QDQ layers as uint8 activations x int8 weights ("U8S8"), int8 x int8
("S8S8"), or U8S8 with 7-bit weights ("reduce range"). Which is fastest, and which is exact, depends
on the CPU: on AVX2 without VNNI the U8S8 kernels saturate (measured: relative output error 0.11
against 0.014 for S8S8) and S8S8 was the safe choice; with AVX-512 VNNI U8S8 is exact and 2-3x
faster than S8S8 on ResNets. So bitpass assumes neither: it builds each flavour and measures
speed and error on the target (``format_search``).

Building them is cheap: ``to_uint8_activations`` turns an S8S8 model into its U8S8 twin by moving
every activation zero point up by 128. That is exact, not an approximation: ORT's asymmetric
int8 and uint8 grids of one calibrated range have the same scale and zero points exactly 128 apart
(``zp = round(qmin - rmin / scale)`` with ``qmin`` = -128 or 0), so the two models quantize every
activation to the same real values; only the kernels differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper


@dataclass(frozen=True)
class Flavour:
    """One way to run int8 QDQ layers: activation type and weight range."""

    name: str
    activation_type: str  # "int8" or "uint8"
    reduce_range: bool = False

    def describe(self) -> str:
        weights = "7-bit int8 weights" if self.reduce_range else "int8 weights"
        return f"{self.name}: {self.activation_type} activations x {weights}"


S8S8 = Flavour("s8s8", "int8")
U8S8 = Flavour("u8s8", "uint8")
U8S8_REDUCED = Flavour("u8s8-reduce-range", "uint8", True)
FLAVOURS = {f.name: f for f in (U8S8, S8S8, U8S8_REDUCED)}


def flavour_of(activation_type: str, reduce_range: bool) -> Flavour:
    for flavour in FLAVOURS.values():
        if (flavour.activation_type, flavour.reduce_range) == (activation_type, reduce_range):
            return flavour
    return Flavour(f"{'u8' if activation_type == 'uint8' else 's8'}s8{'-reduce-range' if reduce_range else ''}",
                   activation_type, reduce_range)


def constant_tensors(proto: onnx.ModelProto) -> set[str]:
    """Names of tensors computed from initializers alone (weights and their unpacking chains)."""
    known = {t.name for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" or (node.input and all(not i or i in known for i in node.input)):
            known.update(o for o in node.output if o)
    return known


def to_uint8_activations(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of an S8S8 QDQ model with uint8 activations (U8S8); and how many zero points moved.

    Activation Q/DQ nodes are those whose data input is not constant; their int8 zero points become
    uint8 ones 128 higher (a zero point shared with a weight's DequantizeLinear is copied first).
    Weights, biases and their unpacking chains are left alone."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    constant = constant_tensors(out)
    inits = {t.name: t for t in out.graph.initializer}
    activation_zps: set[str] = set()
    weight_zps: set[str] = set()
    for node in out.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3 or not node.input[2]:
            continue
        (weight_zps if node.input[0] in constant else activation_zps).add(node.input[2])
    moved = 0
    renamed: dict[str, str] = {}
    for name in sorted(activation_zps):
        tensor = inits.get(name)
        if tensor is None or tensor.data_type != TensorProto.INT8:
            continue
        values = numpy_helper.to_array(tensor).astype(np.int16) + 128
        new = numpy_helper.from_array(values.astype(np.uint8), name if name not in weight_zps else f"{name}__u8")
        if name in weight_zps:
            out.graph.initializer.append(new)
            renamed[name] = new.name
        else:
            tensor.CopyFrom(new)
        moved += 1
    quantized: set[str] = set()
    for node in out.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) >= 3 \
                and node.input[0] not in constant:
            if node.input[2] in renamed:
                node.input[2] = renamed[node.input[2]]
            if node.op_type == "QuantizeLinear":
                quantized.update(node.output)
    # recorded types of the quantized activations and of the moved zero points would still say int8
    stale = quantized | set(activation_zps) | set(renamed.values())
    kept = [v for v in out.graph.value_info if v.name not in stale]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    return out, moved


__all__ = ["FLAVOURS", "S8S8", "U8S8", "U8S8_REDUCED", "Flavour", "constant_tensors", "flavour_of",
           "to_uint8_activations"]
