"""Whole-graph format search: the int8 flavour and the repairs of a plan, chosen by timing whole artifacts.

Per-layer timings miss what happens between layers: the Quantize/Dequantize pairs at every border
between int8 and float layers, layout changes (ORT runs int8 convolutions in NHWC), fusions that
only fire when both neighbours are int8. And no int8 flavour is fastest everywhere: U8S8 is 3-4x
faster than fp32 on ResNets with VNNI and saturates without it; on depthwise convolutions every
flavour loses to fp32. So after the plan is made (by allocation, or the default 8/8 everywhere),
``search`` builds complete candidate artifacts and times them against fp32 on the target, in a
fresh process, at batch 1 and a larger batch:

1. the plan in each int8 flavour (U8S8, S8S8; U8S8 with 7-bit weights when U8S8 is not exact),
   each checked numerically on calibration samples against fp32 (saturation shows as error, so a
   flavour whose error is well above the best one's is not eligible, whatever its speed); and, when
   most int8 layers are MatMul/Gemm (a transformer), those layers in dynamic int8;
2. repairs of the fastest: layers whose one-layer timing says their compute format is no faster
   than fp32 fall back (fp32, or packed at their planned width when an allocation set the width);
   MatMul/Gemm layers whose dynamic int8 is faster than their QDQ switch to it; and the opposite for a
   size plan, ``merged``: the plan computing int8 wherever the int8 artifact does, at the plan's
   storage widths (packed Conv/MatMul/Gemm layers on their widened codes, fp32 ones the allocation
   bought at 8 bits unless the user kept them fp32; the plan's bytes or fewer; QDQ, with MatMul/Gemm
   in dynamic int8 when most layers are MatMul/Gemm). One-layer
   timings, which pay a Quantize and a Dequantize per layer, choose packed or fp32 where the whole
   graph in int8 is faster (a 4-bit ResNet-50 was left at 0.4-0.6x, later 0.94-0.95x, the int8
   artifact's speed). When ONNX Runtime's session graph of ``merged`` (its optimized model after
   constant folding and QDQ fusion, compared by structure: ``session_signature``) is that of the same
   plan with plain int8 weights, it runs the same kernels on the same shapes as the int8 model, so it
   is as fast by construction and becomes the incumbent: the plan as made and the slow-layer and
   dynamic repairs (taken from ``merged``) are deviations that must beat it with confidence. When the
   graphs differ (the widening was not folded), ``merged`` is one more challenger of the plan. A size plan whose
   one-layer timings chose no int8 compute at all (every layer packed: ``merge_packed``) gets this step alone: its
   ``merged`` twin in each flavour against the plan itself;
3. then the winner without its isolated compute layers (no compute-format neighbour: they pay a
   Quantize and a Dequantize for one layer's gain).

Every round times the candidates against fp32 and the current best, alternating, in one fresh
process; each round of the timer gives one *paired* ratio (incumbent seconds / challenger seconds in
the same round), which cancels the drift of a shared machine but not its noise: a 0.3 ms model's
rounds scatter by 2x under load. So a challenger replaces the incumbent (fp32 first: the all-fallback
plan) only when it is faster with confidence (``faster_with_confidence``): at *every* batch size the
lower quartile of its paired ratios is above 1 (faster in at least three rounds of four), and the
geometric mean of the medians over the batches is at least ``1 + MIN_GAIN``. A win is taken at once
when every lower quartile is above ``CLEAR_WIN`` (ResNet's U8S8: about 3x); a narrower one, or one
where the medians say faster but a lower quartile does not, is timed again in a fresh process with
``CONFIRM_ROUNDS`` longer rounds, and wins only if that timing alone and the pooled rounds both say
faster; otherwise the incumbent stays. A challenger at most half
the incumbent's bytes (int8 against the fp32 fallback: a 4x smaller artifact) needs less: to be *not slower*
(``not_slower_with_confidence``: every batch's median at least ``1 - TIE``, confirmed by a longer timing
when a median is below 1 or a lower quartile far below), because a user asked for a small artifact and a
tie in speed should not cost them 4x the bytes. The all-fallback plan
is always a candidate, so the result is never slower than fp32 (beyond ``TIE``) or than the plan in its
fastest flavour, as measured. The choice is cached per model, plan, ranges, options and CPU, so the same inputs give
the same artifact (bitpass's determinism) without timing again.

Memory: a candidate is built, written to a temporary folder (weights as external data) and dropped; the error
check and the timing process load it by path, and the winner is read back from its file (the same bytes). A
BERT-base search held every candidate's serialized bytes and the fp32 bytes at once before (gigabytes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bitpass.frontend import Dataset, Model, from_proto
from bitpass.frontend.cache import cache_dir
from bitpass.frontend.cpu import host
from bitpass.frontend.errors import BitpassError
from bitpass.passes import execution
from bitpass.passes.allocation import formats
from bitpass.passes.analyses import ActivationRanges
from bitpass.passes.int8_flavours import FLAVOURS, S8S8, U8S8, U8S8_REDUCED, Flavour, to_uint8_activations
from bitpass.passes.materialize import (DYNAMIC, FP32, INT8_QDQ, PACKED, WIDENED_OPS, LayerPlan, QuantizeOptions,
                                        decide, materialize)

#: a challenger must be this much faster (geometric mean over batches of its median paired ratios) to replace the
#: incumbent, besides being faster than it in at least three rounds of four at every batch (see the module doc)
MIN_GAIN = 0.05
#: which quantile of the paired ratios must be above 1: the lower quartile
CONFIDENCE_QUANTILE = 25.0
#: an unsure challenger and its incumbent are timed again: this many rounds of at least CONFIRM_SECONDS each
#: per model, at most CONFIRM_BUDGET seconds per batch after the first three rounds
CONFIRM_ROUNDS, CONFIRM_SECONDS, CONFIRM_BUDGET = 21, 0.05, 10.0
#: a win whose lower quartile is above this at every batch is clear at once; a narrower one is confirmed
CLEAR_WIN = 1.25
#: a challenger at most SMALLER of the incumbent's bytes replaces it when not slower: every batch's median paired
#: ratio at least 1 - TIE; sure at once when also every median is at least 1 and every lower quartile at least
#: 1 - TIE_SPREAD, else timed again longer
SMALLER, TIE, TIE_SPREAD = 0.5, 0.03, 0.10
#: a flavour is eligible when its output error is at most this many times the best flavour's (plus EPSILON)
ERROR_FACTOR, ERROR_EPSILON = 2.0, 1e-4
#: calibration samples the error check runs on
CHECK_SAMPLES = 32
#: bump when the search changes, so cached choices are searched again
SEARCH_VERSION = 9


class Timings(Protocol):
    """Whole models timed against each other. A timer that measures (``timing.Group``) also has ``samples``:
    name -> batch -> seconds per call in each round, so that ratios can be paired round by round; without it
    ``ratio`` is taken as exact (a cost model)."""

    errors: Mapping[str, str]

    def ratio(self, name: str, reference: str, batch: int) -> float | None: ...


class GraphTimer(Protocol):
    """What the target supplies: whole models timed against each other at each batch of ``feeds``;
    ``rounds``/``min_seconds``/``budget_seconds``, when given, ask for a longer timing (a confirmation);
    ``disabled_optimizers`` (name -> ORT optimizer names) times a model with those optimizers off (a timer that
    cannot, a cost model, ignores it and times both alike, so nothing is turned off); ``cached=True`` lets it answer
    from rounds it timed before for the same models, feeds and options on this CPU (one that keeps none ignores
    it). The
    search hands it ONNX files (weights as external data beside them), never serialized bytes: a BERT-base
    candidate set held as bytes cost gigabytes in the compiling process."""

    def graphs(self, models: Mapping[str, Path], feeds: Mapping[int, Mapping[str, np.ndarray]],
               **longer: Any) -> Timings: ...


def paired_ratios(timed: Timings, name: str, reference: str, batch: int) -> list[float]:
    """``reference``'s seconds / ``name``'s in each round at ``batch`` (> 1: ``name`` is faster), or the one
    exact ratio of a timer without per-round samples; empty when either was not timed."""
    samples = getattr(timed, "samples", None)
    if isinstance(samples, Mapping):
        mine, theirs = samples.get(name, {}).get(batch), samples.get(reference, {}).get(batch)
        if not mine or not theirs:
            return []
        return [float(t / m) for t, m in zip(theirs, mine) if m > 0]
    ratio = timed.ratio(name, reference, batch)
    return [] if ratio is None else [float(ratio)]


@dataclass(frozen=True)
class Verdict:
    """Whether a challenger is faster than its incumbent: True (with confidence), False, or None (the medians
    say faster but the spread does not: time again). ``median``/``low``: per batch, of the paired ratios."""

    faster: bool | None
    median: dict[int, float]
    low: dict[int, float]
    why: str

    def record(self) -> dict[str, Any]:
        return {"faster": self.faster, "why": self.why,
                "median": {str(b): round(v, 3) for b, v in sorted(self.median.items())},
                "lower_quartile": {str(b): round(v, 3) for b, v in sorted(self.low.items())}}


def faster_with_confidence(ratios: Mapping[int, Sequence[float]], min_gain: float = MIN_GAIN,
                           clear: float = CLEAR_WIN) -> Verdict:
    """The decision rule of the search (see the module doc), on the paired ratios incumbent seconds /
    challenger seconds of each round, per batch. Faster: at every batch the lower quartile is above ``clear``
    and the geometric mean of the medians over the batches is at least ``1 + min_gain``. Not faster: some
    batch's median is at most 1, or the gain is short of ``min_gain``. Otherwise unsure (None): a lower
    quartile at or below 1, or a win narrower than ``clear`` (one timing of a sub-millisecond model on a busy
    machine can show one; a second timing must agree)."""
    if not ratios or any(len(r) == 0 for r in ratios.values()):
        return Verdict(False, {}, {}, "not timed at every batch")
    median = {b: float(np.median(r)) for b, r in ratios.items()}
    low = {b: float(np.percentile(r, CONFIDENCE_QUANTILE)) for b, r in ratios.items()}
    gain = math.exp(sum(math.log(max(m, 1e-9)) for m in median.values()) / len(median))
    slower = sorted(b for b, m in median.items() if m <= 1.0)
    if slower:
        return Verdict(False, median, low, f"not faster at batch {', '.join(map(str, slower))} "
                                           f"(median {', '.join(f'{median[b]:.2f}x' for b in slower)})")
    if gain < 1.0 + min_gain:
        return Verdict(False, median, low, f"{gain:.2f}x overall, short of the {1 + min_gain:.2f}x needed")
    unsure = sorted(b for b, v in low.items() if v <= 1.0)
    if unsure:
        return Verdict(None, median, low, f"{gain:.2f}x overall, but slower in more than a quarter of the rounds "
                                          f"at batch {', '.join(map(str, unsure))}")
    narrow = sorted(b for b, v in low.items() if v <= clear)
    if narrow:
        return Verdict(None, median, low, f"{gain:.2f}x overall, faster in at least 3 rounds of 4 at every batch, "
                                          f"but by less than {clear:.2f}x at batch {', '.join(map(str, narrow))}")
    return Verdict(True, median, low, f"{gain:.2f}x overall, faster in at least 3 rounds of 4 at every batch")


def not_slower_with_confidence(ratios: Mapping[int, Sequence[float]], tie: float = TIE,
                               spread: float = TIE_SPREAD, confirmed: bool = False) -> Verdict:
    """The rule for a much smaller challenger (see the module doc): not slower when every batch's median paired
    ratio is at least ``1 - tie``. Sure at once when every median is at least 1 and every lower quartile at least
    ``1 - spread``; otherwise unsure (None) until ``confirmed`` (the ratios pool a longer second timing)."""
    if not ratios or any(len(r) == 0 for r in ratios.values()):
        return Verdict(False, {}, {}, "not timed at every batch")
    median = {b: float(np.median(r)) for b, r in ratios.items()}
    low = {b: float(np.percentile(r, CONFIDENCE_QUANTILE)) for b, r in ratios.items()}
    slower = sorted(b for b, m in median.items() if m < 1.0 - tie)
    if slower:
        return Verdict(False, median, low, f"smaller, but slower at batch {', '.join(map(str, slower))} "
                                           f"(median {', '.join(f'{median[b]:.2f}x' for b in slower)}, "
                                           f"{1 - tie:.2f}x allowed)")
    ratio_text = ", ".join(f"{median[b]:.2f}x at batch {b}" for b in sorted(median))
    if not confirmed and (min(median.values()) < 1.0 or min(low.values()) < 1.0 - spread):
        return Verdict(None, median, low, f"smaller and about as fast ({ratio_text}), but close or scattered")
    return Verdict(True, median, low, f"smaller and not slower ({ratio_text}; {1 - tie:.2f}x allowed)")


@dataclass
class Candidate:
    name: str
    plan: dict[str, LayerPlan]
    flavour: Flavour
    why: str
    #: the built candidate on disk (weights as external data beside it): what is checked and timed; the
    #: ``Model`` itself is not kept (the winner is read back from here)
    path: Path | None = None
    #: the built model's provenance (what a model read back from ``path`` carries)
    provenance: Any = None
    error: float | None = None
    #: batch -> fp32 seconds / candidate seconds (> 1: faster), from the round it was timed in
    speedup: dict[int, float] = field(default_factory=dict)
    eligible: bool = True
    #: the saved model's size, its external data included (what "smaller" compares)
    nbytes: int = 0

    def score(self) -> float:
        """Geometric mean over the batches of candidate time / fp32 time (lower is faster)."""
        if not self.speedup:
            return math.inf
        return math.exp(-sum(math.log(max(r, 1e-9)) for r in self.speedup.values()) / len(self.speedup))

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "flavour": self.flavour.name, "why": self.why,
                               "speedup": {str(b): round(r, 3) for b, r in sorted(self.speedup.items())}}
        if self.error is not None:
            out["relative_error"] = float(f"{self.error:.4g}")
        if not self.eligible:
            out["eligible"] = False
        return out


@dataclass
class SearchResult:
    model: Model
    flavour: Flavour
    plan: dict[str, LayerPlan]
    record: dict[str, Any]


_FORMAT_OF_RESULT = {FP32: None, INT8_QDQ: "qdq", DYNAMIC: "dynamic", PACKED: PACKED,
                     formats.MATMUL_NBITS: formats.MATMUL_NBITS, formats.BLOCKED_DQ: formats.BLOCKED_DQ}


def plan_of(model: Model) -> dict[str, LayerPlan]:
    """The plan the layers' annotations describe (what ``materialize`` would do without a plan)."""
    return {d.layer_id: LayerPlan(d.weight_bits, d.activation_bits, _FORMAT_OF_RESULT[d.result], d.block_size)
            for d in decide(model)}


