"""Output divergence under per-layer weight quantization, measured in ONNX Runtime only.

No torch and no labels: the model is run once in floating point, then once per (layer,
bits) with only that layer's weight replaced by ``fake_quantize(W, bits)``; the score is
the KL divergence of the softmax outputs or the mean squared output error. One ORT session
serves every layer: the layers' weights become *overridable initializers* (initializers
that are also graph inputs), so a run swaps a weight by feeding it, with no re-export and
no new session.

Cost is (layers x widths) forward passes, each over only the nodes downstream of the layer's weight
(``suffixes``, default): the reference run keeps the tensors those nodes read from upstream (skip
connections, masks) and feeds them back, so a late layer costs a fraction of a full run (about 0.4-0.5
of the full runs' work on ResNet-18 and a 6-layer sentence encoder, same scores to 1e-4 relative).
Two options keep it bounded on real models:
``time_budget`` (seconds): the reference run is timed and, when all runs would take longer,
fewer samples are used (never fewer than ``min_samples``); ``extrapolate`` gives widths above
the lowest measured one without running them: in the small-noise regime both KL and MSE are
quadratic in the weight perturbation, so ``score(b) = score(m) * ||Q_b(W)-W||^2 / ||Q_m(W)-W||^2``
with ``m`` the next lower measured width (8 bits from 4: about 1/256 of it).

The per-layer runs are tasks on an executor (``passes/executors.py``; ``--executor local:2`` or ``ray``): one
task per distinct weight (``measure_layer``), each process measuring against its own probe built once from the
same model and batches, so the table is the serial one bit for bit wherever the tasks ran.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.special
import onnx
from onnx import numpy_helper

from bitpass.frontend import Dataset, Model
from bitpass.frontend.errors import UsageError
from bitpass.passes import execution
from bitpass.passes.executors import SERIAL, Executor
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


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64 (scipy's stable form)."""
    return scipy.special.log_softmax(np.asarray(rows, np.float64), axis=-1)


#: elements of one block of rows the KL is computed over (float64 temporaries of 8 MB, not a full-vocabulary copy
#: of every position: a 124 M decoder's logits over 8 x 128 tokens are 411 MB in float64)
KL_BLOCK = 1 << 20


def _mean_kl(reference_logp: np.ndarray, output: np.ndarray) -> float:
    """Mean over positions of KL(p || q), p from ``reference_logp``, q = softmax(``output``), block by block."""
    width = reference_logp.shape[-1] if reference_logp.ndim else 1
    ref_rows, out_rows = reference_logp.reshape(-1, width), np.asarray(output).reshape(-1, width)
    step = max(1, KL_BLOCK // width)
    total = 0.0
    for start in range(0, len(ref_rows), step):
        lp = ref_rows[start:start + step]
        lq = _log_softmax(out_rows[start:start + step])
        total += float(np.sum(np.exp(lp) * (lp - lq)))
    return total / max(1, len(ref_rows))


def divergence(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], metric: str, *,
               reference_logp: Sequence[np.ndarray] | None = None) -> float:
    """``kl``: mean over positions of KL(softmax(reference) || softmax(output)) on the last axis;
    ``mse``: mean squared difference. Summed over the (float) outputs given. ``reference_logp``: the
    references' ``_log_softmax``, when the caller keeps them for many comparisons."""
    total = 0.0
    for index, (ref, out) in enumerate(zip(reference, outputs)):
        if metric == "kl":
            lp = reference_logp[index] if reference_logp is not None else _log_softmax(ref)
            total += _mean_kl(lp, out)
        elif metric == "mse":
            total += float(np.mean((ref.astype(np.float64) - out.astype(np.float64)) ** 2))
        else:
            raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    return total


# ----------------------------------------------------------------------
# suffix runs: only the nodes downstream of the quantized weight
#: the most bytes of cached cut tensors (all batches) that suffix runs may hold
SUFFIX_CACHE_BYTES = 1 << 30


@dataclass
class Suffix:
    """The part of a graph that a weight influences: ``nodes`` (indices, in graph order) and the ``cut`` tensors
    they read from outside it (graph inputs or other nodes' outputs; not initializers)."""

    weight: str
    nodes: list[int]
    cut: list[str]
    #: the graph outputs it computes (the others do not depend on the weight)
    outputs: list[str]


