"""Latency of each way a layer (or a whole model) can be materialized, measured on this machine.

Bit allocation and format choice need to know, on *this* CPU, whether a layer is faster as int8 QDQ
with uint8 or int8 activations, dynamic int8, MatMulNBits at block 32/64/128, blocked
DequantizeLinear or fp32: nothing about a CPU is assumed (on AVX2 without VNNI, U8S8 saturates; with
VNNI it is 2-3x faster than S8S8; on depthwise convolutions every int8 flavour loses to fp32).

Per layer: each quantizable layer is cut out as a one-node model whose input has the layer's *real*
shape at each batch size and holds the layer's real input, taken from a run of the model on the
calibration data (a transformer with dynamic axes has no static shapes to infer). Each variant is
materialized by bitpass's own ``materialize``, exactly as the artifact's layer will be (QDQ ranges
calibrated on that real input), and all variants of a layer are timed against its fp32 form,
alternating, in a fresh process (``timing.py``). Figures are cached in a JSON file under a key made
of the layer's op, attributes, weight shapes and input shape (never tensor names: a re-export with
other names is not re-timed), the variant, batch, threads, ONNX Runtime's version and the CPU's
feature flags. A layer that cannot be cut out or timed is recorded in ``LatencyTable.failures`` and
left out of the table: allocation then keeps it in a safe format (packed or fp32); it never fails
the compile.

Whole models: ``LatencyProbe.graphs`` times complete candidate artifacts against each other in a
fresh process (``format_search`` uses it to pick the int8 flavour and repair the plan).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper, numpy_helper

from bitpass.backends.onnxruntime import timing
from bitpass.frontend import Dataset, Model, from_arrays, from_proto
from bitpass.frontend.cache import cache_dir
from bitpass.frontend.cpu import Cpu, host
from bitpass.frontend.layers import Layer, constant_tensor
from bitpass.passes import execution
from bitpass.passes.allocation.formats import variant_plan
from bitpass.passes.calibrate import activation_ranges
from bitpass.passes.materialize import LayerPlan, QuantizeOptions, materialize

#: (bits, name) a layer can take; "fp32" is the reference every other variant is timed against
Variant = tuple[int, str]
FP32: Variant = (32, "fp32")
BATCHES = (1, 64)
#: bump when the way layers are timed changes, so cached figures are re-measured
METHOD_VERSION = 3
#: ops whose first input is the activation (Gather's is an index tensor: not timed)
TIMED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: at most this many bytes of layer inputs are collected from one run of the model
COLLECT_BYTES = 256 << 20
#: per layer and batch: at most this many alternating rounds, and this many seconds after the first three (each
#: round runs a model for at least 10 ms; a format is chosen only when 10 % faster than fp32 at every batch, and the
#: whole-graph format search checks the plan again: 7 rounds and 1 s were a third of a ResNet-18 probe)
ROUNDS, GROUP_SECONDS = 5, 0.5


class LatencyTable(dict):
    """``{layer_id: {(bits, name): {batch: seconds}}}``, the layers that could not be timed, with why, and what the
    probe did (``work``: layers, distinct groups timed, models built, wall seconds of each step)."""

    def __init__(self, *args: Any, failures: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures: dict[str, str] = dict(failures or {})
        self.work: dict[str, Any] = {}


def cache_path() -> Path:
    return cache_dir() / "latency.json"


# --- the layer's real inputs -----------------------------------------------------------------------------
def _activation(layer: Layer) -> str | None:
    value = layer.node.inputs[0] if layer.node.inputs else None
    return value.name if value is not None and constant_tensor(value) is None else None


def layer_inputs(model: Model, layers: Sequence[Layer], calibration: Dataset,
                 batches: Iterable[int]) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, str]]:
    """Each layer's real input at each batch size: the model run on the first ``batch`` calibration samples
    (repeated when there are fewer). Returns ``{layer_id: {batch: array}}`` and ``{layer_id: why not}``."""
    names: dict[str, str] = {}
    failures: dict[str, str] = {}
    for layer in layers:
        name = _activation(layer)
        if name is None:
            failures[layer.id] = "its first input is a constant, not an activation"
        else:
            names[layer.id] = name
    out: dict[str, dict[int, np.ndarray]] = {layer_id: {} for layer_id in names}
    if not names:
        return out, failures
    graph_inputs = {spec.name for spec in model.inputs}
    per_sample: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bitpass-layer-inputs-") as tmp:
        exposed = _Exposer(model, Path(tmp))
        for batch in sorted(set(batches)):
            feeds = calibration.batch_of(batch)
            wanted = list(dict.fromkeys(names.values()))
            chunks = _chunks(wanted, per_sample, batch)
            got: dict[str, np.ndarray] = {n: feeds[n] for n in wanted if n in graph_inputs}
            for chunk in chunks:
                fetch = [n for n in chunk if n not in graph_inputs]
                if not fetch:
                    continue
                try:
                    session = execution.create_session(exposed.path(fetch), purpose="collect layer inputs")
                    got.update(zip(fetch, session.run(fetch, feeds)))
                    del session
                except Exception as err:  # the model does not run on this data: no layer can be timed
                    for layer_id in names:
                        failures.setdefault(layer_id, f"the model did not run to collect layer inputs: "
                                                      f"{execution.first_line(err)}")
                    return {}, failures
            for name in wanted:
                if name in got:
                    per_sample[name] = max(1, got[name].nbytes // max(batch, 1))
            for layer_id, name in names.items():
                value = got.get(name)
                if value is None or value.dtype != np.float32:
                    failures.setdefault(layer_id, f"its input {name!r} is not a float32 tensor")
                else:
                    out[layer_id][batch] = np.ascontiguousarray(value)
    return {k: v for k, v in out.items() if k not in failures}, failures


class _Exposer:
    """The model with some inner tensors as extra outputs, as files ONNX Runtime loads by path: the weights are
    written once (external data), each set of outputs is a small model file that refers to them. (A copy of the
    model per set, serialized in memory, cost a BERT-base compile over a gigabyte at a time.)"""

    def __init__(self, model: Model, folder: Path) -> None:
        self.model, self.folder, self.count = model, folder, 0
        self.base: ir.Model | None = None

    def path(self, names: Sequence[str]) -> Path:
        if self.base is None:
            self.model.save_external(self.folder / "model.onnx")
            self.base = ir.load(self.folder / "model.onnx")  # weights: views of model.onnx.data, not copies
        copy = self.base.clone()
        values = {v.name: v for node in copy.graph for v in node.outputs}
        present = {v.name for v in copy.graph.outputs} | {v.name for v in copy.graph.inputs}
        for name in dict.fromkeys(names):
            if name not in present and name in values:
                copy.graph.outputs.append(values[name])
        self.count += 1
        path = self.folder / f"exposed{self.count}.onnx"
        ir.save(copy, path)  # external tensors keep their place in model.onnx.data (same folder)
        return path


def _chunks(names: list[str], per_sample: Mapping[str, int], batch: int) -> list[list[str]]:
    """Names grouped so that one run returns at most ``COLLECT_BYTES`` (sizes known after the first batch)."""
    chunks: list[list[str]] = [[]]
    used = 0
    for name in names:
        size = per_sample.get(name, 0) * batch
        if chunks[-1] and (used + size > COLLECT_BYTES or (not per_sample and len(chunks[-1]) >= 64)):
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return chunks


# --- one-layer models ------------------------------------------------------------------------------------
def single_layer(model: Model, layer: Layer, input_shape: Sequence[int]) -> onnx.ModelProto:
    """A one-node model of ``layer`` (its constants included) reading ``x`` of ``input_shape``; names are
    canonical (x, c1, c2..., y), so equal layers of two models give equal models. Any size: the output's shape is
    inferred on the graph without its weights (shape inference serializes what it is given, and a layer over
    protobuf's 2 GiB, such as a large vocabulary's lm_head, has no bytes)."""
    node = layer.node
    if layer.op_type not in TIMED_OPS:
        raise ValueError(f"{layer.op_type} layers are not timed")
    activation = node.inputs[0]
    inputs, initializers = [], []
    for index, value in enumerate(node.inputs):
        if value is None:
            inputs.append("")
        elif value is activation:
            inputs.append("x")
        else:
            tensor = constant_tensor(value)
            if tensor is None:
                raise ValueError(f"input {value.name!r} is not constant")
            name = f"c{index}"
            initializers.append(numpy_helper.from_array(tensor.numpy(), name))
            inputs.append(name)
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    proto_node = helper.make_node(node.op_type, inputs, ["y"], name="layer", **_plain(attrs))
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(input_shape))
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    opsets = [helper.make_opsetid("", max(model.opset, 21))]
    weightless = helper.make_model(
        helper.make_graph([proto_node], "layer",
                          [x, *[helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in initializers]],
                          [y]), opset_imports=opsets)
    weightless.ir_version = 10
    inferred = onnx.shape_inference.infer_shapes(weightless, strict_mode=True)
    graph = helper.make_graph([proto_node], "layer", [x], [inferred.graph.output[0]], initializers)
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 10
    return proto


def _plain(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in attrs.items():
        if hasattr(value, "numpy"):
            value = numpy_helper.from_array(value.numpy())
        elif isinstance(value, (list, tuple)):
            value = list(value)
        out[key] = value
    return out


def variant_model(proto: onnx.ModelProto, variant: Variant, sample: np.ndarray,
                  memo: dict[str, Any] | None = None) -> Model:
    """The one-layer model in ``variant``'s form, materialized exactly as the artifact's layer will be
    (int8 QDQ calibrated with min-max ranges on ``sample``, the layer's real input). ``memo``: a dict kept across
    the variants of one ``proto`` and ``sample``, so their ranges are computed once (both int8 flavours use them).
    ``Model.save`` writes it, with external data past protobuf's 2 GiB."""
    model = from_proto(proto, name="layer")
    if variant == FP32:
        return model
    how = variant_plan(variant)
    plan = {layer.id: LayerPlan(how.bits, how.activation_bits, how.format, how.block_size)
            for layer in model.layers()}
    ranges = None
    if how.format == "qdq":
        memo = {} if memo is None else memo
        if "ranges" not in memo:
            data = from_arrays({"x": sample}, model.inputs, source="latency-probe")
            memo["ranges"] = activation_ranges(model, data, method="minmax", batch_size=max(1, len(sample)))
        ranges = memo["ranges"]
    options = QuantizeOptions(preprocess=False, activation_type=how.activation_type)  # type: ignore[arg-type]
    return materialize(model, plan, ranges=ranges, options=options)


def signature(proto: onnx.ModelProto) -> dict[str, Any]:
    """What a one-layer model's timing depends on: op, attributes, constant shapes, input shape."""
    node = proto.graph.node[0]
    return {"op": node.op_type,
            "attrs": sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute),
            "constants": [(t.name, list(t.dims), t.data_type) for t in proto.graph.initializer],
            "input": [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]}