def compute_layers(plan: Mapping[str, LayerPlan]) -> list[str]:
    """Layers whose plan runs int8 compute (QDQ or dynamic): what flavours and repairs act on."""
    return [lid for lid, p in plan.items() if p.weight_bits < 32 and p.format in ("qdq", "dynamic")]


def fallback_plan(entry: LayerPlan, fallback: str) -> LayerPlan:
    """What a compute layer becomes when int8 does not pay: fp32, or packed at its width (keeps the bytes)."""
    if fallback == PACKED and entry.weight_bits < 32:
        return LayerPlan.packed(entry.weight_bits)
    return LayerPlan(32, 32)


def merged_plan(model: Model, plan: Mapping[str, LayerPlan], keep_fp32: Collection[str] = ()) -> dict[str, LayerPlan]:
    """``plan`` computing int8 wherever the int8 artifact does, at the plan's storage widths (its bytes or fewer):
    packed Conv/MatMul/Gemm layers on their widened codes, and fp32 ones at 8 bits (an allocation buys fp32 for
    small layers to shave a little loss, which costs two Q/DQ borders each), except ``keep_fp32`` (the user's).
    Conv layers compute in QDQ; MatMul/Gemm layers in QDQ too, or in dynamic int8 in a transformer-like model
    (most layers MatMul/Gemm), where dynamic int8 is what ORT users run."""
    ops = {layer.id: layer.op_type for layer in model.layers()}
    dense = [lid for lid in plan if ops.get(lid) in ("MatMul", "Gemm")]
    quantizable = [lid for lid in plan if ops.get(lid) in WIDENED_OPS]
    dense_format = "dynamic" if len(dense) >= 2 and 2 * len(dense) >= len(quantizable) else "qdq"
    out = {}
    for lid, p in plan.items():
        op = ops.get(lid)
        fmt = dense_format if op in ("MatMul", "Gemm") else "qdq"
        if op not in WIDENED_OPS or lid in keep_fp32 or (p.format == fmt and p.weight_bits < 32):
            out[lid] = p
        elif p.weight_bits >= 32:
            out[lid] = LayerPlan(8, 8, fmt)
        elif p.format in (PACKED, "qdq", "dynamic"):
            out[lid] = LayerPlan(p.weight_bits, 8, fmt, p.block_size)
        else:  # MatMulNBits / blocked DQ: a weight-only format the int8 artifact has no twin of
            out[lid] = p
    return out