def downstream(graph: onnx.GraphProto, weight: str) -> Suffix | None:
    """The nodes that depend on ``weight`` and what they read from the rest of the graph; None when the graph
    has subgraphs (their outer-scope reads are not traced) or sparse initializers."""
    if graph.sparse_initializer or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                       for n in graph.node for a in n.attribute):
        return None
    initializers = {t.name for t in graph.initializer}
    dirty, nodes = {weight}, []
    for index, node in enumerate(graph.node):
        if any(name in dirty for name in node.input):
            nodes.append(index)
            dirty.update(o for o in node.output if o)
    constants = {o: i for i, n in enumerate(graph.node) if n.op_type == "Constant" and not n.input for o in n.output}
    chosen = set(nodes)
    cut: dict[str, None] = {}
    for index in nodes:
        for name in graph.node[index].input:
            if not name or name in dirty or name in initializers:
                continue
            if name in constants:  # a Constant's value travels with the suffix rather than as a fed tensor
                chosen.add(constants[name])
            else:
                cut[name] = None
    return Suffix(weight, sorted(chosen), list(cut), [o.name for o in graph.output if o.name in dirty])


def suffix_model(proto: onnx.ModelProto, suffix: Suffix, cut_values: Mapping[str, np.ndarray],
                 outputs: Sequence[str]) -> onnx.ModelProto:
    """A model of only ``suffix``'s nodes: the cut tensors are its inputs (typed from ``cut_values``), the weight
    an overridable initializer, ``outputs`` (those of the graph's outputs it computes) its outputs."""
    graph = proto.graph
    nodes = [graph.node[i] for i in suffix.nodes]
    used = {name for node in nodes for name in node.input}
    out = onnx.ModelProto()
    out.ir_version = proto.ir_version
    out.opset_import.extend(proto.opset_import)
    out.functions.extend(proto.functions)
    g = out.graph
    g.name = graph.name + "-suffix"
    g.node.extend(nodes)
    g.initializer.extend(t for t in graph.initializer if t.name in used)
    for name in suffix.cut:
        value = cut_values[name]
        # the first axis may differ between batches (the last one): a symbol of its own, so no two inputs are
        # claimed equal (a broadcast (1, seq, width) tensor is not batch-sized)
        shape = [f"{name}:0", *value.shape[1:]] if value.ndim else []
        g.input.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), shape))
    by_name = {o.name: o for o in graph.output}
    g.output.extend(by_name[name] for name in outputs)
    return overridable(out, [suffix.weight], in_place=True)


