"""Per-layer latency of each way a layer can be materialized, measured in ONNX Runtime, cached per target.

Bit allocation needs to know, on *this* machine, whether a layer is faster as
int8 QDQ, MatMulNBits, blocked DequantizeLinear or fp32: on a small CNN int8 is
slower than fp32, MatMulNBits loses at large batch (NOTES.md). Each quantizable
layer is cut out as a one-node model, materialized by bitpass's own
``materialize`` exactly as the artifact will be, and timed against its fp32
form, alternating, at batch 1 and 64. Results are cached in a JSON file keyed
by the layer's signature, the ORT version and the CPU, so they are measured
once per target.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from bitpass.backends.measure import latency
from bitpass.backends.onnxruntime.runner import OrtRunner
from bitpass.frontend import Model, annotation, from_arrays, from_proto
from bitpass.frontend.layers import Layer
from bitpass.passes.calibrate import activation_ranges
from bitpass.passes.materialize import LayerPlan, QuantizeOptions, materialize

#: (bits, format) a layer can take; "fp32" is the reference every other variant is timed against
Variant = tuple[int, str]
FP32: Variant = (32, "fp32")
BATCHES = (1, 64)
#: bump when the way layers are timed changes, so cached figures are re-measured
METHOD_VERSION = 2
#: ops whose first input is the activation (Gather's is an index tensor: not timed)
TIMED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def cache_path() -> Path:
    root = Path(os.environ.get("BITPASS_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                / "bitpass")
    return root / "latency.json"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _single_layer(model: Model, layer: Layer, shapes: Mapping[str, list[int | str]]) -> tuple[onnx.ModelProto, str]:
    """A one-node model of ``layer`` (its constants included) with a symbolic batch axis; and its input name."""
    node = layer.node
    activation = node.inputs[0]
    if layer.op_type not in TIMED_OPS or activation is None:
        raise ValueError(f"layer {layer.id!r}: {layer.op_type} layers are not timed")
    initializers = []
    for value in node.inputs:
        if value is not None and value is not activation:
            tensor = value.const_value
            if tensor is None and value.producer() is not None and value.producer().op_type == "Constant":
                tensor = value.producer().attributes["value"].as_tensor()
            if tensor is None:
                raise ValueError(f"layer {layer.id!r}: input {value.name!r} is not constant")
            initializers.append(numpy_helper.from_array(tensor.numpy(), value.name))
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    proto_node = helper.make_node(node.op_type, [v.name if v is not None else "" for v in node.inputs],
                                  [node.outputs[0].name], name=f"layer_{layer.id}", **_plain(attrs))
    in_shape = list(shapes.get(activation.name) or [])
    if not in_shape:
        raise ValueError(f"layer {layer.id!r}: shape of its input {activation.name!r} is unknown")
    in_shape[0] = "batch"
    out_shape = list(shapes.get(node.outputs[0].name) or ["batch"])
    dtype = helper.np_dtype_to_tensor_dtype(activation.dtype.numpy()) if activation.dtype else onnx.TensorProto.FLOAT
    graph = helper.make_graph([proto_node], "layer", [helper.make_tensor_value_info(activation.name, dtype, in_shape)],
                              [helper.make_tensor_value_info(node.outputs[0].name, onnx.TensorProto.FLOAT,
                                                             ["batch", *out_shape[1:]])],
                              initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(model.opset, 21))])
    proto.ir_version = 10
    return proto, activation.name


def _plain(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in attrs.items():
        if hasattr(value, "numpy"):
            value = numpy_helper.from_array(value.numpy())
        elif isinstance(value, (list, tuple)):
            value = list(value)
        out[key] = value
    return out


def _shapes(model: Model) -> dict[str, list[int | str]]:
    inferred = onnx.shape_inference.infer_shapes(model.to_proto())
    shapes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    return shapes


def variant_model(proto: onnx.ModelProto, input_name: str, variant: Variant, sample: np.ndarray) -> bytes:
    """The one-layer model in ``variant``'s form, materialized exactly as the artifact's layer will be
    (int8 QDQ calibrated with min-max ranges on ``sample``)."""
    model = from_proto(proto)
    if variant == FP32:
        return model.to_bytes()
    bits, fmt = variant
    plan = {layer.id: LayerPlan(bits, 8 if fmt == "qdq" else annotation.FLOAT_BITS, fmt) for layer in model.layers()}
    ranges = None
    if fmt == "qdq":
        data = from_arrays({input_name: sample}, model.inputs, source="latency-probe")
        ranges = activation_ranges(model, data, method="minmax")
    return materialize(model, plan, ranges=ranges, options=QuantizeOptions(preprocess=False)).to_bytes()


def _key(proto: onnx.ModelProto, variant: Variant, batch: int, threads: int) -> str:
    node = proto.graph.node[0]
    signature = {
        "op": node.op_type, "attrs": sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute),
        "weights": [(t.name, list(t.dims)) for t in proto.graph.initializer],
        "input": [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]],
        "variant": list(variant), "batch": batch, "threads": threads, "ort": ort.__version__, "cpu": _cpu(),
        "method": METHOD_VERSION,
    }
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:32]


def measure(model: Model, variants: Mapping[str, Sequence[Variant]], *, batches: Iterable[int] = BATCHES,
            threads: int = 0, cache: Path | None = None,
            progress: Callable[[str], None] | None = None) -> dict[str, dict[Variant, dict[int, float]]]:
    """Seconds per call for every layer id × variant × batch (fp32 always included), from the cache when known."""
    say = progress or (lambda _m: None)
    cache = cache or cache_path()
    try:
        stored: dict[str, float] = json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, json.JSONDecodeError):
        stored = {}
    shapes = _shapes(model)
    rng = np.random.default_rng(0)
    table: dict[str, dict[Variant, dict[int, float]]] = {}
    layers = {layer.id: layer for layer in model.layers()}
    for layer_id, wanted in variants.items():
        if layers[layer_id].op_type not in TIMED_OPS:
            continue
        proto, input_name = _single_layer(model, layers[layer_id], shapes)
        todo = [FP32, *[v for v in wanted if v != FP32]]
        table[layer_id] = {v: {} for v in todo}
        for batch in batches:
            keys = {v: _key(proto, v, batch, threads) for v in todo}
            if all(k in stored for k in keys.values()):
                for v, k in keys.items():
                    table[layer_id][v][batch] = stored[k]
                continue
            say(f"measuring layer {layer_id} at batch {batch}: {', '.join(f'{b}-bit {f}' for b, f in todo)}")
            dims = [batch, *[d.dim_value or 1 for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]]
            sample = np.abs(rng.standard_normal(dims)).astype(np.float32)
            runners = {}
            for v in todo:
                try:
                    runners[v] = OrtRunner.from_bytes(variant_model(proto, input_name, v, sample), threads=threads,
                                                      for_timing=True)
                except Exception as err:  # a variant this layer cannot take: leave it out of the table
                    say(f"layer {layer_id}: {v[0]}-bit {v[1]} unavailable ({str(err).splitlines()[0][:80]})")
            times = latency({f"{b}/{f}": r for (b, f), r in runners.items()}, {input_name: sample},
                            rounds=7, min_seconds=0.01)
            for v in runners:
                seconds = times[f"{v[0]}/{v[1]}"]
                table[layer_id][v][batch] = seconds
                stored[keys[v]] = seconds
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, sort_keys=True))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return {k: {v: t for v, t in row.items() if t} for k, row in table.items()}