def int8_twin(plan: Mapping[str, LayerPlan]) -> dict[str, LayerPlan]:
    """``plan`` with every low-bit int8-compute layer at 8 bits: what the same graph is with plain int8 weights."""
    return {lid: (LayerPlan(8, 8, p.format, None) if p.format in ("qdq", "dynamic") and p.weight_bits < 8 else p)
            for lid, p in plan.items()}


#: past this many bytes of model file and external data, ONNX Runtime writes its optimized graph in a child process:
#: the session it builds holds its own copy of the weights, which the compiling process would keep (a 709 M GPT-2's
#: fusion check took the compile from 3.8 to 6.4 GB; ORT does not hand a dropped session's memory back)
OPTIMIZED_GRAPH_IN_CHILD_BYTES = 512 << 20


def optimized_graph(path: Path, folder: Path, disabled_optimizers: Sequence[str] = ()) -> Any:
    """The ``GraphProto`` ONNX Runtime runs for the model at ``path`` (its optimized graph after load), weights left
    out; written into ``folder`` and removed. A model over ``OPTIMIZED_GRAPH_IN_CHILD_BYTES`` is loaded by a child
    process. Raises what ONNX Runtime raises."""
    import onnx

    out = folder / f"{path.stem}.session.onnx"
    weights = folder / f"{path.stem}.session.weights"
    job = (str(path), str(out), weights.name, list(disabled_optimizers))
    try:
        data = path.with_name(path.name + ".data")
        size = path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
        if size > OPTIMIZED_GRAPH_IN_CHILD_BYTES:
            from bitpass.passes.executors import ProcessExecutor

            with ProcessExecutor(1) as child:
                child.map(_write_optimized_graph, None, [job])
        else:
            _write_optimized_graph(None, job)
        return onnx.load(str(out), load_external_data=False).graph
    finally:
        for leftover in (out, weights):
            leftover.unlink(missing_ok=True)


def _write_optimized_graph(_shared: None, job: tuple[str, str, str, list[str]]) -> None:
    """Have ONNX Runtime load a model and write the graph it optimized (its weights in a file beside it)."""
    import onnxruntime as ort

    path, out, weights_name, disabled = job
    options = execution.session_options({"disabled_optimizers": disabled}, threads=1)
    options.optimized_model_filepath = out
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights_name)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    # the session never runs: no kernel-layout copy of the weights (the graph written is the same; measured on
    # GPT-2-medium: this process peaked at 1.70 GB with pre-packing, 0.35 GB without)
    options.add_session_config_entry("session.disable_prepacking", "1")
    ort.InferenceSession(path, options, providers=execution.PROVIDERS)


def session_signature(path: Path, folder: Path, disabled_optimizers: Sequence[str] = ()) -> str | None:
    """A digest of the graph ONNX Runtime runs for the model at ``path``: its optimized graph after load (constant
    folding, QDQ fusion, layout), by structure only: op types, domains, attributes, wiring, and initializers' types
    and shapes; not names, not values. Two models with the same digest run the same kernels on the same shapes,
    so their speed is the same by construction. ``disabled_optimizers``: ORT optimizers the session turns off
    (what an artifact's session.json says). None when ONNX Runtime cannot load the model."""
    try:
        graph = optimized_graph(path, folder, disabled_optimizers)
    except Exception:  # noqa: BLE001 - ORT's own error types: nothing is known about its graph
        return None
    return graph_signature(graph)


def graph_signature(graph: Any) -> str:
    """A structural digest of an ONNX ``GraphProto`` (see ``session_signature``): every value is named by what
    computes it (a Merkle hash over its producers), so node order and tensor names do not matter."""
    def digest(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def attribute(a: Any) -> Any:
        import onnx

        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, onnx.TensorProto):
            return ["tensor", value.data_type, list(value.dims)]
        if isinstance(value, onnx.GraphProto):
            return ["graph", graph_signature(value)]
        if isinstance(value, bytes):
            return value.decode(errors="replace")
        if isinstance(value, list):
            return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in value]
        return value

    values: dict[str, str] = {"": ""}
    for tensor in graph.initializer:
        values[tensor.name] = digest("initializer", tensor.data_type, list(tensor.dims))
    for value in graph.input:
        values.setdefault(value.name, digest("input", value.name))
    pending, nodes = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in values for i in n.input)]
        if not ready:  # an input from outside the graph (a subgraph's outer scope): named by itself
            for n in pending:
                for i in n.input:
                    values.setdefault(i, digest("outer", i))
            continue
        for node in ready:
            key = digest(node.domain, node.op_type, sorted((a.name, attribute(a)) for a in node.attribute),
                         [values[i] for i in node.input])
            nodes.append(key)
            for index, name in enumerate(node.output):
                values[name] = digest(key, index)
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    return digest(sorted(nodes), [values.get(o.name, o.name) for o in graph.output])


def search(model: Model, *, ranges: ActivationRanges | None, calibration: Dataset, options: QuantizeOptions,
           timer: GraphTimer, layer_times: Callable[[Mapping[str, Sequence[tuple[int, str]]]], Mapping] | None = None,
           fallback: str = FP32, batches: Sequence[int] = (1, 8), use_cache: bool = True,
           progress: Callable[[str], None] | None = None, keep_fp32: Collection[str] = (),
           merge_packed: bool = False) -> SearchResult:
    """The fastest eligible materialization of ``model``'s annotated plan on the target (see the module doc).

    ``layer_times(variants)`` returns the per-layer latency table (the probe, or the allocation's cached one)
    for the repairs; without it only flavours and isolated layers are searched. ``keep_fp32``: layers the user
    kept fp32, which the merged candidate of a size plan leaves fp32. ``merge_packed``: a size plan whose
    allocation chose its formats by timing (not ``formats=packed``): when it has no int8 compute layer at all,
    its ``merged`` twin is still timed against it (one-layer timings, which pay a Quantize and a Dequantize per
    layer, left every layer of a 4-bit ResNet-18 packed at fp32 speed where the whole graph in U8S8 ran 1.6-2.9x
    fp32)."""
    say = progress or (lambda _m: None)
    plan = plan_of(model)
    compute = compute_layers(plan)
    flavours = _flavours(options)
    merged_only = not compute and merge_packed and fallback == PACKED and ranges is not None \
        and bool(compute_layers(merged_plan(model, plan, keep_fp32)))
    if not compute and not merged_only:  # an all-packed plan (``formats=packed``) is what was asked for
        built = materialize_in(model, plan, flavours[-1], ranges, calibration, options)
        return SearchResult(built, flavours[-1], plan, {"note": "no int8 compute layers: nothing to search"})
    if calibration.fixed_batch:
        batches = (calibration.fixed_batch,)
    # every model the search checks or times lives on disk here, weights as external data (see GraphTimer)
    with tempfile.TemporaryDirectory(prefix="bitpass-search-") as tmp:
        folder = Path(tmp)
        fp32_path = folder / "fp32.onnx"
        fp32_nbytes = model.save_external(fp32_path)
        key = _cache_key(fp32_path, plan, ranges, options, fallback + ("+merged" if merged_only else ""), batches,
                         keep_fp32) if use_cache else None
        cached = _cached(key)
        if cached is not None:
            chosen_plan = {lid: LayerPlan(**p) for lid, p in cached["plan"].items()}
            flavour = FLAVOURS.get(cached["flavour"], S8S8)
            say(f"format search: the choice made for this model on this CPU before ({cached['record']['chosen']})")
            built = _as_written(materialize_in(model, chosen_plan, flavour, ranges, calibration, options),
                                folder, model)
            set_disabled_optimizers(built, cached["record"].get("disabled_optimizers", []))
            return SearchResult(built, flavour, chosen_plan,
                                {**cached["record"], "cached": True, "plan": plan_record(chosen_plan)})
        found = _search_cold(model, plan, compute, flavours, ranges=ranges, calibration=calibration,
                             options=options, timer=timer, layer_times=layer_times, fallback=fallback,
                             batches=batches, say=say, key=key, folder=folder, fp32_path=fp32_path,
                             fp32_nbytes=fp32_nbytes, keep_fp32=frozenset(keep_fp32), merged_only=merged_only)
        found.record["plan"] = plan_record(found.plan)
        return found


