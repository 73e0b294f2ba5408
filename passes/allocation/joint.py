"""The ``allocate-joint`` pass: one budget for bit widths *and* removed channels, a (bits, kept) pair per layer.

A thin pass over ``joint_problem.py`` (the problem, its loss and cost model, and its solver: read
its docstring), ``pruning/channels.py`` (channel removal) and ``materialize.py`` (the packed
weights whose output error decides between the bits-only, sparsity-only and joint plans).

Applying the plan (``apply_plan``): each pruned layer keeps its planned channel count
(``channels.prune_layer``, lowest l1 norms removed), consumers before producers (reverse graph
order: a producer's l1 row norms are taken before its own inputs are sliced, as Ω assumed), then
``bits.weight``/``bits.activation=32``/``format.weight=packed`` on every layer, for ``quantize``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pydantic

from bitpass.frontend import Model
from bitpass.frontend.errors import UsageError
from bitpass.passes.activations import model_outputs
from bitpass.passes.allocation.budget import parse_budget
from bitpass.passes.allocation.joint_problem import DEFAULT_KEEPS, PACKED_WIDTHS, JointProblem, decode
from bitpass.passes.allocation.problem import AVG_BITS, BOPS, FLOAT_BITS, LATENCY, SIZE, layer_sensitivity
from bitpass.passes.allocation.solvers import Allocation
from bitpass.passes.analyses import ACTIVATION_RANGES, BITS, BITS_ANNOTATIONS, PRUNING_REFERENCE, SENSITIVITY
from bitpass.passes.infra import AnalysisManager, Pass, PassConfig, PassContext, PassResult, make_config
from bitpass.passes.materialize import QuantizeOptions, annotate, materialize, packed_plan
from bitpass.passes.pruning import channels as pruning
from bitpass.passes.pruning.common import remember_reference


class AllocateJointConfig(PassConfig):
    #: size / avg-bits / bops / latency budgets ("size=40KB", "size=0.2x", "latency=0.8x"); combine with ','
    budget: str | list[str] = "size=0.25x"
    #: joint (bits and channels), bits (keep every channel), sparsity (fp32 weights, channels only)
    mode: Literal["joint", "bits", "sparsity"] = "joint"
    method: Literal["ilp", "pareto", "greedy"] = "ilp"
    #: quantized widths offered (32 always): packed 8/4/2
    widths: list[int] = pydantic.Field(default_factory=lambda: list(PACKED_WIDTHS))
    #: fractions of output channels a prunable layer may keep (1 always offered)
    keeps: list[float] = pydantic.Field(default_factory=lambda: list(DEFAULT_KEEPS))
    #: which ``bitpass.sensitivity.<method>`` annotation to read when the analysis is not cached
    sensitivity: str = "hutchinson"
    round_to: int = pydantic.Field(8, ge=1)
    min_channels: int = pydantic.Field(1, ge=1)
    #: layer ids never pruned (their widths are still chosen)
    exclude: list[str] = pydantic.Field(default_factory=list)
    block_size: Literal[16, 32, 64, 128, 256] = 32
    #: record the joint, bits-only and sparsity-only frontiers (exact size, estimated loss)
    sweep: bool = False
    #: measured: with calibration data, the final choice among the bits-only, sparsity-only and joint plans
    #: is the one whose outputs stay closest to fp32 on it; estimated: the least estimated loss
    choose: Literal["measured", "estimated"] = "measured"
    #: calibration samples the measured choice runs
    samples: int = pydantic.Field(128, ge=1)
    #: batch size whose measured layer latencies a latency= budget counts
    latency_batch: int = pydantic.Field(1, ge=1)

    @pydantic.field_validator("budget")
    @classmethod
    def _budget(cls, value: str | list[str]) -> str | list[str]:
        text = ",".join(value) if isinstance(value, list) else value
        if "x" in text:  # relative size / latency budgets are resolved against the model in run()
            return value
        try:
            budget = parse_budget(value)
        except UsageError as err:
            raise ValueError(str(err)) from None
        bad = set(budget.limits) - {SIZE, AVG_BITS, BOPS, LATENCY}
        if bad or budget.accuracy_drop is not None:
            raise ValueError(f"allocate-joint takes size, avg-bits, bops and latency budgets, not "
                             f"{sorted(bad) or 'accuracy'}")
        return value


class AllocateJoint(Pass):
    """Choose each layer's weight bits and kept output channels under one size/avg-bits/bops/latency budget."""

    name = "allocate-joint"
    Config = AllocateJointConfig
    requires = frozenset({SENSITIVITY})
    produces = frozenset({BITS, BITS_ANNOTATIONS})
    config: AllocateJointConfig

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        start = time.perf_counter()
        sensitivity, _ = layer_sensitivity(model, ctx.analyses, cfg.sensitivity, who=self.name)
        joint = JointProblem.from_model(model, sensitivity, widths=cfg.widths, keeps=cfg.keeps,
                                        round_to=cfg.round_to, min_channels=cfg.min_channels, exclude=cfg.exclude,
                                        block_size=cfg.block_size)
        latency_record: dict[str, Any] = {}
        if _mentions(cfg.budget, LATENCY):
            latency_record = self._measure_latency(model, ctx, joint)
        budget = parse_budget(_absolute(cfg.budget, model, latency_record.get("fp32_seconds")))
        measured: list[dict[str, Any]] = []
        if cfg.mode == "joint" and cfg.choose == "measured" and ctx.calibration is not None:
            allocation, measured = self._measured_best(model, ctx, joint, joint.candidates(budget, cfg.method))
        else:
            allocation = joint.solve(budget, cfg.mode, cfg.method)
        plan = {lid: decode(opt) for lid, opt in allocation.plan.items()}
        by_id = joint.by_id
        record: dict[str, Any] = {
            "mode": cfg.mode, "method": cfg.method, "budget": budget.describe(),
            "plan": {lid: {"bits": b, "channels": f"{by_id[lid].channels} -> {k}"} for lid, (b, k) in plan.items()},
            "totals": dict(allocation.totals), "loss_unit": "estimated loss increase, ½ s ‖Ŵ − W‖²",
            "not_pruned": {l.id: l.why_not_pruned for l in joint.layers if l.why_not_pruned},
            "notes": list(allocation.notes), "format": "packed",
        }
        if measured:
            record["measured_choice"] = measured
        if latency_record:
            record["latency"] = latency_record
        if cfg.sweep:
            record["frontiers"] = {m: joint.frontier(m) for m in ("joint", "bits", "sparsity")}
        pruned = apply_plan(model, joint, plan, ctx.analyses)
        if pruned:
            record["prune_channels"] = {lid: {"removed": removed} for lid, removed in pruned.items()}
        record["seconds"] = round(time.perf_counter() - start, 4)
        ctx.records["allocation"] = record
        ctx.analyses.put(BITS, {lid: b for lid, (b, _) in plan.items()})
        ctx.progress(f"allocate-joint({cfg.mode}): {len(plan)} layers, {len(pruned)} pruned, "
                     f"{allocation.totals[SIZE]:.0f} weight bytes")
        # channel removal keeps every tensor's name; per-tensor activation ranges stay valid bounds
        preserved = frozenset({BITS, ACTIVATION_RANGES, PRUNING_REFERENCE}) if pruned else frozenset(
            {BITS, ACTIVATION_RANGES, SENSITIVITY})
        return PassResult(model, modified=True, preserved=preserved)

    def _measure_latency(self, model: Model, ctx: PassContext, joint: JointProblem) -> dict[str, Any]:
        """Each layer's seconds per call at ``latency_batch`` with each kept channel count offered, from the
        target's latency probe (one-node models of the really pruned layer, cached per shape)."""
        probe = (ctx.target.options or {}).get("latency_probe")
        if probe is None:
            raise UsageError("a latency budget needs per-layer timings from the backend's latency probe: compile "
                             "for a backend that times layers (onnxruntime), without --no-latency")
        batch = self.config.latency_batch
        fp32 = (FLOAT_BITS, "fp32")

        def seconds(table: Mapping[str, Any], layer_id: str) -> float | None:
            row = table.get(layer_id, {}).get(fp32, {})
            return row.get(batch)

        from bitpass.passes.allocation.passes import call_probe

        full = call_probe(probe, model, {layer.id: [fp32] for layer in joint.layers}, ctx, batches=(batch,))
        not_timed = []
        for layer in joint.layers:
            base = seconds(full, layer.id)
            if base is None:  # not a timed op (an embedding lookup): its time does not change with the plan
                layer.seconds = {kept: 0.0 for kept in layer.kept}
                not_timed.append(layer.id)
                continue
            layer.seconds = {layer.channels: base}
            for kept in layer.kept:
                if kept == layer.channels:
                    continue
                trial = model.clone()
                pruning.prune_layer(trial, layer.id, kept)
                timed = seconds(call_probe(probe, trial, {layer.id: [fp32]}, ctx, batches=(batch,)), layer.id)
                layer.seconds[kept] = base * kept / layer.channels if timed is None else timed
        total = sum(layer.seconds[layer.channels] for layer in joint.layers)
        return {"batch": batch, "fp32_seconds": total, "not_timed": not_timed,
                "seconds": {l.id: {str(k): float(f"{v:.4g}") for k, v in sorted(l.seconds.items())}
                            for l in joint.layers},
                "model": "sum of one-layer timings; a layer whose inputs lose channels takes proportionally less"}

    def _measured_best(self, model: Model, ctx: PassContext, joint: JointProblem,
                       candidates: list[tuple[str, Allocation]]) -> tuple[Allocation, list[dict[str, Any]]]:
        """Of the bits-only, sparsity-only and joint plans, the one whose packed model's outputs are
        closest to fp32 on the calibration data: the loss estimate ranks removed channels and rounding
        error on one scale only roughly, so the final choice among the three is measured."""
        assert ctx.calibration is not None
        data = ctx.calibration.head(self.config.samples)
        reference = model_outputs(model, data)
        options = make_config(QuantizeOptions, {"block_size": self.config.block_size, "preprocess": False},
                              "quantize")
        scored = []
        for name, allocation in candidates:
            copy = model.clone()
            apply_plan(copy, joint, {lid: decode(opt) for lid, opt in allocation.plan.items()})
            quantized = materialize(copy, options=options)
            error = float(np.mean((model_outputs(quantized, data) - reference) ** 2))
            scored.append((error, name != "joint", allocation,  # a tie goes to the joint plan
                           {"plan": name, "output_mse": error, "estimated_loss": allocation.totals["loss"],
                            "size": allocation.totals.get(SIZE)}))
        best = min(scored, key=lambda item: (item[0], item[1]))
        return best[2], [item[3] for item in scored]