class OutputProbe:
    """One ORT session over fixed input batches; ``run(overrides)`` returns the float outputs.

    ``weight_names`` are the tensors that may be overridden. ``reference`` holds the outputs
    with no override; ``divergence(overrides, metric)`` compares a run against it.

    With ``suffixes``, a run that overrides one weight executes only the nodes downstream of it (``downstream``):
    the reference run also keeps the tensors those nodes read from upstream (at most ``cache_bytes`` of them,
    the weights with the smallest suffixes first), and a small session per weight feeds them back. The outputs
    are the full model's (upstream nodes compute the same values either way), at a fraction of the work:
    about half a ResNet on average over its layers.
    """

    def __init__(self, proto: onnx.ModelProto, weight_names: Iterable[str],
                 batches: Sequence[Mapping[str, np.ndarray]], *, threads: int | None = None,
                 in_place: bool = False, suffixes: bool = False, cache_bytes: int = SUFFIX_CACHE_BYTES) -> None:
        names = list(dict.fromkeys(weight_names))
        self.proto = overridable(proto, names, in_place=in_place)
        self.threads = threads or None
        self.batches = [dict(b) for b in batches]
        floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
        self.output_names = [o.name for o in self.proto.graph.output
                             if o.type.tensor_type.elem_type in floats]
        if not self.output_names:
            raise UsageError("output sensitivity needs at least one floating-point model output")
        plans = [plan for plan in (downstream(self.proto.graph, n) for n in names) if plan is not None] \
            if suffixes else []
        total = len(self.proto.graph.node)
        # a suffix that is (nearly) the whole graph saves nothing over the full session
        plans = [plan for plan in plans if len(plan.nodes) < 0.9 * total]
        inputs = {i.name for i in self.proto.graph.input}
        inner = list(dict.fromkeys(c for plan in plans for c in plan.cut if c not in inputs))
        present = {o.name for o in self.proto.graph.output}
        declared = len(self.proto.graph.output)
        for name in inner:
            if name not in present:
                self.proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        self.session = execution.create_session(self.proto, threads=self.threads,
                                                purpose="run the model to measure output sensitivity")
        del self.proto.graph.output[declared:]  # the session has them; the model (maybe the caller's) does not
        self.runs = 0
        #: weight name -> its suffix, for the weights whose cut tensors are cached
        self.suffixes: dict[str, Suffix] = {}
        #: per batch, the cached cut tensors
        self.cut_values: list[dict[str, np.ndarray]] = [{} for _ in self.batches]
        #: runs that executed only a suffix, and the nodes those runs executed against a full run's
        self.suffix_runs = 0
        self.nodes_run = 0
        #: weight name -> why ONNX Runtime could not run its suffix (it was then measured on the whole model)
        self.suffix_failures: dict[str, str] = {}
        self._total_nodes = total
        self._session_for: tuple[str, Any] | None = None
        self.reference = self._reference(plans, inner, cache_bytes)
        self._reference_logp: list[np.ndarray] | None = None

    def _reference(self, plans: list[Suffix], inner: list[str], cache_bytes: int) -> list[np.ndarray]:
        """The outputs without overrides; on the way, the cut tensors of the suffixes that fit ``cache_bytes``."""
        if plans:
            self._choose(plans, self._bytes_per_sample(inner), cache_bytes)
        wanted = {c for plan in self.suffixes.values() for c in plan.cut}
        fetch = list(self.output_names) + [n for n in inner if n in wanted]
        parts: list[list[np.ndarray]] = [[] for _ in self.output_names]
        for index, batch in enumerate(self.batches):
            got = dict(zip(fetch, self.session.run(fetch, batch)))
            for part, name in zip(parts, self.output_names):
                part.append(np.asarray(got[name]))
            if wanted:
                self.cut_values[index] = {n: np.asarray(v) for n, v in {**got, **batch}.items() if n in wanted}
        self.runs += 1
        self.nodes_run += self._total_nodes
        return [np.concatenate(p, axis=0) if p[0].ndim else np.stack(p) for p in parts]

    def _bytes_per_sample(self, inner: list[str]) -> dict[str, float]:
        """Bytes per sample of each inner tensor, from a one-sample run (the first batch where the model's batch
        is fixed): the cache is sized before any batch's tensors are held."""
        batch = self.batches[0]
        count = len(next(iter(batch.values())))
        one = {k: v[:1] for k, v in batch.items()}
        try:
            got = dict(zip(inner, self.session.run(inner, one))) if inner else {}
            count = 1
        except Exception:  # noqa: BLE001 - a fixed batch size: measure on the whole first batch instead
            got = dict(zip(inner, self.session.run(inner, batch))) if inner else {}
            one = batch
        return {name: np.asarray(value).nbytes / count for name, value in {**got, **one}.items()}

    def _choose(self, plans: list[Suffix], per_sample: Mapping[str, float], cache_bytes: int) -> None:
        """Suffixes to run, smallest first, while their cut tensors (over all samples, each once) fit."""
        samples = sum(len(next(iter(b.values()))) for b in self.batches)
        held: set[str] = set()
        spent = 0.0
        for plan in sorted(plans, key=lambda p: len(p.nodes)):
            extra = [c for c in plan.cut if c not in held]
            cost = samples * sum(per_sample[c] for c in extra)
            if spent + cost > cache_bytes:
                continue
            spent += cost
            held.update(extra)
            self.suffixes[plan.weight] = plan

    def _suffix_session(self, plan: Suffix) -> Any:
        """The session of ``plan``'s suffix (the last one is kept: each layer's widths run one after another)."""
        if self._session_for is None or self._session_for[0] != plan.weight:
            self._session_for = None  # let the previous session go before building the next
            model = suffix_model(self.proto, plan, self.cut_values[0],
                                 [n for n in self.output_names if n in plan.outputs])
            self._session_for = (plan.weight, execution.create_session(
                model, threads=self.threads, purpose="run part of the model to measure output sensitivity"))
        return self._session_for[1]

    def run(self, overrides: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs over all batches (concatenated on the first axis) with ``overrides`` fed as weights."""
        plan = self.suffixes.get(next(iter(overrides))) if len(overrides) == 1 else None
        outputs = None
        if plan is not None:
            try:
                outputs = self._run_suffix(plan, overrides)
            except Exception as err:  # noqa: BLE001 - ORT cannot run the cut graph (a Resize whose sizes came
                # from above the cut loses its shape inference): this weight is measured on the whole model
                self._session_for = None
                del self.suffixes[plan.weight]
                self.suffix_failures[plan.weight] = execution.first_line(err)
        if outputs is None:
            outputs = self._run_full(overrides)
        self.runs += 1
        return outputs

    def _run_full(self, overrides: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = [[] for _ in self.output_names]
        for batch in self.batches:
            feeds = {**batch, **overrides}
            for part, value in zip(parts, self.session.run(self.output_names, feeds)):
                part.append(np.asarray(value))
        self.nodes_run += self._total_nodes
        return [np.concatenate(p, axis=0) if p[0].ndim else np.stack(p) for p in parts]

    def _run_suffix(self, plan: Suffix, overrides: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        session = self._suffix_session(plan)
        computed = [n for n in self.output_names if n in plan.outputs]
        parts: dict[str, list[np.ndarray]] = {n: [] for n in computed}
        for cut in self.cut_values:
            feeds = {name: cut[name] for name in plan.cut}
            for name, value in zip(computed, session.run(computed, {**feeds, **overrides})):
                parts[name].append(np.asarray(value))
        self.suffix_runs += 1
        self.nodes_run += len(plan.nodes)
        # an output the weight does not reach keeps its reference value
        return [(np.concatenate(parts[n], axis=0) if parts[n][0].ndim else np.stack(parts[n])) if n in parts
                else ref for n, ref in zip(self.output_names, self.reference)]

    def divergence(self, overrides: Mapping[str, np.ndarray], metric: str) -> float:
        if metric == "kl" and self._reference_logp is None:  # once, not once per run
            self._reference_logp = [_log_softmax(r) for r in self.reference]
        return divergence(self.reference, self.run(overrides), metric,
                          reference_logp=self._reference_logp if metric == "kl" else None)

    def weight(self, name: str) -> np.ndarray:
        """The stored value of the overridable weight ``name``."""
        for tensor in self.proto.graph.initializer:
            if tensor.name == name:
                return numpy_helper.to_array(tensor)
        raise KeyError(name)


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
    #: runs that executed only the nodes downstream of the weight, and the share of a full run's nodes that
    #: all runs executed on average (1.0 without suffix runs)
    suffix_runs: int = 0
    work: float = 1.0
    #: where the per-layer runs ran (``Executor.spec``) and the reference runs made (one per process that ran)
    executor: str = "serial"
    reference_runs: int = 1


#: the fewest samples a time budget may reduce a measurement to
MIN_SAMPLES = 8


# ----------------------------------------------------------------------
# the per-layer runs as executor tasks
@dataclass(frozen=True)
class ProbeSource:
    """What a process needs to build the ``OutputProbe`` every layer's task measures against: small, sent with
    each task. On this machine (``folder``) the model and batches are files the caller wrote; elsewhere
    (``payload``: model bytes and batches) they travel once per ``map`` in Ray's object store. ``key`` names
    one measurement: a process builds its probe (one reference run) at its first task and reuses it after."""

    key: str
    weights: tuple[str, ...]
    metric: str
    measured: tuple[int, ...]
    threads: int | None
    suffixes: bool
    cache_bytes: int
    folder: str | None = None
    payload: tuple[bytes, tuple[dict[str, np.ndarray], ...]] | None = None

    def load(self) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
        if self.payload is not None:
            data, batches = self.payload
            return onnx.load_from_string(data), [dict(b) for b in batches]
        assert self.folder is not None
        folder = Path(self.folder)
        proto = onnx.load(str(folder / "model.onnx"), load_external_data=True)
        batches = []
        with np.load(folder / "batches.npz", allow_pickle=False) as stored:
            count = len({k.split("/", 1)[0] for k in stored.files})
            for index in range(count):
                prefix = f"{index}/"
                batches.append({k[len(prefix):]: stored[k] for k in stored.files if k.startswith(prefix)})
        return proto, batches


@dataclass(frozen=True)
class LayerScores:
    """One weight's measured widths and what its runs cost (``failure``: why its suffix could not run)."""

    row: dict[int, float]
    suffix_runs: int
    nodes_run: int
    failure: str | None


#: this process's probe: (key, probe); one at a time, replaced when a task of another measurement arrives
_PROBE: tuple[str, OutputProbe] | None = None


def _probe_for(source: ProbeSource) -> OutputProbe:
    global _PROBE
    if _PROBE is None or _PROBE[0] != source.key:
        _PROBE = None  # let the previous measurement's model and cached tensors go first
        proto, batches = source.load()
        _PROBE = (source.key, OutputProbe(proto, source.weights, batches, threads=source.threads, in_place=True,
                                          suffixes=source.suffixes, cache_bytes=source.cache_bytes))
    return _PROBE[1]


def _forget_probe(key: str) -> None:
    global _PROBE
    if _PROBE is not None and _PROBE[0] == key:
        _PROBE = None


def measure_layer(source: ProbeSource, task: tuple[str, int]) -> LayerScores:
    """The divergence of quantizing weight ``task[0]`` (channel axis ``task[1]``) at each measured width: a pure
    function of its inputs, so a worker process or a Ray task returns what the serial loop does."""
    name, axis = task
    probe = _probe_for(source)
    weight = probe.weight(name)
    suffix_runs, nodes_run = probe.suffix_runs, probe.nodes_run
    row = {b: probe.divergence({name: fake_quantize(weight, b, axis)}, source.metric) for b in source.measured}
    return LayerScores(row, probe.suffix_runs - suffix_runs, probe.nodes_run - nodes_run,
                       probe.suffix_failures.get(name))


def output_sensitivity(model: Model, data: Dataset, *, metric: str = "kl", bits: Iterable[int] = TABLE_BITS,
                       samples: int = 64, batch_size: int = 64, threads: int | None = None,
                       progress: Callable[[str], None] | None = None, time_budget: float | None = None,
                       extrapolate: bool = False, min_samples: int = MIN_SAMPLES,
                       suffixes: bool = True, executor: Executor = SERIAL) -> OutputSensitivity:
    """For every quantizable layer and each bit width, the output divergence when only that layer
    is fake-quantized (symmetric, per output channel) and everything else stays float.

    ``time_budget`` (seconds) caps the measuring runs by using fewer samples; ``extrapolate`` measures only
    the lowest widths (all but the highest when there are three or more) and scales the others (see above);
    ``suffixes`` runs only the nodes downstream of each layer (``OutputProbe``): same values, less work.
    ``executor`` runs the layers as tasks (``measure_layer``), one per distinct weight: each worker process
    builds its own probe (one reference run) from the model and batches written once to a temporary folder
    (sent as bytes to a Ray cluster elsewhere), so the scores are the serial loop's whatever runs them. The
    time budget is judged on this process's reference run, the same whatever the executor."""
    if metric not in METRICS:
        raise UsageError(f"unknown output metric {metric!r}; use one of {', '.join(METRICS)}")
    layers = model.layers()
    if not layers:
        return OutputSensitivity({}, metric, 0, 0, {}, executor=executor.spec, reference_runs=0)
    names = {layer.id: layer.weight.name or "" for layer in layers}
    bits = sorted({int(b) for b in bits})
    measured = bits[:-1] if extrapolate and len(bits) >= 3 else bits
    extrapolated = {b: max(m for m in measured if m < b) for b in bits if b not in measured}
    distinct = list(dict.fromkeys(names.values()))
    proto = overridable(model.to_proto(), distinct, in_place=True)
    batches = _batches(model, data, samples, batch_size)
    used = sum(len(next(iter(b.values()))) for b in batches)
    nodes = max(1, len(proto.graph.node))
    reduced = ""
    probe: OutputProbe | None = None
    if executor.workers <= 1 or time_budget is not None:  # workers build their own probes: this one times
        start = time.perf_counter()
        probe = OutputProbe(proto, distinct, batches, threads=threads, in_place=True, suffixes=suffixes)
        reference_s = time.perf_counter() - start
        runs_needed = len(distinct) * len(measured)
        # a suffix run costs about its share of the graph's nodes
        share = float(np.mean([len(probe.suffixes[n].nodes) / nodes if n in probe.suffixes else 1.0
                               for n in distinct]))
        expected = reference_s * runs_needed * share
        if time_budget is not None and expected > time_budget and used > min_samples:
            fewer = max(min_samples, int(used * time_budget / expected))
            if fewer < used:
                reduced = (f"{used} samples would take about {expected:.0f} s for {runs_needed} runs; "
                           f"{fewer} fit the {time_budget:g} s budget")
                batches = _batches(model, data, fewer, batch_size)
                probe = None  # its cached tensors go before the next probe's come
                probe = OutputProbe(proto, distinct, batches, threads=threads, in_place=True, suffixes=suffixes)
                used = sum(len(next(iter(b.values()))) for b in batches)
        if executor.workers > 1:
            probe = None  # the workers' probes measure; this one only timed the reference run
    del proto
    first = {name: next(layer for layer in layers if names[layer.id] == name) for name in distinct}
    tasks = [(name, layer_channel_axis(first[name])) for name in distinct]
    source = ProbeSource(uuid.uuid4().hex, tuple(distinct), metric, tuple(measured), threads, suffixes,
                         SUFFIX_CACHE_BYTES)
    per_weight = {name: [layer for layer in layers if names[layer.id] == name] for name in distinct}
    # a counted task (a bar with an ETA on a terminal) when the caller's reporter has tasks, else plain messages
    task = progress.task(f"sensitivity (output-{metric})", total=len(layers), unit="layer") \
        if isinstance(progress, Reporter) else None
    done = [0]

    def advance(index: int, _result: LayerScores) -> None:
        for layer in per_weight[tasks[index][0]]:
            done[0] += 1
            if task is not None:
                task.advance()
            elif progress is not None:
                progress(f"output-{metric}: layer {done[0]}/{len(layers)} {layer.id}")

    with task if task is not None else contextlib.nullcontext():
        if executor.workers <= 1:  # this process's probe serves every task, here
            global _PROBE
            assert probe is not None
            _PROBE = (source.key, probe)
            try:
                scores = SERIAL.map(measure_layer, source, tasks, on_result=advance)
            finally:
                _forget_probe(source.key)
            reference_runs = 1
        else:
            scores, reference_runs = _measure_elsewhere(model, batches, source, tasks, executor, advance, threads)
    del probe
    table: dict[str, dict[int, float]] = {}
    shared: dict[str, str] = {}
    by_name = dict(zip(distinct, scores))
    for layer in layers:
        name = names[layer.id]
        owner = first[name].id
        if owner != layer.id:
            shared[layer.id] = owner
        row = dict(by_name[name].row)
        weight, axis = first[name].weight_array, layer_channel_axis(first[name])
        for b, source_bits in extrapolated.items():
            base = quantization_error(weight, source_bits, axis)
            row[b] = row[source_bits] * quantization_error(weight, b, axis) / base if base > 0 else 0.0
        table[layer.id] = {b: row[b] for b in bits}
    runs = reference_runs + len(distinct) * len(measured)
    nodes_run = reference_runs * nodes + sum(s.nodes_run for s in scores)
    work = nodes_run / (runs * nodes)
    return OutputSensitivity(table, metric, used, runs, shared, extrapolated, reduced,
                             sum(s.suffix_runs for s in scores), round(work, 3), executor.spec, reference_runs)


def _measure_elsewhere(model: Model, batches: Sequence[Mapping[str, np.ndarray]], source: ProbeSource,
                       tasks: list[tuple[str, int]], executor: Executor, on_result: Callable[[int, Any], None],
                       threads: int | None) -> tuple[list[LayerScores], int]:
    """The tasks on ``executor``'s workers: the model and batches written once to a temporary folder they read
    (bytes in the object store for a remote Ray cluster); ORT threads split between the workers."""
    from bitpass.frontend.cpu import host

    per_worker = threads or max(1, host().cores // executor.workers)
    source = replace(source, threads=per_worker)
    with tempfile.TemporaryDirectory(prefix="bitpass-sensitivity-") as folder:
        if executor.local:
            model.save_external(Path(folder) / "model.onnx")
            np.savez(Path(folder) / "batches.npz",
                     **{f"{i}/{k}": np.asarray(v) for i, b in enumerate(batches) for k, v in b.items()})
            source = replace(source, folder=folder)
        else:
            proto = model.to_proto()
            if proto.ByteSize() >= 2**31 - 1:
                raise UsageError("output sensitivity on a remote Ray cluster sends the model as one protobuf, "
                                 "which is limited to 2 GB: run it with --executor local (or ray on this "
                                 "machine)")
            source = replace(source, payload=(proto.SerializeToString(), tuple(dict(b) for b in batches)))
            del proto
        scores = executor.map(measure_layer, source, tasks, on_result=on_result)
    return scores, min(executor.workers, len(tasks))
