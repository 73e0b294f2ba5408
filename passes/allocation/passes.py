"""The ``allocate-bits`` pass: per-layer weight widths from measured sensitivity, under a budget.

Reads the ``sensitivity`` analysis ({layer_id: s} or per-bit {layer_id: {bits: Ω}};
when it was invalidated, the ``bitpass.sensitivity.<method>`` node annotations),
builds the ``Problem`` (problem.py), solves it with the chosen method
(solvers.py) and writes ``bits.weight`` and ``bits.activation`` (8, or 32 where
the weight stays fp32) on every layer. ``ctx.records["allocation"]`` gets the
plan, its totals, the solver, seconds and, with ``sweep``, the frontier.

What the context may supply:

* widths per op type: ``ctx.target.options["capabilities"]`` (a backend's
  ``Capabilities``) or ``ctx.target.options["weight_bits"]`` ({op_type:
  widths}); else the option ``widths``; else 8/4/2 (+32) everywhere.
* ``ctx.target.options["latency_probe"]``: the backend's per-layer timer (given the calibration
  data, so layers are timed at their real shapes). Its table (cached as the ``latency-variants``
  analysis) picks each width's format (and the model's int8 flavour) and enables
  ``latency=`` budgets and the rule *never slower than fp32*: a width measured slower than
  the layer's fp32 is not offered, unless the budget cannot be met without such widths
  (then all are offered and the record says so).
* evaluation data, for an ``accuracy-drop=`` budget: each candidate plan is measured on it
  (``evaluate.plan_evaluator``).
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import pydantic

from bitpass.frontend import Model, annotation
from bitpass.frontend.errors import UsageError
from bitpass.passes.allocation import formats
from bitpass.passes.allocation.budget import Budget, bisect_accuracy_drop, check_feasible, parse_budget
from bitpass.passes.allocation.problem import FLOAT_BITS, LATENCY, Problem, activation_bits, layer_sensitivity
from bitpass.passes.allocation.evaluate import plan_evaluator
from bitpass.passes.allocation.solvers import Allocation, pareto_frontier, solve
from bitpass.passes.analyses import ACTIVATION_RANGES, BITS, BITS_ANNOTATIONS, LATENCY_VARIANTS, SENSITIVITY
from bitpass.passes.infra import PRESERVE_ALL, Pass, PassConfig, PassContext, PassResult

#: at most this many frontier points go into the record (evenly spread by cost)
MAX_RECORDED_POINTS = 256
#: frontier plans whose real quality a sweep measures on the evaluation data
MEASURED_POINTS = 8


def _items(value: str | list[Any] | None) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


class AllocateBitsConfig(PassConfig):
    #: ilp (exact, default), pareto (frontier by DP), baq (closed form), greedy
    method: Literal["ilp", "pareto", "baq", "greedy"] = "ilp"
    #: e.g. "avg-bits=4", "size=40KB", "bops=1.2G", "latency=2ms", "accuracy-drop=0.5"; combine with ',' (quoted)
    budget: str | list[str] = "avg-bits=4"
    #: which ``bitpass.sensitivity.<method>`` annotation to read when the analysis is not cached
    sensitivity: str = "hutchinson"
    #: weights per fp32 scale for 4- and 2-bit layers
    group_size: int = pydantic.Field(32, ge=1)
    #: 4/2-bit blocks carry a zero point (counts in ``size``)
    zero_point: bool = False
    #: layer ids (or glob patterns) that stay fp32
    keep_fp32: str | list[str] = ""
    #: widths to offer when the target does not say (32 is always offered)
    widths: list[int] | None = None
    #: record the whole Pareto frontier of the budget's first dimension
    sweep: bool = False
    #: how each width is materialized: auto (the fastest format measured not slower than fp32 on the
    #: target, else packed), packed (stored low-bit, fp32 speed), compute (int8 QDQ / MatMulNBits / blocked DQ)
    formats: Literal["auto", "packed", "compute"] = "auto"
    #: batch size whose measured latency a latency= budget counts
    latency_batch: int = pydantic.Field(1, ge=1)

    @pydantic.field_validator("budget")
    @classmethod
    def _budget_parses(cls, value: str | list[str]) -> str | list[str]:
        try:
            parse_budget(value)
        except UsageError as err:
            raise ValueError(str(err)) from None
        return value

    @pydantic.field_validator("widths")
    @classmethod
    def _known_widths(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(b not in (2, 3, 4, 8, 16, 32) for b in value):
            raise ValueError(f"widths {value} must be among 2, 3, 4, 8, 16, 32")
        return value


class AllocateBits(Pass):
    """Choose each layer's weight bits from its sensitivity under a size/bits/BOPs/latency/accuracy budget."""

    name = "allocate-bits"
    Config = AllocateBitsConfig
    requires = frozenset({SENSITIVITY})
    produces = frozenset({BITS, BITS_ANNOTATIONS})
    config: AllocateBitsConfig

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        start = time.perf_counter()
        budget = parse_budget(cfg.budget)
        layers = model.layers()
        if not layers:
            ctx.records["allocation"] = {"plan": {}, "note": "no quantizable layers"}
            ctx.analyses.put(BITS, {})
            return PassResult(model, modified=False, preserved=PRESERVE_ALL)
        keep = self._keep_fp32([layer.id for layer in layers])
        sensitivity, source = layer_sensitivity(model, ctx.analyses, cfg.sensitivity, who=self.name)
        widths, widths_source = self._widths(ctx)
        problem = Problem.from_model(model, sensitivity, widths=widths, group_size=cfg.group_size,
                                     zero_point=cfg.zero_point, latency=None, keep_fp32=keep)
        offered = {layer.id: layer.widths for layer in problem.layers}
        flavour, flavour_record = _whole_graph_flavour(model, ctx, measure=cfg.formats == "auto")
        variants = _latency_variants(model, offered, ctx, measure=cfg.formats == "auto", batch=cfg.latency_batch,
                                     flavour=flavour)
        flavour = flavour or formats.best_flavour(variants)
        latency, choices = formats.latency_by_bits(layers, offered, variants, cfg.formats, cfg.latency_batch,
                                                   flavour)
        if latency:
            problem = Problem.from_model(model, sensitivity, widths=widths, group_size=cfg.group_size,
                                         zero_point=cfg.zero_point, latency=latency, keep_fp32=keep)
        problem, latency_record = _never_slower_than_fp32(problem, budget.without_accuracy(), latency)

        search = None
        if budget.accuracy_drop is not None:
            evaluate = _evaluator(model, ctx, cfg.group_size)
            search = bisect_accuracy_drop(problem, evaluate, budget.accuracy_drop, cfg.method, budget=budget)
            allocation = search.result if search.result is not None else Allocation(
                search.plan, problem.totals(search.plan), problem.loss(search.plan), cfg.method)
        else:
            allocation = solve(problem, budget, cfg.method)

        frontier = allocation.frontier
        frontier_dim = allocation.frontier_dimension
        if cfg.sweep and frontier is None:
            frontier_dim = next(iter(budget.limits), "avg-bits")
            frontier = pareto_frontier(problem, frontier_dim)

        chosen_formats: dict[str, dict[str, Any]] = {}
        for layer in layers:
            bits = allocation.plan[layer.id]
            choice = choices[layer.id][bits]
            annotation.set_weight_bits(layer.node, bits)
            fp32_activations = bits >= FLOAT_BITS or choice.format not in (formats.QDQ, formats.DYNAMIC)
            annotation.set_activation_bits(layer.node, FLOAT_BITS if fp32_activations else activation_bits(bits))
            if bits < FLOAT_BITS:
                annotation.set_weight_format(layer.node, choice.format)
                if choice.block_size:
                    annotation.set_block_size(layer.node, choice.block_size)
            chosen_formats[layer.id] = formats.describe(choice)

        record: dict[str, Any] = {
            "method": cfg.method,
            "solver": allocation.solver,
            "budget": budget.describe(),
            "plan": dict(allocation.plan),
            "totals": dict(allocation.totals),
            "solver_seconds": round(allocation.seconds, 4),
            "sensitivity": source,
            "widths": widths_source,
            "group_size": cfg.group_size,
            "candidates": {layer.id: list(layer.widths) for layer in problem.layers},
            "formats": chosen_formats,
            "latency_measured": variants is not None,
        }
        if flavour:
            record["int8_flavour"] = flavour
            record["int8_flavour_why"] = flavour_record or {"why": "the fastest in total of the one-layer timings"}
        failures = getattr(variants, "failures", None)
        if failures:
            record["not_timed"] = dict(failures)
        if getattr(variants, "work", None):
            record["latency_probe"] = dict(variants.work)
        if keep:
            record["keep_fp32"] = sorted(keep)
        if latency_record:
            record["latency_rule"] = latency_record
        if search is not None:
            record["accuracy_search"] = {"baseline": search.baseline, "accuracy": search.accuracy,
                                         "avg_bits_budget": search.avg_bits,
                                         "evaluations": [{k: v for k, v in e.items() if k != "plan"}
                                                         for e in search.evaluations]}
        if cfg.sweep and frontier is not None:
            record["frontier"] = {"dimension": frontier_dim, "points": len(frontier),
                                  "recorded": [p.as_record() for p in _thin(frontier, MAX_RECORDED_POINTS)]}
            if ctx.evaluation is not None:
                record["frontier"]["measured"] = _measure_frontier(model, ctx, frontier, allocation, cfg.group_size)
        record["seconds"] = round(time.perf_counter() - start, 4)
        ctx.records["allocation"] = record
        ctx.analyses.put(BITS, dict(allocation.plan))
        ctx.progress(f"allocate-bits({cfg.method}): {len(layers)} layers, "
                     f"avg {allocation.totals.get('avg-bits', float('nan')):.3g} bits in {record['seconds']:.2f} s")
        # only node metadata changed: every analysis of the graph still holds
        return PassResult(model, modified=True, preserved=PRESERVE_ALL)

    # --- inputs -------------------------------------------------------------
    def _keep_fp32(self, ids: list[str]) -> set[str]:
        keep: set[str] = set()
        for pattern in _items(self.config.keep_fp32):
            matched = {i for i in ids if fnmatch.fnmatchcase(i, pattern)}
            if not matched:
                raise UsageError(f"allocate-bits: keep_fp32 {pattern!r} matches no layer; layers are: "
                                 f"{', '.join(ids)}")
            keep |= matched
        return keep

    def _widths(self, ctx: PassContext) -> tuple[Any, str]:
        options = ctx.target.options or {}
        caps = options.get("capabilities")
        if caps is not None and hasattr(caps, "widths_for"):
            return caps, f"target {ctx.target.backend}/{ctx.target.name}"
        if isinstance(options.get("weight_bits"), Mapping):
            return options["weight_bits"], f"target {ctx.target.backend}/{ctx.target.name} weight_bits"
        if self.config.widths is not None:
            fixed = tuple(self.config.widths)
            return (lambda _op: fixed), "option widths"
        return None, "default (8/4/2/32: the context gave no backend capabilities)"