def apply_plan(model: Model, joint: JointProblem, plan: Mapping[str, tuple[int, int]],
               analyses: AnalysisManager | None = None) -> dict[str, list[int] | None]:
    """Remove the planned channels and annotate the planned bits (packed); returns each pruned layer's removed
    channels. With ``analyses``, the unpruned model is kept for ``recover`` (``pruning:reference``)."""
    # consumers before producers: each producer's l1 order is taken on its unsliced rows, as Ω assumed
    pruned: dict[str, list[int] | None] = {}
    for layer in reversed(joint.layers):
        _, kept = plan[layer.id]
        if kept < layer.channels:
            if analyses is not None:
                remember_reference(model, analyses)
            pruned[layer.id] = pruning.prune_layer(model, layer.id, kept)
    annotate(model, packed_plan({layer.id: plan[layer.id][0] for layer in model.layers()}))
    return pruned


def _items(budget: str | list[str]) -> list[tuple[str, str]]:
    items = budget if isinstance(budget, list) else str(budget).split(",")
    return [(key.strip(), value.strip()) for key, _, value in (item.strip().partition("=") for item in items)]


def _mentions(budget: str | list[str], dim: str) -> bool:
    return any(key == dim for key, _ in _items(budget))


def _absolute(budget: str | list[str], model: Model, fp32_seconds: float | None = None) -> str:
    """``size=0.25x`` (of the fp32 weight bytes) -> ``size=<bytes>``; ``latency=0.7x`` (of the fp32 layers'
    summed seconds) -> ``latency=<s>s``."""
    out = []
    for key, value in _items(budget):
        if value.endswith("x") and key == SIZE:
            value = str(int(float(value[:-1]) * model.weight_bytes()))
        elif value.endswith("x") and key == LATENCY and fp32_seconds is not None:
            value = f"{float(value[:-1]) * fp32_seconds!r}s"
        out.append(f"{key}={value}")
    return ",".join(out)


__all__ = ["AllocateJoint", "AllocateJointConfig", "apply_plan"]
