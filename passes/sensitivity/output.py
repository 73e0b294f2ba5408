"""Output divergence under per-layer weight quantization, measured in ONNX Runtime only.

No torch and no labels: the model is run once in floating point, then once per (layer,
bits) with only that layer's weight replaced by ``fake_quantize(W, bits)``; the score is
the KL divergence of the softmax outputs or the mean squared output error. One ORT session
serves every layer: the layers' weights become *overridable initializers* (initializers
that are also graph inputs), so a run swaps a weight by feeding it, with no re-export and
no new session.

Cost is (layers x widths) full forward passes. Two options keep it bounded on real models:
``time_budget`` (seconds): the reference run is timed and, when all runs would take longer,
fewer samples are used (never fewer than ``min_samples``); ``extrapolate`` gives widths above
the lowest measured one without running them: in the small-noise regime both KL and MSE are
quadratic in the weight perturbation, so ``score(b) = score(m) * ||Q_b(W)-W||^2 / ||Q_m(W)-W||^2``
with ``m`` the next lower measured width (8 bits from 4: about 1/256 of it).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from bitpass.frontend import Dataset, Model
from bitpass.frontend.errors import UsageError
from bitpass.passes import execution
from bitpass.passes.progress import Reporter
from bitpass.passes.sensitivity.quant import TABLE_BITS, fake_quantize, layer_channel_axis, quantization_error

METRICS = ("kl", "mse")


def overridable(proto: onnx.ModelProto, names: Iterable[str], *, in_place: bool = False) -> onnx.ModelProto:
    """A copy of ``proto`` (``proto`` itself when ``in_place``: no second copy of a large model's weights) in
    which each tensor in ``names`` is an initializer that is also a graph input.

    Weights held by ``Constant`` nodes are turned into initializers first. ORT then uses the
    stored value unless a run feeds one under the same name. Applying it twice changes nothing.
    """
    wanted = set(names)
    out = proto if in_place else copy.deepcopy(proto)
    graph = out.graph
    initializers = {t.name: t for t in graph.initializer}
    for node in list(graph.node):
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1
                and node.output[0] in wanted and node.output[0] not in initializers):
            values = [a for a in node.attribute if a.name == "value"]
            if not values:
                continue
            tensor = onnx.TensorProto()
            tensor.CopyFrom(values[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            initializers[tensor.name] = tensor
            graph.node.remove(node)
    present = {v.name for v in graph.input}
    for name in sorted(wanted):
        if name not in initializers:
            raise UsageError(f"weight {name!r} is neither an initializer nor a Constant output")
        if name not in present:
            tensor = initializers[name]
            graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def divergence(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], metric: str) -> float:
    """``kl``: mean over positions of KL(softmax(reference) || softmax(output)) on the last axis;
    ``mse``: mean squared difference. Summed over the (float) outputs given."""
    total = 0.0
    for ref, out in zip(reference, outputs):
        if metric == "kl":
            lp, lq = _log_softmax(ref), _log_softmax(out)
            total += float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
        elif metric == "mse":
            total += float(np.mean((ref.astype(np.float64) - out.astype(np.float64)) ** 2))
        else:
            raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    return total


class OutputProbe:
    """One ORT session over fixed input batches; ``run(overrides)`` returns the float outputs.

    ``weight_names`` are the tensors that may be overridden. ``reference`` holds the outputs
    with no override; ``divergence(overrides, metric)`` compares a run against it.
    """

    def __init__(self, proto: onnx.ModelProto, weight_names: Iterable[str],
                 batches: Sequence[Mapping[str, np.ndarray]], *, threads: int | None = None,
                 in_place: bool = False) -> None:
        self.proto = overridable(proto, weight_names, in_place=in_place)
        self.session = execution.create_session(self.proto, threads=threads or None,
                                                purpose="run the model to measure output sensitivity")
        self.batches = [dict(b) for b in batches]
        floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
        self.output_names = [o.name for o in self.proto.graph.output
                             if o.type.tensor_type.elem_type in floats]
        if not self.output_names:
            raise UsageError("output sensitivity needs at least one floating-point model output")
        self.runs = 0
        self.reference = self.run({})

    def run(self, overrides: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs over all batches (concatenated on the first axis) with ``overrides`` fed as weights."""
        parts: list[list[np.ndarray]] = [[] for _ in self.output_names]
        for batch in self.batches:
            feeds = {**batch, **overrides}
            for part, value in zip(parts, self.session.run(self.output_names, feeds)):
                part.append(np.asarray(value))
        self.runs += 1
        return [np.concatenate(p, axis=0) if p[0].ndim else np.stack(p) for p in parts]

    def divergence(self, overrides: Mapping[str, np.ndarray], metric: str) -> float:
        return divergence(self.reference, self.run(overrides), metric)


def _batches(model: Model, data: Dataset, samples: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    subset = data.head(samples) if samples and samples < len(data) else data
    fixed = {s.shape[0] for s in model.inputs if s.shape and isinstance(s.shape[0], int)}
    if len(fixed) == 1:
        batch_size = fixed.pop()
        if len(subset) < batch_size:
            raise UsageError(f"the model's batch size is fixed at {batch_size}, but only {len(subset)} "
                             f"calibration samples were given")
        usable = len(subset) - len(subset) % batch_size
        return [b for b in subset.head(usable).batches(batch_size)]
    return list(subset.batches(max(1, batch_size)))


@dataclass
class OutputSensitivity:
    """Per-layer, per-bits divergence (``table[layer_id][bits]``) and what it cost."""

    table: dict[str, dict[int, float]]
    metric: str
    samples: int
    runs: int
    #: layers that share a weight tensor with an earlier layer (measured together, same values)
    shared: dict[str, str]
    #: widths given by extrapolation (not run): {bits: the measured width they were scaled from}
    extrapolated: dict[int, int] = field(default_factory=dict)
    #: why fewer samples than asked were used (the time budget), else ""
    reduced: str = ""


#: the fewest samples a time budget may reduce a measurement to
MIN_SAMPLES = 8


def output_sensitivity(model: Model, data: Dataset, *, metric: str = "kl", bits: Iterable[int] = TABLE_BITS,
                       samples: int = 64, batch_size: int = 64, threads: int | None = None,
                       progress: Callable[[str], None] | None = None, time_budget: float | None = None,
                       extrapolate: bool = False, min_samples: int = MIN_SAMPLES) -> OutputSensitivity:
    """For every quantizable layer and each bit width, the output divergence when only that layer
    is fake-quantized (symmetric, per output channel) and everything else stays float.

    ``time_budget`` (seconds) caps the measuring runs by using fewer samples; ``extrapolate`` measures only
    the lowest widths (all but the highest when there are three or more) and scales the others (see above)."""
    if metric not in METRICS:
        raise UsageError(f"unknown output metric {metric!r}; use one of {', '.join(METRICS)}")
    layers = model.layers()
    if not layers:
        return OutputSensitivity({}, metric, 0, 0, {})
    names = {layer.id: layer.weight.name or "" for layer in layers}
    bits = sorted({int(b) for b in bits})
    measured = bits[:-1] if extrapolate and len(bits) >= 3 else bits
    extrapolated = {b: max(m for m in measured if m < b) for b in bits if b not in measured}
    distinct = len(set(names.values()))
    proto = model.to_proto()
    batches = _batches(model, data, samples, batch_size)
    start = time.perf_counter()
    probe = OutputProbe(proto, set(names.values()), batches, threads=threads, in_place=True)
    reference_s = time.perf_counter() - start
    used = sum(len(next(iter(b.values()))) for b in batches)
    reduced = ""
    runs_needed = distinct * len(measured)
    if time_budget is not None and reference_s * runs_needed > time_budget and used > min_samples:
        fewer = max(min_samples, int(used * time_budget / (reference_s * runs_needed)))
        if fewer < used:
            reduced = (f"{used} samples would take about {reference_s * runs_needed:.0f} s for {runs_needed} runs; "
                       f"{fewer} fit the {time_budget:g} s budget")
            batches = _batches(model, data, fewer, batch_size)
            probe = OutputProbe(proto, set(names.values()), batches, threads=threads, in_place=True)
            used = sum(len(next(iter(b.values()))) for b in batches)
    del proto
    table: dict[str, dict[int, float]] = {}
    seen: dict[str, str] = {}
    shared: dict[str, str] = {}
    # a counted task (a bar with an ETA on a terminal) when the caller's reporter has tasks, else plain messages
    task = progress.task(f"sensitivity (output-{metric})", total=len(layers), unit="layer") \
        if isinstance(progress, Reporter) else None
    with task if task is not None else contextlib.nullcontext():
        for index, layer in enumerate(layers):
            name = names[layer.id]
            if name in seen:
                shared[layer.id] = seen[name]
                table[layer.id] = dict(table[seen[name]])
            else:
                seen[name] = layer.id
                weight, axis = layer.weight_array, layer_channel_axis(layer)
                row = {b: probe.divergence({name: fake_quantize(weight, b, axis)}, metric) for b in measured}
                for b, source in extrapolated.items():
                    base = quantization_error(weight, source, axis)
                    row[b] = row[source] * quantization_error(weight, b, axis) / base if base > 0 else 0.0
                table[layer.id] = {b: row[b] for b in bits}
            if task is not None:
                task.advance()
            elif progress is not None:
                progress(f"output-{metric}: layer {index + 1}/{len(layers)} {layer.id}")
    return OutputSensitivity(table, metric, used, probe.runs, shared, extrapolated, reduced)