#: batch sizes layers are timed at for the format choice (as the whole-graph format search times models); a
#: latency budget's own batch joins them. Batch 64 cost ResNet-18 at 224² 140 s of probing for no other choice.
PROBE_BATCHES = (1, 8)


def _whole_graph_flavour(model: Model, ctx: PassContext, *, measure: bool) -> tuple[str | None, dict[str, Any]]:
    """The int8 flavour (``qdq-u8`` / ``qdq-s8``) the layers are timed in: the fastest exact one of the whole
    graph in int8 (``format_search.whole_graph_flavour``, what the compile's format search times first), when the
    target times whole models; else None (the one-layer timings of both flavours decide, ``best_flavour``).
    One-layer timings pay a Quantize and a Dequantize per layer: on an AVX-512 VNNI EPYC they made S8S8 look
    faster, while U8S8 ran the whole ResNet-18 2-3x faster, and layers timed in S8S8 were left packed."""
    probe = (ctx.target.options or {}).get("latency_probe")
    if not measure or not hasattr(probe, "graphs") or ctx.calibration is None \
            or not ctx.analyses.cached(ACTIVATION_RANGES):
        return None, {}
    from bitpass.passes.format_search import whole_graph_flavour

    chosen, record = whole_graph_flavour(model, ranges=ctx.analyses.require(ACTIVATION_RANGES),
                                         calibration=ctx.calibration, timer=probe,
                                         progress=lambda m: ctx.progress(f"allocate-bits: {m}"))
    if chosen is None:
        return None, record
    return ("qdq-u8" if chosen.activation_type == "uint8" else "qdq-s8"), record