def _search_cold(model: Model, plan: dict[str, LayerPlan], compute: list[str], flavours: list[Flavour], *,
                 ranges: ActivationRanges | None, calibration: Dataset, options: QuantizeOptions, timer: GraphTimer,
                 layer_times: Callable[[Mapping[str, Sequence[tuple[int, str]]]], Mapping] | None, fallback: str,
                 batches: Sequence[int], say: Callable[[str], None], key: str | None, folder: Path,
                 fp32_path: Path, fp32_nbytes: int, keep_fp32: Collection[str] = (),
                 merged_only: bool = False) -> SearchResult:
    """The search itself (no cached choice): candidates are built one at a time, each written to ``folder`` and
    dropped from memory; only their files, plans and measurements are kept, and the winner is read back.
    ``merged_only``: a plan without int8 compute layers, whose first round is its ``merged`` twin in each flavour
    against the plan itself (the fallback), with no per-layer repairs."""
    check = calibration.head(CHECK_SAMPLES)
    reference = _outputs(fp32_path, check)
    feeds = {b: calibration.batch_of(b) for b in batches}
    rounds: list[dict[str, Any]] = []
    s8_models: dict[str, Model] = {}
    built_count = [0]

    def build(c: Candidate) -> Candidate:
        built_count[0] += 1  # names can repeat (a repair may be called as a first-round candidate): files do not
        return build_candidate(model, c, folder / f"candidate{built_count[0]}.onnx", ranges=ranges,
                               calibration=calibration, options=options, check=check, reference=reference,
                               built_s8=s8_models)

    def name_of(c: Candidate) -> str:
        """What ``c`` is called in the timings: the untimed all-fp32 fallback is the fp32 reference itself."""
        return "fp32" if c is fallback_all and not fallback_timed else c.name

    def time_round(cands: list[Candidate], incumbent: Candidate | None) -> Timings:
        models = {"fp32": fp32_path}
        for c in [*cands, *([incumbent] if incumbent is not None else [])]:
            if name_of(c) == "fp32":
                continue
            assert c.path is not None
            models[c.name] = c.path
        say(f"format search: timing {', '.join(n for n in models if n != 'fp32')} against fp32 at batch "
            f"{', '.join(map(str, batches))}")
        timed = timer.graphs(models, feeds)
        for c in [*cands, *([incumbent] if incumbent is not None else [])]:
            if name_of(c) == "fp32":
                continue
            speed = {b: timed.ratio(c.name, "fp32", b) for b in batches}
            if c.name in timed.errors or any(r is None for r in speed.values()):
                c.eligible, c.speedup = False, {}
                c.why += f"; did not run ({timed.errors.get(c.name, 'no timing')})"
            else:
                c.speedup = {b: float(r) for b, r in speed.items() if r is not None}
        rounds.append({"candidates": [c.record() for c in cands],
                       **({"against": incumbent.record()} if incumbent is not None else {})})
        return timed

    def confirm(c: Candidate, incumbent: Candidate, first: Mapping[int, list[float]]) -> Verdict:
        """Time an unsure challenger against its incumbent again, longer: faster only if that timing alone and
        the rounds of both timings pooled each say faster (lower quartiles above 1)."""
        theirs = name_of(incumbent)
        assert c.path is not None and (theirs == "fp32" or incumbent.path is not None)
        models = {theirs: fp32_path if theirs == "fp32" else incumbent.path, c.name: c.path}
        say(f"format search: {c.name} against {theirs} is unsure: timing both again, longer")
        started = time.perf_counter()
        again = timer.graphs(models, feeds, rounds=CONFIRM_ROUNDS, min_seconds=CONFIRM_SECONDS,
                             budget_seconds=CONFIRM_BUDGET)
        spent = f"; the longer timing took {time.perf_counter() - started:.1f} s"
        if c.name in again.errors or theirs in again.errors:
            return Verdict(False, {}, {}, "the confirmation did not run" + spent)
        second = {b: paired_ratios(again, c.name, theirs, b) for b in batches}
        pooled = {b: [*first[b], *second[b]] for b in batches}
        if much_smaller(c, incumbent):
            verdict = not_slower_with_confidence(pooled, confirmed=True)
            alone = not_slower_with_confidence(second, confirmed=True)
        else:
            verdict, alone = faster_with_confidence(pooled, clear=1.0), faster_with_confidence(second, clear=1.0)
        if verdict.faster and not alone.faster:
            verdict = replace(verdict, faster=None, why=f"pooled: {verdict.why}; the longer timing alone: {alone.why}")
        if verdict.faster is None:
            verdict = replace(verdict, faster=False, why=verdict.why + "; still unsure after a longer timing")
        return replace(verdict, why=verdict.why + f" ({min(len(r) for r in pooled.values())} rounds pooled{spent})")

    def much_smaller(c: Candidate, incumbent: Candidate) -> bool:
        """Whether ``c`` is at most SMALLER of ``incumbent``'s bytes (int8 against fp32), so a tie is enough."""
        return 0 < c.nbytes <= SMALLER * (incumbent.nbytes or fp32_nbytes)

    def challenge(challengers: list[Candidate], incumbent: Candidate, timed: Timings) -> Candidate:
        """The fastest challenger (by median) that beats ``incumbent`` with confidence, else ``incumbent``."""
        decisions = rounds[-1].setdefault("decisions", [])
        for c in sorted((c for c in challengers if c.eligible and c.speedup), key=lambda c: c.score()):
            ratios = {b: paired_ratios(timed, c.name, name_of(incumbent), b) for b in batches}
            verdict = (not_slower_with_confidence if much_smaller(c, incumbent) else faster_with_confidence)(ratios)
            if verdict.faster is None:
                verdict = confirm(c, incumbent, ratios)
            decisions.append({"challenger": c.name, "incumbent": incumbent.name, **verdict.record()})
            if verdict.faster:
                return c
        return incumbent

    # 1. the plan in each flavour (or, ``merged_only``, its merged twin), and the all-fallback plan (fp32 speed)
    first_plan, prefix, first_why = dict(plan), "plan", "the plan as made"
    if merged_only:
        first_plan, prefix = merged_plan(model, plan, keep_fp32), "merged"
        changed_first = {lid: _describe(plan[lid]) for lid, p in first_plan.items() if p != plan[lid]}
        first_why = (f"{len(changed_first)} layer(s) computing in int8 (low-bit codes widened at load), where the "
                     f"one-layer timings chose none: {_short(changed_first)}")
    first = [build(Candidate(f"{prefix}-{f.name}", dict(first_plan), f, first_why)) for f in flavours]
    _eligibility(first)
    if U8S8 in flavours and not next(c for c in first if c.flavour == U8S8).eligible:
        say("format search: U8S8 is not exact on this CPU; trying it with 7-bit weights")
        first.append(build(Candidate(f"{prefix}-{U8S8_REDUCED.name}", dict(first_plan), U8S8_REDUCED, first_why)))
        _eligibility(first)
    ops = {layer.id: layer.op_type for layer in model.layers()}
    dense = [lid for lid in compute if ops.get(lid) in ("MatMul", "Gemm") and plan[lid].format == "qdq"]
    if len(dense) >= 2 and 2 * len(dense) >= len(compute):  # transformer-like: what ORT users run for BERT
        as_dynamic = {lid: (LayerPlan(p.weight_bits, 8, "dynamic", p.block_size) if lid in dense else p)
                      for lid, p in plan.items()}
        first.append(build(Candidate(f"dynamic-{flavours[0].name}", as_dynamic, flavours[0],
                                     "MatMul/Gemm layers in dynamic int8")))
        _eligibility(first)
    s8_models.clear()  # the S8 build U8S8 was made from: no later candidate has the same plan
    everything_back = {lid: (fallback_plan(p, fallback) if lid in compute else p) for lid, p in plan.items()}
    fallback_all = Candidate("fallback", everything_back, flavours[0],
                             f"every int8 compute layer {'packed' if fallback == PACKED else 'fp32'}")
    fallback_timed = fallback == PACKED or any(p.weight_bits < 32 for lid, p in everything_back.items()
                                               if lid not in compute)
    if fallback_timed:  # else it is the fp32 reference itself, built only if it is chosen
        build(fallback_all)
        timed = time_round([c for c in [*first, fallback_all] if c.eligible], None)
    else:  # the fp32 reference itself: 1.0 by definition, and one model less to time
        fallback_all.speedup = {b: 1.0 for b in batches}
        timed = time_round([c for c in first if c.eligible], None)
    flavoured = [c for c in first if c.eligible and c.speedup]
    best = challenge(flavoured, fallback_all, timed)
    best_int8 = min(flavoured, key=lambda c: c.score()) if flavoured else None

    # layers the merged plan (step 1 when ``merged_only``, else step 2) moved: they fall back to what the plan made them
    moved: set[str] = {lid for lid, p in first_plan.items() if p != plan[lid]}

    def back(lid: str, entry: LayerPlan) -> LayerPlan:
        """What a compute layer becomes when int8 does not pay: the fallback, or, for a layer the merged plan
        moved, the plan's own entry (an fp32 layer stays fp32, not packed at 8 bits)."""
        return plan[lid] if lid in moved else fallback_plan(entry, fallback)

    # 2. repairs of the fastest flavour: slow layers back, MatMul/Gemm to dynamic where that is faster, packed
    #    layers computing in int8
    if best_int8 is not None and not merged_only:
        f = best_int8.flavour
        repairs: list[Candidate] = []
        timed_before = [*first, fallback_all]

        def new(name: str, repair_plan: dict[str, LayerPlan], why_text: str) -> None:
            """Build a repair unless a candidate with its plan and flavour was timed already (BERT's dynamic
            int8 repair is often the first round's dynamic candidate again: a build and a timing for nothing);
            a name already taken gets a suffix, so the timings do not mix two models up."""
            if any(c.plan == repair_plan and c.flavour == f for c in [*timed_before, *repairs]):
                return
            taken = {c.name for c in [*timed_before, *repairs]}
            repairs.append(build(Candidate(name if name not in taken else f"{name}-repair", repair_plan, f, why_text)))

        merged = merged_plan(model, plan, keep_fp32) if fallback == PACKED and ranges is not None else plan
        merged_c: Candidate | None = None
        base = plan  # what the slow-layer and dynamic repairs start from
        if merged != plan:  # an allocated plan computing int8 where the int8 artifact does
            moved.update(lid for lid, p in merged.items() if p != plan[lid])
            moved = {lid: _describe(plan[lid]) for lid, p in merged.items() if p != plan[lid]}
            new(f"merged-{f.name}", merged, f"{len(moved)} layer(s) computing in int8 (low-bit codes widened at "
                                             f"load): {_short(moved)}")
            merged_c = repairs[-1] if repairs and repairs[-1].plan == merged else None
            if merged_c is not None and merged_c.eligible and best is not fallback_all:
                started = time.perf_counter()
                structure = _as_int8(model, merged_c, ranges, calibration, options, folder)
                rounds.append({"int8_structure": {**structure, "seconds": round(time.perf_counter() - started, 2)}})
                if structure["equal"]:  # int8 speed by construction: the plan as made is now the deviation
                    base = merged
        if layer_times is not None:
            base_compute = compute_layers(base)
            table = layer_times(_variants(model, base, base_compute, f))
            repaired, why = _repair_slow(base, base_compute, table, f, fallback)
            repaired = {lid: (back(lid, base[lid]) if lid in why else p) for lid, p in repaired.items()}
            if why and len(why) < len(base_compute):
                new(f"repaired-{f.name}", repaired, "layers no faster than fp32 alone fell back: " + _short(why))
            switched, why_dynamic = _dynamic_where_faster(repaired, table, f, model)
            if why_dynamic:
                new(f"dynamic-{f.name}", switched,
                    "MatMul/Gemm layers whose dynamic int8 is faster: " + _short(why_dynamic))
            failures = getattr(table, "failures", None)
            if failures:
                rounds.append({"not_timed": dict(failures)})
        if repairs:
            # the error rule catches a saturating flavour; merged runs the flavour round 1 found exact, and its
            # larger error (int8 activations where the plan had fp32 ones) is the quality gate's to judge, on
            # held-out data
            _eligibility([*first, *(c for c in repairs if c is not merged_c)])
            repairs = [c for c in repairs if c.eligible]
        if repairs and base is merged and merged_c is not None:
            # the merged plan runs the int8 plan's session graph; the plan as made and the repairs must beat it
            deviations = [best, *(c for c in repairs if c is not merged_c)]
            timed = time_round(deviations, merged_c)
            best = challenge(deviations, merged_c, timed)
        elif repairs:
            timed = time_round(repairs, best)
            best = challenge(repairs, best, timed)

    # 3. isolated int8 layers of the winner fall back
    if best is not fallback_all:
        alone = _isolated(model, best.plan)
        if alone and len(alone) < len(compute_layers(best.plan)):
            trimmed = {lid: (back(lid, p) if lid in alone else p) for lid, p in best.plan.items()}
            island = build(Candidate(f"{best.name}-islands", trimmed, best.flavour,
                                     f"isolated int8 layers fell back: {_short({a: 'isolated' for a in alone})}"))
            timed = time_round([island], best)
            best = challenge([island], best, timed)

    # 4. ORT's own load-time fusions of the winner, each kept only when the winner is not faster without it
    best_path = fp32_path if best.path is None else best.path
    disabled, session_record = _session_fusions(best_path, folder, feeds, timer,
                                                lambda m: say(f"format search: {m}"))

    record = {"cpu_key": host().key, "batches": list(batches), "chosen": best.name,
              "flavour": best.flavour.name, "speedup": {str(b): round(r, 3) for b, r in best.speedup.items()},
              "rule": f"a challenger replaces the incumbent when faster in at least 3 rounds of 4 at every batch and "
                      f"{1 + MIN_GAIN:.2f}x overall (paired medians); one at most {SMALLER:g}x its bytes when not "
                      f"slower (median at least {1 - TIE:.2f}x at every batch)",
              "rounds": rounds, "fallback": fallback,
              "changed": {lid: _describe(p) for lid, p in best.plan.items() if p != plan[lid]},
              "disabled_optimizers": disabled}
    if session_record:
        record["session"] = session_record
    if best is fallback_all and merged_only:
        record["note"] = ("int8 compute on the widened codes measured no faster than the packed plan on this CPU "
                          "(fp32 speed): its layers stayed packed")
    elif best is fallback_all and compute:
        record["note"] = ("int8 compute measured no faster than fp32 on this CPU for this model (slower, where it "
                          f"was smaller: beyond {TIE:.0%}): its layers were "
                          f"kept {'packed' if fallback == PACKED else 'in fp32'}")
    say(f"format search: chose {best.name} ({best.flavour.describe()}), "
        + ", ".join(f"{r:.2f}x fp32 at batch {b}" for b, r in sorted(best.speedup.items())))
    if key is not None:
        _store(key, {"plan": {lid: _fields(p) for lid, p in best.plan.items()}, "flavour": best.flavour.name,
                     "record": record})
    if best.path is None:  # the untimed all-fp32 fallback: built now that it is chosen
        chosen = _as_written(materialize_in(model, best.plan, best.flavour, ranges, calibration, options), folder,
                             model)
    else:
        chosen = Model.read_back(best.path, best.provenance, model.torch_module)
    set_disabled_optimizers(chosen, disabled)
    return SearchResult(chosen, best.flavour, best.plan, record)