def _key(sig: Mapping[str, Any], variant: Variant, threads: int, cpu_key: str) -> str:
    full = {**sig, "variant": list(variant), "threads": threads, "ort": ort.__version__, "cpu": cpu_key,
            "method": METHOD_VERSION}
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:32]


def _static_inputs(model: Model, layers: Sequence[Layer],
                   batches: Iterable[int]) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, str]]:
    """Without calibration data: inputs of the shapes static shape inference knows (batch axis set), random
    non-negative values; a layer with any other unknown dimension cannot be timed (it is reported)."""
    inferred = onnx.shape_inference.infer_shapes(model.to_proto())
    shapes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    rng = np.random.default_rng(0)
    out: dict[str, dict[int, np.ndarray]] = {}
    failures: dict[str, str] = {}
    for layer in layers:
        name = _activation(layer)
        shape = shapes.get(name or "")
        if not shape or any(d is None for d in shape[1:]):
            failures[layer.id] = f"the shape of its input {name!r} is not static: give calibration data"
            continue
        out[layer.id] = {b: np.abs(rng.standard_normal([b, *shape[1:]])).astype(np.float32) for b in batches}
    return out, failures


# --- the probe ---------------------------------------------------------------------------------------------
def measure(model: Model, variants: Mapping[str, Sequence[Variant]], *, batches: Iterable[int] = BATCHES,
            threads: int = 0, cache: Path | None = None, progress: Callable[[str], None] | None = None,
            calibration: Dataset | None = None, fresh_process: bool = True) -> LatencyTable:
    """Seconds per call for every layer id x variant x batch (fp32 always included), from the cache when known.

    Layers with the same signature (op, attributes, weight shapes, input shape: a transformer's Q, K, V and O
    projections, a ResNet stage's repeated convolutions) are timed once, as the first of them, and share its
    figures. Layers whose op is not timed (an embedding lookup) are left out silently; layers that cannot be cut
    out, materialized in fp32 or run are in ``failures``. A variant a layer cannot take is left out of its row."""
    say = progress or (lambda _m: None)
    batches = tuple(sorted(set(batches)))
    cache = cache or cache_path()
    stored = _load(cache)
    cpu_key = host().key
    layers = {layer.id: layer for layer in model.layers()}
    timed = [layers[i] for i in variants if i in layers and layers[i].op_type in TIMED_OPS]
    started = time.perf_counter()
    if calibration is not None:
        inputs, failures = layer_inputs(model, timed, calibration, batches)
    else:
        inputs, failures = _static_inputs(model, timed, batches)
    phase_seconds = {"layer_inputs": time.perf_counter() - started}
    started = time.perf_counter()
    # layer id -> batch -> variant -> cache key; the figures come from ``stored`` once every group is timed
    wanted: dict[str, dict[int, dict[Variant, str]]] = {}
    # (signature, batch) -> the group timing it, the cache keys of its models, and the signature's failure
    scheduled: dict[str, _Scheduled] = {}
    # the one-layer models wait for the timing process on disk: in memory, a BERT-base set (72 layers x 2 batches x
    # 4 variants) held over a gigabyte
    holder = tempfile.TemporaryDirectory(prefix="bitpass-layers-")
    folder = Path(holder.name)
    for layer in timed:
        if layer.id in failures:
            continue
        todo = [FP32, *[tuple(v) for v in variants[layer.id] if tuple(v) != FP32]]
        wanted[layer.id] = {}
        for batch in batches:
            sample = inputs[layer.id][batch]
            try:
                proto = single_layer(model, layer, sample.shape)
            except Exception as err:
                failures[layer.id] = f"cannot be cut out as a one-layer model: {execution.first_line(err)}"
                break
            sig = signature(proto)
            keys = {v: _key(sig, v, threads, cpu_key) for v in todo}
            wanted[layer.id][batch] = keys
            missing = [v for v in todo if keys[v] not in stored]
            if not missing:
                continue
            slot = scheduled.setdefault(keys[FP32], _Scheduled(len(scheduled)))
            if slot.failure is None:
                # every group is timed against its own fp32; a layer equal to one already scheduled adds only
                # the variants that one did not ask for
                for v in [FP32, *missing]:
                    if _name(v) in slot.models or v in slot.unavailable:
                        continue
                    try:
                        path = folder / f"g{slot.index}_m{len(slot.models)}.onnx"
                        variant_model(proto, v, sample, slot.memo).save(path)
                        slot.models[_name(v)] = path
                        slot.keys[v] = keys[v]
                    except Exception as err:  # a variant this layer cannot take: left out of its row
                        if v == FP32:
                            slot.failure = f"its fp32 form does not build: {execution.first_line(err)}"
                            break
                        slot.unavailable.add(v)
                        say(f"layer {layer.id}: {v[0]}-bit {v[1]} unavailable "
                            f"({execution.first_line(err)[:80]})")
                if not slot.feeds:  # a fixed-batch model gives every batch the same shape: one feed is enough
                    slot.feeds[batch] = {"x": sample}
            if slot.failure is not None:
                failures[layer.id] = slot.failure
                break
    groups = [slot for slot in scheduled.values() if slot.failure is None]
    phase_seconds["build"] = time.perf_counter() - started
    started = time.perf_counter()
    if groups:
        count = len({lid for lid, per in wanted.items() if any(k[FP32] in scheduled for k in per.values())})
        say(f"timing {count} layer(s) as {len(groups)} distinct (shape, batch) group(s) in a fresh process")
        timing.time_groups([slot.group() for slot in groups], threads=threads, rounds=ROUNDS, min_seconds=0.01,
                           budget_seconds=GROUP_SECONDS, fresh_process=fresh_process)
        for slot in groups:
            if _name(FP32) in slot.timed.errors:
                slot.failure = f"its fp32 form does not run: {slot.timed.errors[_name(FP32)]}"
                continue
            (batch,) = slot.feeds
            for v, key in slot.keys.items():
                seconds = slot.timed.median(_name(v), batch)
                if seconds is not None:
                    stored[key] = seconds
    holder.cleanup()
    phase_seconds["timing"] = time.perf_counter() - started
    table = LatencyTable()
    for layer_id, per_batch in wanted.items():
        for keys in per_batch.values():
            slot = scheduled.get(keys[FP32])
            if slot is not None and slot.failure is not None:
                failures.setdefault(layer_id, slot.failure)
        if layer_id in failures:
            continue
        row: dict[Variant, dict[int, float]] = {}
        for batch, keys in per_batch.items():
            for v, key in keys.items():
                if key in stored:
                    row.setdefault(v, {})[batch] = stored[key]
        table[layer_id] = {v: t for v, t in row.items() if len(t) == len(batches)}
    table.failures = failures
    table.work = {"layers": len(timed), "groups_timed": len(groups), "models_built": sum(len(g.models) for g in groups),
                  "seconds": {k: round(v, 3) for k, v in phase_seconds.items()}}
    for layer_id, why in sorted(failures.items()):
        say(f"warning: layer {layer_id} was not timed ({why}); it stays in a safe format")
    _store_json(cache, stored)
    return table