def _latency_variants(model: Model, offered: Mapping[str, tuple[int, ...]], ctx: PassContext, *,
                      measure: bool, batch: int = 1, flavour: str | None = None) -> formats.LatencyTable | None:
    """Per-layer latency of every compute format at ``PROBE_BATCHES`` and ``batch``: the cached
    ``latency-variants`` analysis, else (``measure``) from the target's probe, then cached. ``flavour``: the
    int8 flavour QDQ layers are timed in (None: both)."""
    if ctx.analyses.cached(LATENCY_VARIANTS):
        return ctx.analyses.require(LATENCY_VARIANTS)
    probe = (ctx.target.options or {}).get("latency_probe")
    if probe is None or not measure:
        return None
    wanted = formats.variants_to_measure(model.layers(), offered)
    if flavour is not None:  # the other flavour's timings would never be read
        other = set(formats.QDQ_FLAVOURS) - {flavour}
        wanted = {lid: [v for v in variants if v[1] not in other] for lid, variants in wanted.items()}
    table = call_probe(probe, model, wanted, ctx, batches=tuple(sorted({*PROBE_BATCHES, batch})))
    ctx.analyses.put(LATENCY_VARIANTS, table)
    return table


def call_probe(probe: Callable[..., Any], model: Model, wanted: Mapping[str, Any], ctx: PassContext,
               **options: Any) -> Any:
    """The target's per-layer probe on ``wanted``, given the calibration data when it takes it (so layers are
    timed at their real input shapes)."""
    import inspect

    try:
        takes = "calibration" in inspect.signature(probe).parameters
    except (TypeError, ValueError):
        takes = False
    if takes and ctx.calibration is not None:
        options["calibration"] = ctx.calibration
    return probe(model, wanted, ctx.progress, **options)