def build_candidate(model: Model, c: Candidate, path: Path, *, ranges: ActivationRanges | None,
                    calibration: Dataset, options: QuantizeOptions, check: Dataset, reference: list[np.ndarray],
                    built_s8: dict[str, Model] | None = None) -> Candidate:
    """Materialize ``c``'s plan in its flavour, write it to ``path`` (then drop it from memory: only files are
    kept between timings) and measure its relative error on ``check`` against ``reference``. A flavour ORT cannot
    run leaves ``c`` ineligible rather than failing the search. The search's candidates and the flavour probe's
    whole-graph int8 models are built here alike."""
    built = materialize_in(model, c.plan, c.flavour, ranges, calibration, options, built_s8=built_s8)
    c.path, c.provenance = path, built.provenance
    c.nbytes = built.save_external(path)
    del built
    try:
        c.error = _relative_error(reference, _outputs(path, check))
    except BitpassError as err:  # e.g. ORT's own graph rewrites break S8 QDQ at opset 21+ (output_dtype)
        c.eligible, c.speedup = False, {}
        c.why += f"; {err}: not eligible"
    return c


def _as_int8(model: Model, candidate: Candidate, ranges: ActivationRanges | None, calibration: Dataset,
             options: QuantizeOptions, folder: Path) -> dict[str, Any]:
    """Whether ``candidate`` (low-bit codes widened to int8 at load) runs the very session graph of the same plan
    with plain int8 weights, after ONNX Runtime's constant folding and fusions: if so it runs the same kernels on
    the same shapes as that int8 model, and no timing is needed to know it is as fast."""
    assert candidate.path is not None
    twin_plan = int8_twin(candidate.plan)
    low = sum(1 for lid, p in candidate.plan.items() if p != twin_plan[lid])
    if not low:
        return {"equal": True, "why": "no low-bit int8 layers: it is the int8 plan itself"}
    try:
        twin = materialize_in(model, twin_plan, candidate.flavour, ranges, calibration, options)
    except BitpassError as err:
        return {"equal": False, "why": f"the plan with int8 weights could not be built ({err}): timed instead"}
    twin_path = folder / f"{candidate.path.stem}.int8-twin.onnx"
    twin.save_external(twin_path)
    del twin
    mine, theirs = session_signature(candidate.path, folder), session_signature(twin_path, folder)
    for leftover in (twin_path, twin_path.with_name(twin_path.name + ".data")):
        leftover.unlink(missing_ok=True)
    if mine is None or theirs is None:
        return {"equal": False, "why": "ONNX Runtime could not load one of them"}
    if mine != theirs:
        return {"equal": False, "why": f"ONNX Runtime's session graph differs from the plan with int8 weights for its "
                                       f"{low} low-bit layer(s) (the widening was not folded away?): timed instead"}
    return {"equal": True, "why": f"ONNX Runtime's session graph equals the plan with int8 weights for its {low} "
                                  f"low-bit layer(s): the same kernels on the same shapes, int8 speed by construction"}