class _Scheduled:
    """The one-layer models of one signature at one batch, timed as one group (shared by every equal layer)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.models: dict[str, bytes | Path] = {}
        self.keys: dict[Variant, str] = {}
        self.feeds: dict[int, dict[str, np.ndarray]] = {}
        self.unavailable: set[Variant] = set()
        self.failure: str | None = None
        self.timed = timing.Group({}, {})
        self.memo: dict[str, Any] = {}  # what the variants of its one-layer model share (calibrated ranges)

    def group(self) -> timing.Group:
        self.timed = timing.Group(self.models, self.feeds)
        return self.timed


def _name(variant: Variant) -> str:
    return f"{variant[0]}/{variant[1]}"


def _load(cache: Path) -> dict[str, float]:
    """The per-layer timings stored in ``cache`` (entries that are not numbers are ignored)."""
    return {k: float(v) for k, v in _load_json(cache).items() if isinstance(v, (int, float))}


#: file (beside the per-layer cache) of whole-graph timings asked for with ``graphs(..., cached=True)``
GRAPHS_CACHE = "graphs.json"


def _content_digest(model: bytes | Path) -> str:
    """A model's content: its bytes, or its file and the external data file ``Model.save_external`` puts beside it."""
    digest = hashlib.sha256()
    if isinstance(model, Path):
        for path in (model, model.with_name(model.name + ".data")):
            if path.is_file():
                with path.open("rb") as handle:
                    for block in iter(lambda: handle.read(1 << 24), b""):
                        digest.update(block)
    else:
        digest.update(model)
    return digest.hexdigest()