def _evaluator(model: Model, ctx: PassContext, group_size: int) -> Callable[[Mapping[str, int]], float]:
    if ctx.evaluation is None:
        raise UsageError("an accuracy-drop budget needs a way to measure a plan's accuracy: give evaluation data "
                         "(--eval FILE), or use avg-bits/size")
    ctx.records.setdefault("notes", []).append(
        "accuracy-drop budget: plans were scored on the evaluation data, so its figures are not independent")
    return plan_evaluator(model, ctx.evaluation, block_size=group_size)


def _never_slower_than_fp32(problem: Problem, budget: Budget,
                            latency: Mapping[str, Mapping[Any, float]] | None) -> tuple[Problem, dict[str, Any]]:
    """Drop widths measured slower than the layer's fp32, unless the budget needs them."""
    if not latency:
        return problem, {}
    dropped: dict[str, dict[str, Any]] = {}
    allowed: dict[str, list[int]] = {}
    for layer in problem.layers:
        try:
            fp32 = layer.candidate(FLOAT_BITS).cost.get(LATENCY)
        except KeyError:
            continue
        if fp32 is None or fp32 != fp32:  # no fp32 measurement: nothing to compare with
            continue
        slower = {c.bits: c.cost[LATENCY] for c in layer.candidates
                  if c.bits != FLOAT_BITS and c.cost[LATENCY] == c.cost[LATENCY] and c.cost[LATENCY] > fp32}
        if slower:
            allowed[layer.id] = [b for b in layer.widths if b not in slower]
            dropped[layer.id] = {"fp32_seconds": fp32, "slower": {str(b): s for b, s in slower.items()}}
    if not dropped:
        return problem, {}
    restricted = problem.restrict(allowed)
    try:
        check_feasible(restricted, budget)
    except UsageError as err:
        return problem, {"applied": False, "dropped": dropped,
                         "why": f"the budget needs widths slower than fp32: {err}"}
    kept = {lid: f"every quantized width measured slower than fp32 ({info['fp32_seconds']:.3g} s)"
            for lid, info in dropped.items() if restricted.layer(lid).widths == (FLOAT_BITS,)}
    return restricted, {"applied": True, "dropped": dropped, "kept_fp32": kept}


def _measure_frontier(model: Model, ctx: PassContext, frontier: list[Any], allocation: Allocation,
                      group_size: int) -> list[dict[str, Any]]:
    """Accuracy (or top-1 agreement with fp32) of up to ``MEASURED_POINTS`` frontier plans and the chosen one,
    measured on the evaluation data, so the report plots real quality against size."""
    evaluate = plan_evaluator(model, ctx.evaluation, block_size=group_size)
    ctx.progress(f"sweep: measuring {min(len(frontier), MEASURED_POINTS)} frontier plans on the evaluation data")
    measured = []
    for point in _thin(frontier, MEASURED_POINTS):
        measured.append({**point.as_record(), "quality": evaluate(point.plan)})
    measured.append({"cost": None, "loss": allocation.loss, "totals": dict(allocation.totals),
                     "quality": evaluate(dict(allocation.plan)), "chosen": True})
    return measured


def _thin(points: list[Any], limit: int) -> list[Any]:
    if len(points) <= limit:
        return list(points)
    step = (len(points) - 1) / (limit - 1)
    return [points[round(i * step)] for i in range(limit)]


__all__ = ["AllocateBits", "AllocateBitsConfig"]