def _as_written(built: Model, folder: Path, model: Model) -> Model:
    """``built`` written and read back, as a timed winner is: ORT's quantizer stores some scales as float_data, a
    file read back holds them as raw bytes, so a choice taken from the cache gave other artifact bytes than the
    same choice made by timing (same values)."""
    path = folder / "chosen.onnx"
    built.save_external(path)
    return Model.read_back(path, built.provenance, model.torch_module)


# --- replaying a choice -----------------------------------------------------------------------------------
def plan_record(plan: Mapping[str, LayerPlan]) -> dict[str, dict[str, Any]]:
    """A plan as JSON (what the search's record keeps, so that its choice can be replayed)."""
    return {lid: _fields(p) for lid, p in sorted(plan.items())}


def is_quantized(entry: LayerPlan) -> bool:
    """Whether a layer's plan quantizes anything (its weight, or its activations: None means 8 bits)."""
    return entry.weight_bits < 32 or (entry.activation_bits or 8) < 32


@dataclass(frozen=True)
class Replay:
    """The search's choice for a model (per-layer plan, int8 flavour, ORT load-time fusions turned off), rebuilt
    without timing, with ``fp32_layers`` moved to fp32: what the quality gate's repair builds. Searching again
    would cost minutes on a ResNet-50, and building from the layers' annotations instead loses what the search
    changed (the ``merged`` plan's int8 compute on widened codes, dynamic int8, layers fallen back), so a 4-bit
    plan that needed one layer repaired ran slower than int8."""

    flavour: str
    plan: Mapping[str, LayerPlan]
    disabled_optimizers: tuple[str, ...] = ()
    fp32_layers: frozenset[str] = frozenset()

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> Replay | None:
        """The choice a search ``record`` describes (None when it holds no plan: nothing was searched)."""
        if not isinstance(record, Mapping) or not isinstance(record.get("plan"), Mapping) \
                or record.get("flavour") not in FLAVOURS:
            return None
        return cls(str(record["flavour"]), {lid: LayerPlan(**p) for lid, p in record["plan"].items()},
                   tuple(record.get("disabled_optimizers") or ()))

    def with_fp32(self, layers: Collection[str]) -> Replay:
        return replace(self, fp32_layers=frozenset(layers))

    def plan_for(self, model: Model) -> dict[str, LayerPlan]:
        """The searched plan for ``model``'s layers, ``fp32_layers`` in fp32 (a layer the search never saw keeps
        its annotations' plan)."""
        return {lid: (LayerPlan(32, 32) if lid in self.fp32_layers else self.plan.get(lid, p))
                for lid, p in plan_of(model).items()}


def replay(model: Model, choice: Replay, *, ranges: ActivationRanges | None, calibration: Dataset,
           options: QuantizeOptions) -> SearchResult:
    """``choice`` materialized on ``model`` (see ``Replay``), written and read back as a searched winner is."""
    plan = choice.plan_for(model)
    flavour = FLAVOURS[choice.flavour]
    with tempfile.TemporaryDirectory(prefix="bitpass-replay-") as tmp:
        built = _as_written(materialize_in(model, plan, flavour, ranges, calibration, options), Path(tmp), model)
    set_disabled_optimizers(built, choice.disabled_optimizers)
    moved = sorted(lid for lid in choice.fp32_layers if lid in plan)
    return SearchResult(built, flavour, plan, {
        "flavour": flavour.name, "disabled_optimizers": list(choice.disabled_optimizers), "fp32_layers": moved,
        "why": f"the format search's choice replayed without timing, {len(moved)} layer(s) moved to fp32"})


# --- the int8 flavour for a per-layer probe -------------------------------------------------------------------
def whole_graph_flavour(model: Model, *, ranges: ActivationRanges | None, calibration: Dataset, timer: GraphTimer,
                        options: QuantizeOptions | None = None, batches: Sequence[int] = (1, 8),
                        use_cache: bool = True,
                        progress: Callable[[str], None] | None = None) -> tuple[Flavour | None, dict[str, Any]]:
    """The int8 flavour of ``model``'s whole graph with every layer int8 (what the default compile's search times
    first): each exact flavour timed against the others, the fastest by median paired ratio to fp32. Per-layer
    probes, which pay a Quantize and a Dequantize per layer, made S8S8 look faster on an AVX-512 VNNI EPYC where
    U8S8 ran 2-3x faster on the whole graph: allocation times its layers in this flavour. Cached per model,
    ranges, options and CPU (the next compile decides the same way). None when no flavour ran."""
    say = progress or (lambda _m: None)
    options = options or QuantizeOptions()
    flavours = _flavours(options)
    plan = {lid: LayerPlan(8, 8, "qdq") for lid in plan_of(model)}
    if calibration.fixed_batch:
        batches = (calibration.fixed_batch,)
    if len(flavours) == 1 or not plan:
        return (flavours[0] if plan else None), {"why": "one flavour to choose from" if plan else "no layers"}
    with tempfile.TemporaryDirectory(prefix="bitpass-flavour-") as tmp:
        folder = Path(tmp)
        fp32_path = folder / "fp32.onnx"
        model.save_external(fp32_path)
        key = "flavour:" + _cache_key(fp32_path, plan, ranges, options, "flavour", batches) if use_cache else None
        cached = _cached(key)
        if cached is not None and cached["plan"] in FLAVOURS:
            return FLAVOURS[cached["plan"]], {**cached["record"], "cached": True}
        check = calibration.head(CHECK_SAMPLES)
        reference = _outputs(fp32_path, check)
        built_s8: dict[str, Model] = {}
        candidates = [build_candidate(model, Candidate(f.name, plan, f, "every layer int8"), folder / f"{f.name}.onnx",
                                      ranges=ranges, calibration=calibration, options=options, check=check,
                                      reference=reference, built_s8=built_s8) for f in flavours]
        built_s8.clear()
        _eligibility(candidates)
        eligible = [c for c in candidates if c.eligible]
        if not eligible:
            return None, {"why": "no flavour ran", "candidates": [c.record() for c in candidates]}
        say(f"timing the whole graph in int8 flavours {', '.join(c.name for c in eligible)} against fp32")
        timed = timer.graphs({"fp32": fp32_path, **{c.name: c.path for c in eligible}},
                             {b: calibration.batch_of(b) for b in batches}, cached=True)
        for c in eligible:
            ratios = {b: paired_ratios(timed, c.name, "fp32", b) for b in batches}
            if c.name in timed.errors or any(not r for r in ratios.values()):
                c.eligible, c.why = False, f"{c.why}; did not run ({timed.errors.get(c.name, 'no timing')})"
            else:
                c.speedup = {b: float(np.median(r)) for b, r in ratios.items()}
        timed_ok = [c for c in eligible if c.eligible]
        if not timed_ok:
            return None, {"why": "no flavour ran", "candidates": [c.record() for c in candidates]}
        best = min(timed_ok, key=lambda c: (c.score(), c.name))
        record = {"chosen": best.name, "cpu_key": host().key, "batches": list(batches),
                  "why": "the fastest exact flavour of the whole graph in int8 (median paired ratio to fp32)",
                  "candidates": [c.record() for c in candidates]}
    if key is not None:
        _store(key, {"plan": best.name, "record": record})
    return best.flavour, record