def _graphs_key(group: timing.Group, options: Mapping[str, Any]) -> str:
    feeds = {str(b): {name: [hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest(), list(a.shape), str(a.dtype)]
                      for name, a in sorted(f.items())} for b, f in sorted(group.feeds.items())}
    full = {"models": {name: _content_digest(m) for name, m in sorted(group.models.items())}, "feeds": feeds,
            "options": dict(options), "ort": ort.__version__, "cpu": host().key, "method": METHOD_VERSION}
    return hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _store_json(path: Path, entries: Mapping[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_load_json(path), **entries}  # another compile may have written meanwhile
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time


class LatencyProbe:
    """The ONNX Runtime target's timer: per layer (``__call__``) and whole models (``graphs``), each in a fresh
    process; what allocation and format search receive as ``ctx.target.options["latency_probe"]``."""

    def __init__(self, *, threads: int = 0, cache: Path | None = None, fresh_process: bool = True) -> None:
        self.threads = threads
        self.cache = cache
        self.fresh_process = fresh_process

    def __call__(self, model: Model, variants: Mapping[str, Sequence[Variant]],
                 progress: Callable[[str], None] | None = None, batches: Iterable[int] = BATCHES, *,
                 calibration: Dataset | None = None) -> LatencyTable:
        return measure(model, variants, batches=batches, threads=self.threads, cache=self.cache,
                       progress=progress, calibration=calibration, fresh_process=self.fresh_process)

    def graphs(self, models: Mapping[str, bytes | Path], feeds: Mapping[int, Mapping[str, np.ndarray]], *,
               rounds: int = 9, min_seconds: float = 0.02, budget_seconds: float | None = 8.0,
               disabled_optimizers: Mapping[str, Sequence[str]] | None = None, cached: bool = False) -> timing.Group:
        """Whole models timed against each other, alternating, at each batch of ``feeds``: a ``timing.Group``
        with every round's seconds (``ratio(name, reference, batch)`` gives paired medians). Each round runs a
        model for at least ``min_seconds`` and counts the median of its calls (a preempted call does not move
        it); ``budget_seconds`` caps a batch's rounds after the first three; ``disabled_optimizers`` (name ->
        ORT optimizer names) times a model with those graph optimizers off. ``cached``: the rounds of the same
        models (by content), feeds and options on this CPU and ONNX Runtime come from the cache when known, so a
        decision taken on them is taken the same way by the next compile (bitpass's determinism)."""
        disabled = {n: list(v) for n, v in (disabled_optimizers or {}).items()}
        group = timing.Group(dict(models), {b: dict(f) for b, f in feeds.items()}, disabled_optimizers=disabled)
        options = {"rounds": rounds, "min_seconds": min_seconds, "budget_seconds": budget_seconds,
                   "disabled": disabled, "threads": self.threads}
        key = _graphs_key(group, options) if cached else None
        path = (self.cache or cache_path()).with_name(GRAPHS_CACHE)
        known = _load_json(path).get(key) if key else None
        if isinstance(known, dict) and isinstance(known.get("samples"), dict):
            group.samples = {name: {int(b): [float(x) for x in v] for b, v in per.items()}
                             for name, per in known["samples"].items()}
            group.errors = dict(known.get("errors") or {})
            return group
        timing.time_groups([group], threads=self.threads, rounds=rounds, min_seconds=min_seconds,
                           budget_seconds=budget_seconds, fresh_process=self.fresh_process, per_round="median")
        if key:
            _store_json(path, {key: {"samples": group.samples, "errors": group.errors}})
        return group

    @staticmethod
    def cpu() -> Cpu:
        """The CPU the timings are taken (and cached) on."""
        return host()


__all__ = ["BATCHES", "FP32", "LatencyProbe", "LatencyTable", "cache_path", "layer_inputs", "measure",
           "single_layer", "variant_model"]