# --- whether a compiled artifact is slower than fp32 -----------------------------------------------------------
def slower_than_reference(timer: GraphTimer, artifact: Path, reference: Path,
                          feeds: Mapping[int, Mapping[str, np.ndarray]],
                          disabled_optimizers: Sequence[str] = ()) -> Verdict:
    """Whether the fp32 ``reference`` is faster than ``artifact`` with the search's confidence: the rule a
    challenger must pass to replace its incumbent (``faster_with_confidence``, with the fp32 reference as the
    challenger), on a timing as long as the search's confirmation (``CONFIRM_ROUNDS``), in a fresh process, its
    rounds cached so the next compile decides the same way. ``faster`` True: slower with confidence; unsure is
    not slower. One batch-1 figure of a 0.25 ms MobileNetV3 on a shared machine said 0.54x: noise, which this
    rule does not act on."""
    timed = timer.graphs({"fp32": reference, "artifact": artifact}, feeds, rounds=CONFIRM_ROUNDS,
                         min_seconds=CONFIRM_SECONDS, budget_seconds=CONFIRM_BUDGET,
                         disabled_optimizers={"artifact": list(disabled_optimizers)}, cached=True)
    if timed.errors:
        return Verdict(False, {}, {}, f"not timed: {'; '.join(f'{k}: {v}' for k, v in timed.errors.items())}")
    verdict = faster_with_confidence({b: paired_ratios(timed, "fp32", "artifact", b) for b in feeds}, clear=1.0)
    if verdict.faster is None:
        return replace(verdict, faster=False, why=verdict.why + "; unsure, so not slower")
    return verdict


# --- ONNX Runtime's load-time fusions ---------------------------------------------------------------------
#: op types ONNX Runtime's own load-time fusions make -> the optimizer's name. SkipLayerNormalization: on CPU B a
#: packed sentence encoder ran 0.93x fp32 at batch 16 with it and 1.00x without (the raw export never fuses it)
SESSION_FUSIONS = {"SkipLayerNormalization": "SkipLayerNormFusion"}
#: the model-level metadata key that carries the choice to the ONNX Runtime backend's session.json
DISABLED_OPTIMIZERS_KEY = "bitpass.session.disabled_optimizers"
#: a session without a fusion must be this much faster (geometric mean of paired medians) to be chosen
SESSION_MIN_GAIN = 0.02


def set_disabled_optimizers(model: Model, names: Sequence[str]) -> None:
    """Record on ``model`` the ORT graph optimizers its sessions should turn off (none: the key is removed)."""
    if names:
        model.ir.metadata_props[DISABLED_OPTIMIZERS_KEY] = json.dumps(sorted(names))
    else:
        model.ir.metadata_props.pop(DISABLED_OPTIMIZERS_KEY, None)


def disabled_optimizers(model: Model) -> list[str]:
    """What ``set_disabled_optimizers`` recorded on ``model``."""
    value = model.ir.metadata_props.get(DISABLED_OPTIMIZERS_KEY)
    return list(json.loads(value)) if value else []


def fused_at_load(path: Path, folder: Path) -> list[str]:
    """The ``SESSION_FUSIONS`` ONNX Runtime applies when it loads the model at ``path`` (its optimized graph's op
    types, ``optimized_graph``)."""
    try:
        ops = {node.op_type for node in optimized_graph(path, folder).node}
    except Exception:  # noqa: BLE001 - ORT's own error types; then nothing is known to be fused
        return []
    return sorted(name for op, name in SESSION_FUSIONS.items() if op in ops)


def choose_session_fusions(model: Model, calibration: Dataset, timer: GraphTimer, *, batches: Sequence[int] = (1, 8),
                           progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Step 4 of the search on its own, for a model the search does not time (no int8 compute: packed or fp32
    layers only): ORT's load-time fusions of ``model``, each timed with and without it and turned off
    (``set_disabled_optimizers`` on ``model``) when that is faster with confidence. The rounds are cached, so the
    next compile decides the same way. Returns the record (empty when ORT fuses nothing)."""
    say = progress or (lambda _m: None)
    batches = (calibration.fixed_batch,) if calibration.fixed_batch else tuple(batches)
    with tempfile.TemporaryDirectory(prefix="bitpass-fusions-") as tmp:  # the model on disk, as the timer wants
        path = Path(tmp) / "model.onnx"
        model.save_external(path)
        disabled, record = _session_fusions(path, Path(tmp), {b: calibration.batch_of(b) for b in batches}, timer,
                                            say, cached=True)
    set_disabled_optimizers(model, disabled)
    return {**record, "disabled_optimizers": disabled} if record else {}


def _session_fusions(path: Path, folder: Path, feeds: Mapping[int, Mapping[str, np.ndarray]], timer: GraphTimer,
                     say: Callable[[str], None], *, cached: bool = False) -> tuple[list[str], dict[str, Any]]:
    """The fusions to turn off for the chosen model: each one ORT applies at load, timed with and without it in
    one fresh process, and turned off only when that is faster with confidence. ``cached``: rounds from the
    timer's cache when it has them (a caller whose choice is not cached with the search's)."""
    fused = fused_at_load(path, folder)
    if not fused:
        return [], {}
    say(f"timing the model with and without ONNX Runtime's {', '.join(fused)}")
    timed = timer.graphs({"with": path, "without": path}, feeds, disabled_optimizers={"without": fused},
                         **({"cached": True} if cached else {}))
    ratios = {b: paired_ratios(timed, "without", "with", b) for b in feeds}
    verdict = faster_with_confidence(ratios, min_gain=SESSION_MIN_GAIN, clear=1.0)
    if verdict.faster is None:  # unsure: ORT's defaults stay
        verdict = replace(verdict, faster=False, why=verdict.why + "; unsure, so ORT's defaults stay")
    record = {"fused_at_load": fused, "without_them": verdict.record()}
    return (fused if verdict.faster else []), record


# --- building and checking candidates ----------------------------------------------------------------------
def _flavours(options: QuantizeOptions) -> list[Flavour]:
    if options.activation_type == "uint8":
        return [U8S8_REDUCED if options.reduce_range else U8S8]
    if options.activation_type == "int8":
        return [replace(S8S8, reduce_range=True, name="s8s8-reduce-range") if options.reduce_range else S8S8]
    if options.symmetric_activations or options.reduce_range:  # no exact zero-point shift between the two
        return [U8S8_REDUCED if options.reduce_range else S8S8]
    return [U8S8, S8S8]


def materialize_in(model: Model, plan: Mapping[str, LayerPlan], flavour: Flavour, ranges: ActivationRanges | None,
                   calibration: Dataset, options: QuantizeOptions, built_s8: dict[str, Model] | None = None) -> Model:
    """The plan materialized in ``flavour``: U8S8 is the S8S8 model with its activation zero points shifted
    (exact, and one quantization instead of two); U8S8 with 7-bit weights is materialized itself."""
    if flavour.name == U8S8.name and not options.symmetric_activations:
        key = json.dumps({k: _fields(v) for k, v in sorted(plan.items())})
        s8 = (built_s8 or {}).get(key)
        if s8 is None:
            s8 = materialize(model, plan, ranges=ranges, calibration=calibration,
                             options=options.model_copy(update={"activation_type": "int8", "reduce_range": False}))
            if built_s8 is not None:  # one entry: the S8S8 candidate of the same plan is built next
                built_s8.clear()
                built_s8[key] = s8
        proto, _ = to_uint8_activations(s8.to_proto())
        out = from_proto(proto, name=model.provenance.name)
        return Model(out.ir, s8.provenance, model.torch_module)
    update = {"activation_type": flavour.activation_type, "reduce_range": flavour.reduce_range}
    built = materialize(model, plan, ranges=ranges, calibration=calibration, options=options.model_copy(update=update))
    if built_s8 is not None and flavour.name == S8S8.name:
        built_s8.clear()
        built_s8[json.dumps({k: _fields(v) for k, v in sorted(plan.items())})] = built
    return built


def _outputs(model: Model | Path, data: Dataset) -> list[np.ndarray]:
    session = execution.create_session(model, purpose="check a candidate's outputs")
    parts: list[list[np.ndarray]] = []
    for feeds in data.batches(64):
        parts.append(session.run(None, dict(feeds)))
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def _relative_error(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """Summed squared error over summed squared reference, over every float output."""
    num = den = 0.0
    for ref, out in zip(reference, outputs):
        if not np.issubdtype(ref.dtype, np.floating):
            continue
        r, o = ref.astype(np.float64), out.astype(np.float64)
        num += float(np.sum((r - o) ** 2))
        den += float(np.sum(r * r))
    return num / den if den > 0 else num


def _eligibility(candidates: list[Candidate]) -> None:
    errors = [c.error for c in candidates if c.error is not None]
    if not errors:
        return
    limit = ERROR_FACTOR * min(errors) + ERROR_EPSILON
    for c in candidates:
        if c.error is not None and c.error > limit:
            if c.eligible:
                c.why += f"; output error {c.error:.3g} is over {limit:.3g} (saturation?): not eligible"
            c.eligible = False


# --- repairs -------------------------------------------------------------------------------------------------
def _variants(model: Model, plan: Mapping[str, LayerPlan], compute: Sequence[str],
              flavour: Flavour) -> dict[str, list[tuple[int, str]]]:
    """The one-layer timings the repairs read: QDQ in the flavour the whole graph runs (the other flavour's
    timings are never read), and dynamic int8 for MatMul/Gemm."""
    ops = {layer.id: layer.op_type for layer in model.layers()}
    out = {}
    for lid in compute:
        wanted = [(8, _flavour_variant(flavour))]
        if ops.get(lid) in ("MatMul", "Gemm"):
            wanted.append((8, formats.DYNAMIC))
        out[lid] = wanted
    return out


def _flavour_variant(flavour: Flavour) -> str:
    return "qdq-u8" if flavour.activation_type == "uint8" else "qdq-s8"


def _layer_seconds(row: Mapping[Any, Mapping[int, float]], entry: LayerPlan, flavour: Flavour) -> Mapping[int, float]:
    if entry.format == "dynamic":
        return row.get((8, formats.DYNAMIC), {})
    return row.get((8, _flavour_variant(flavour)), {})


def _repair_slow(plan: Mapping[str, LayerPlan], compute: Sequence[str], table: Mapping, flavour: Flavour,
                 fallback: str) -> tuple[dict[str, LayerPlan], dict[str, str]]:
    out, why = dict(plan), {}
    for lid in compute:
        row = table.get(lid)
        if not row:
            continue
        fp32, mine = row.get((32, formats.FP32), {}), _layer_seconds(row, plan[lid], flavour)
        if fp32 and mine and all(b in mine for b in fp32) and \
                sum(mine[b] / fp32[b] for b in fp32) / len(fp32) >= 1.0:
            out[lid] = fallback_plan(plan[lid], fallback)
            why[lid] = f"{sum(mine[b] / fp32[b] for b in fp32) / len(fp32):.2f}x fp32's time alone"
    return out, why


def _dynamic_where_faster(plan: Mapping[str, LayerPlan], table: Mapping, flavour: Flavour,
                          model: Model) -> tuple[dict[str, LayerPlan], dict[str, str]]:
    ops = {layer.id: layer.op_type for layer in model.layers()}
    out, why = dict(plan), {}
    for lid, entry in plan.items():
        if ops.get(lid) not in ("MatMul", "Gemm") or entry.format not in ("qdq", None) or entry.weight_bits >= 32 \
                or (entry.format is None and entry.activation_bits not in (None, 8)):
            continue
        row = table.get(lid) or {}
        fp32, qdq, dyn = row.get((32, formats.FP32), {}), _layer_seconds(row, entry, flavour), row.get(
            (8, formats.DYNAMIC), {})
        if not (fp32 and dyn and qdq) or any(b not in dyn or b not in qdq for b in fp32):
            continue
        score = sum(dyn[b] / fp32[b] for b in fp32) / len(fp32)
        if score < 1.0 and score < 0.9 * sum(qdq[b] / fp32[b] for b in fp32) / len(fp32):
            out[lid] = LayerPlan(entry.weight_bits, 8, "dynamic", entry.block_size)
            why[lid] = f"dynamic {score:.2f}x fp32's time alone"
    return out, why


def _isolated(model: Model, plan: Mapping[str, LayerPlan]) -> list[str]:
    """Int8 compute layers none of whose nearest quantizable neighbours (through non-layer nodes, both ways)
    runs int8 compute."""
    compute = set(compute_layers(plan))
    if not compute:
        return []
    layer_of = {id(layer.node): layer.id for layer in model.layers()}

    def neighbours(node: Any, upward: bool) -> set[str]:
        found, seen, todo = set(), set(), [node]
        while todo:
            current = todo.pop()
            nexts = []
            if upward:
                nexts = [v.producer() for v in current.inputs if v is not None and v.producer() is not None]
            else:
                nexts = [use.node if hasattr(use, "node") else use[0] for v in current.outputs for use in v.uses()]
            for n in nexts:
                if id(n) in seen:
                    continue
                seen.add(id(n))
                if id(n) in layer_of:
                    found.add(layer_of[id(n)])
                else:
                    todo.append(n)
        return found

    return [layer.id for layer in model.layers() if layer.id in compute
            and not ((neighbours(layer.node, True) | neighbours(layer.node, False)) & compute)]


# --- cache ---------------------------------------------------------------------------------------------------
def _fields(p: LayerPlan) -> dict[str, Any]:
    return {"weight_bits": p.weight_bits, "activation_bits": p.activation_bits, "format": p.format,
            "block_size": p.block_size}


def _describe(p: LayerPlan) -> str:
    if p.weight_bits >= 32:
        return "fp32"
    return f"{p.weight_bits}-bit {p.format or 'qdq'}"


def _short(why: Mapping[str, str], limit: int = 6) -> str:
    items = [f"{k} ({v})" for k, v in list(why.items())[:limit]]
    return ", ".join(items) + (f" and {len(why) - limit} more" if len(why) > limit else "")


def _cache_key(fp32_path: Path, plan: Mapping[str, LayerPlan], ranges: ActivationRanges | None,
               options: QuantizeOptions, fallback: str, batches: Sequence[int], keep_fp32: Collection[str] = ()) -> str:
    """Of the model (as ``Model.save_external`` wrote it: read back in chunks, never whole), plan, ranges, options,
    batches and CPU."""
    import onnxruntime

    digest = hashlib.sha256()
    for part in (fp32_path, fp32_path.with_name(fp32_path.name + ".data")):
        if part.is_file():
            with part.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    digest.update(json.dumps({k: _fields(v) for k, v in sorted(plan.items())}, sort_keys=True).encode())
    if ranges is not None:
        digest.update(json.dumps(sorted(ranges.ranges.items())).encode())
    digest.update(json.dumps(options.model_dump(), sort_keys=True, default=str).encode())
    digest.update(json.dumps([fallback, list(batches), host().key, onnxruntime.__version__, SEARCH_VERSION,
                              os.cpu_count(), sorted(keep_fp32)]).encode())
    return digest.hexdigest()[:32]


def _cache_file() -> Any:
    return cache_dir() / "format_search.json"


def _cached(key: str | None) -> dict[str, Any] | None:
    if key is None:
        return None
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return None
    entry = data.get(key) if isinstance(data, dict) else None
    return entry if isinstance(entry, dict) and "plan" in entry else None


def _store(key: str, entry: dict[str, Any]) -> None:
    path = _cache_file()
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass


__all__ = ["Candidate", "GraphTimer", "Replay", "SearchResult", "Verdict", "build_candidate", "compute_layers",
           "fallback_plan", "faster_with_confidence", "graph_signature", "int8_twin", "is_quantized", "merged_plan",
           "paired_ratios", "plan_of", "plan_record", "replay", "search", "session_signature",
           "slower_than_reference", "whole_graph_flavour"]
