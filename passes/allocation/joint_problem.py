"""The joint allocation problem: one budget for bit widths *and* structured sparsity, a (bits, keep) pair per layer.

The ``allocate-joint`` pass picks, for every layer, a weight width ``b`` (32 = fp32, 8/4/2 stored
``packed``) and a number of kept output channels ``k`` (structured pruning, ``prune-channels``),
minimising the estimated loss increase under ``size`` / ``avg-bits`` / ``bops`` / ``latency``
budgets. Only savings the ONNX Runtime artifact really realises are counted:

* **structured sparsity** (removed output channels) shrinks the dense tensors: the producer's
  weight rows and bias, and the consumers' input columns (Conv/Gemm/MatMul after it, through
  Flatten). Unstructured zeros are *not* offered: ONNX Runtime stores and runs them densely, so
  they would save nothing in the artifact (the ``prune`` pass still makes them; their effect shows
  only as a smaller zip of the artifact, which the benchmark reports separately).
* **bits**: ``packed`` storage (2/4/8-bit codes + fp16 block scales, ``passes/packing.py``),
  which runs at exactly fp32 speed; candidate sizes are the exact bytes the packed tensors and
  their unpacking constants take (``packing.stored_bytes``), so the reported size is the artifact's.

Candidates. A layer that ``prune-channels`` can prune on its own (it traces, and no residual Add
ties it to another producer) gets every ``keep`` in ``keeps`` (default 1, 0.75, 0.5, 0.25), each
turned into a kept channel count exactly as ``prune-channels`` rounds it (``round_to``); other
layers get only ``keep = 1``. Each (bits, kept) is one ``Candidate`` of the ordinary allocation
``Problem`` whose ``bits`` field holds an **option id** ``bits * OPTION_BASE + kept`` (so the
existing solvers run unchanged, and their tie-break "prefer more bits" prefers more bits, then more
channels). ``decode`` turns an id back into (bits, kept).

Loss, in one unit. With HAWQ-V2's second-order estimate ``Ω = ½ s_l ‖Ŵ − W‖²`` (``s_l`` the
layer's average Hessian trace, or Fisher: the ``sensitivity`` analysis), ``Ŵ`` is the weight as the
artifact will compute with it: kept rows quantized exactly as ``packed`` stores them, removed rows
(and their bias entries) zero. So

    Ω(l, b, k) = ½ s_l (‖Q_b(W_kept) − W_kept‖² + ‖W_removed‖² + ‖bias_removed‖²)

is the same estimated loss increase for quantization and pruning, and the two add. Channels are
removed in ``prune-channels``' l1 order. With a per-bit sensitivity table (output-KL, Taylor),
``s_l`` is recovered from the table at the layer's lowest width so the units still agree.

Latency. A latency budget (``latency=2ms`` or ``latency=0.8x`` of the fp32 layers' summed time, at
``latency_batch``) uses the target's latency probe: each layer is really pruned to each kept count
offered and timed as a one-node model (cached per shape), and a layer whose inputs lose channels is
assumed to take proportionally less. Packed widths run at fp32 speed, so only channels buy time.

Consumer inputs. A consumer's size (and time) depends on its producer's kept channels (a product of
two choices). The first ILP assumes every consumer keeps all its inputs (an upper bound, so its plan
is within budget for sure); then the costs are re-estimated with the chosen producers' channels and
the ILP solved again, a few times (first only tightening the bound, then freely); the plan with the
least loss whose *exact* costs (every interaction counted) meet the budget is kept. A local search
with exact costs (``improve``: one layer's option at a time, the move that lowers the loss most)
then spends what the bound left unused: for latency that bound can be far off, since a consumer's
time falls with its producer's channels. The record holds the exact totals.

Modes (``mode=``): ``joint`` (both), ``bits`` (keep = 1: bits-only), ``sparsity`` (bits = 32:
fp32 weights, structured pruning only). The joint problem contains both restricted problems, so
its optimum is never worse in estimated loss than either.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from bitpass.frontend import Model
from bitpass.frontend.errors import UsageError
from bitpass.passes.allocation.budget import Budget, parse_budget
from bitpass.passes.allocation.problem import (AVG_BITS, BOPS, FLOAT_BITS, LATENCY, SIZE, Candidate, LayerChoices,
                                               Problem, layer_macs)
from bitpass.passes.allocation.solvers import Allocation, pareto_frontier, solve
from bitpass.passes.packing import dequantize_blocked, quantize_blocked, stored_bytes
from bitpass.passes.pruning import channels as pruning
from bitpass.passes.pruning.common import input_axis, output_axis

#: option id = bits * OPTION_BASE + kept output channels
OPTION_BASE = 1_000_000
DEFAULT_KEEPS = (1.0, 0.75, 0.5, 0.25)
PACKED_WIDTHS = (8, 4, 2)
#: sizes re-estimated with the chosen producers' channels at most this many times
REFINEMENTS = 4
#: then re-estimated from the last plan without the bound, at most this many times
FREE_REFINEMENTS = 6
Mode = Literal["joint", "bits", "sparsity"]


def option_id(bits: int, kept: int) -> int:
    return int(bits) * OPTION_BASE + int(kept)


def decode(option: int) -> tuple[int, int]:
    """(bits, kept channels) of an option id."""
    return int(option) // OPTION_BASE, int(option) % OPTION_BASE


# --------------------------------------------------------------------------- the joint problem
@dataclass
class JointLayer:
    """What the joint problem knows of one layer."""

    id: str
    op_type: str
    shape: tuple[int, ...]
    out_axis: int
    in_axis: int | None
    channels: int
    #: kept channel counts offered (channels first); [channels] for a layer that is not pruned
    kept: list[int]
    #: output channels in removal order (l1, lowest first, as prune-channels removes them)
    order: np.ndarray
    #: per width: per-row squared packed-quantization error (rows in ONNX output-axis order)
    row_error: dict[int, np.ndarray]
    row_norm2: np.ndarray
    #: bias bytes per channel that go with the rows (0 when the bias is not sliced with them)
    bias_bytes: int
    bias_norm2: np.ndarray | None
    sensitivity: float
    macs: float
    #: (consumer id, input axis of the consumer's weight, features per channel) that this layer's channels feed
    consumers: list[tuple[str, int, int]] = field(default_factory=list)
    why_not_pruned: str | None = None
    #: measured seconds per call with each kept channel count and every input kept (latency budgets);
    #: None when not measured. A layer whose inputs lose channels is assumed to take proportionally less.
    seconds: dict[int, float] | None = None


@dataclass
class JointProblem:
    """Layers × (bits, kept channels); builds ordinary ``Problem``s for the solvers."""

    layers: list[JointLayer]
    widths: tuple[int, ...]
    base: float
    total_params: int
    block_size: int = 32

    @property
    def by_id(self) -> dict[str, JointLayer]:
        return {layer.id: layer for layer in self.layers}

    # --- costs ------------------------------------------------------------
    def removed_inputs(self, plan: Mapping[str, int] | None) -> dict[tuple[str, int], int]:
        """{(consumer, axis): input features removed} by the producers' kept channels in ``plan``."""
        out: dict[tuple[str, int], int] = {}
        if not plan:
            return out
        for layer in self.layers:
            _, kept = decode(plan[layer.id])
            gone = layer.channels - kept
            for consumer, axis, block in layer.consumers:
                out[(consumer, axis)] = out.get((consumer, axis), 0) + gone * block
        return out

    def shape_of(self, layer: JointLayer, kept: int, removed: Mapping[tuple[str, int], int]) -> list[int]:
        shape = list(layer.shape)
        shape[layer.out_axis] = kept
        for (consumer, axis), count in removed.items():
            if consumer == layer.id:
                shape[axis] -= count
        return shape

    def layer_bytes(self, layer: JointLayer, bits: int, kept: int, removed: Mapping[tuple[str, int], int]) -> float:
        shape = self.shape_of(layer, kept, removed)
        return float(stored_bytes(tuple(shape), layer.out_axis, bits, self.block_size) + layer.bias_bytes * kept)

    def loss(self, layer: JointLayer, bits: int, kept: int) -> float:
        keep_rows = layer.order[layer.channels - kept:]
        gone_rows = layer.order[:layer.channels - kept]
        quant = float(layer.row_error[bits][keep_rows].sum()) if bits < FLOAT_BITS else 0.0
        pruned = float(layer.row_norm2[gone_rows].sum())
        if layer.bias_norm2 is not None:
            pruned += float(layer.bias_norm2[gone_rows].sum())
        return 0.5 * layer.sensitivity * (quant + pruned)

    def problem(self, mode: Mode = "joint", removed: Mapping[tuple[str, int], int] | None = None) -> Problem:
        """The allocation ``Problem`` in ``mode``; sizes with the consumer inputs ``removed`` (default: none)."""
        removed = removed or {}
        choices = []
        for layer in self.layers:
            candidates = [Candidate(option_id(bits, kept), self.loss(layer, bits, kept),
                                    self.costs(layer, bits, kept, removed))
                          for bits, kept in self.offered(layer, mode)]
            params = int(math.prod(layer.shape))
            choices.append(LayerChoices(layer.id, layer.op_type, params, tuple(candidates)))
        return Problem(tuple(choices), {SIZE: self.base, AVG_BITS: 0.0, BOPS: 0.0, LATENCY: 0.0})

    def offered(self, layer: JointLayer, mode: Mode) -> list[tuple[int, int]]:
        """The (bits, kept channels) pairs ``mode`` offers ``layer``, most bits and channels first."""
        widths = (FLOAT_BITS,) if mode == "sparsity" else self.widths
        kept_counts = [layer.channels] if mode == "bits" else layer.kept
        return [(bits, kept) for bits in sorted(widths, reverse=True) for kept in sorted(kept_counts, reverse=True)]

    def costs(self, layer: JointLayer, bits: int, kept: int, removed: Mapping[tuple[str, int], int]) -> dict[str, float]:
        """One layer's cost in every dimension at (bits, kept), its inputs reduced by ``removed``."""
        in_keep = 1.0
        if layer.in_axis is not None:
            in_keep = self.shape_of(layer, layer.channels, removed)[layer.in_axis] / max(layer.shape[layer.in_axis], 1)
        params = int(math.prod(self.shape_of(layer, kept, removed)))
        return {SIZE: self.layer_bytes(layer, bits, kept, removed),
                AVG_BITS: params * bits / self.total_params,
                BOPS: layer.macs * kept / layer.channels * in_keep * bits * (bits if bits >= 16 else 8),
                LATENCY: math.nan if layer.seconds is None else layer.seconds[kept] * in_keep}

    def exact(self, plan: Mapping[str, int]) -> dict[str, float]:
        """Totals of ``plan`` with every producer→consumer interaction counted (the artifact's figures)."""
        removed = self.removed_inputs(plan)
        return self.problem("joint", removed).totals(plan)

    def improve(self, plan: Mapping[str, int], budget: Budget, mode: Mode = "joint", bound: float | None = None,
                max_moves: int = 200) -> tuple[dict[str, int], int]:
        """Local search with exact costs: change one layer's option at a time (the move that lowers the
        estimated loss most while the exact totals meet ``budget``) until no move helps. It fills what the
        bounded ILP left unused, e.g. a consumer's latency that fell with its producer's channels.
        Returns the plan and the number of moves made."""
        by_id = self.by_id
        consumers_of = {l.id: [c for c, _, _ in l.consumers] for l in self.layers}
        limit_loss = math.inf if bound is None else bound * (1 + 1e-9) + 1e-30
        # each option's loss depends on the layer alone: computed once, not once per move
        losses = {l.id: {option_id(b, k): self.loss(l, b, k) for b, k in self.offered(l, mode)} for l in self.layers}
        plan = dict(plan)
        removed = self.removed_inputs(plan)
        per_layer = {l.id: self.costs(l, *decode(plan[l.id]), removed) for l in self.layers}
        dims = list(budget.limits)
        totals = {d: (self.base if d == SIZE else 0.0) + sum(c[d] for c in per_layer.values()) for d in dims}
        moves = 0
        while moves < max_moves:
            best_move, best_gain = None, 1e-15
            for layer in self.layers:
                current = losses[layer.id].get(plan[layer.id], self.loss(layer, *decode(plan[layer.id])))
                affected = [layer.id, *consumers_of[layer.id]]
                for option, loss in losses[layer.id].items():
                    gain = current - loss
                    if option == plan[layer.id] or gain <= best_gain or loss > limit_loss:
                        continue
                    trial_plan = {**plan, layer.id: option}
                    trial_removed = self.removed_inputs(trial_plan)
                    changed = {lid: self.costs(by_id[lid], *decode(trial_plan[lid]), trial_removed)
                               for lid in affected}
                    new = {d: totals[d] + sum(changed[lid][d] - per_layer[lid][d] for lid in affected) for d in dims}
                    if all(new[d] <= budget.limits[d] * (1 + 1e-9) + 1e-9 for d in dims):
                        best_move, best_gain = (layer.id, option, changed, new), gain
            if best_move is None:
                break
            lid, option, changed, new = best_move
            plan[lid] = option
            per_layer.update(changed)
            totals = new
            moves += 1
        return plan, moves

    # --- solving ----------------------------------------------------------
    def solve(self, budget: Budget | str, mode: Mode = "joint", method: str = "ilp") -> Allocation:
        """The least-loss plan whose exact totals meet ``budget`` (see the module doc: refinement).

        ``joint`` first solves the two restricted problems: the best of their plans bounds the optimum,
        so candidates whose loss alone exceeds it are dropped (they can never be chosen, and losses
        many orders of magnitude apart would strain the MILP's tolerances), and the answer is the
        least-loss plan of the three: never worse than bits-only or sparsity-only.
        """
        budget = parse_budget(budget)
        if mode != "joint":
            return self._solve(budget, mode, method, None)
        found = [allocation for _, allocation in self.candidates(budget, method)]
        best = min(found, key=lambda a: (a.totals["loss"] - 1e-12 * abs(a.totals["loss"]) * (a is found[-1]),
                                         a.totals.get(SIZE, 0.0)))
        return best

    def candidates(self, budget: Budget | str, method: str = "ilp") -> list[tuple[str, Allocation]]:
        """The feasible ones of the bits-only, sparsity-only and joint plans (joint last), by mode name."""
        budget = parse_budget(budget)
        found = []
        for restricted in ("bits", "sparsity"):
            try:
                found.append((restricted, self._solve(budget, restricted, method, None)))
            except UsageError:
                pass
        bound = min((a.totals["loss"] for _, a in found), default=None)
        try:
            found.append(("joint", self._solve(budget, "joint", method, bound)))
        except UsageError:
            if not found:
                raise
        return found

    def _solve(self, budget: Budget, mode: Mode, method: str, bound: float | None) -> Allocation:
        def problem(current: Mapping[str, int] | None = None, monotone: bool = True) -> Problem:
            # refining around ``current``: consumer costs with its producers' removed inputs; ``monotone``:
            # no producer keeps more channels than there, so those costs stay upper bounds (every refined
            # plan meets the budget exactly, and ``current`` itself is a candidate: loss never rises)
            built = self.problem(mode, self.removed_inputs(current))
            limit = math.inf if bound is None else bound * (1 + 1e-9) + 1e-30
            most = {lid: decode(o)[1] for lid, o in (current or {}).items()} if monotone else {}
            return built.restrict({layer.id: [c.bits for c in layer.candidates if c.loss <= limit
                                              and decode(c.bits)[1] <= most.get(layer.id, OPTION_BASE)]
                                   for layer in built.layers})

        def feasible(totals: Mapping[str, float]) -> bool:
            return all(totals[d] <= limit * (1 + 1e-9) + 1e-9 for d, limit in budget.limits.items())

        best = solve(problem(), budget, method)
        best.totals = self.exact(best.plan)
        best.notes.append(f"{mode}: costs first bounded with every consumer input kept")
        seen = {tuple(sorted(best.plan.items()))}
        # monotone rounds only tighten the bound; free rounds (a consumer's latency falls with its inputs, so
        # the bound can be far off) re-estimate from the last plan, feasible or not, and keep what is exact
        for monotone, rounds in ((True, REFINEMENTS), (False, FREE_REFINEMENTS)):
            plan = best.plan
            for round_ in range(rounds):
                try:
                    candidate = solve(problem(plan, monotone), budget, method)
                except UsageError:
                    break
                key = tuple(sorted(candidate.plan.items()))
                if key in seen:
                    break
                seen.add(key)
                plan = candidate.plan
                totals = self.exact(plan)
                if feasible(totals) and totals["loss"] < best.totals["loss"] - 1e-15:
                    candidate.totals = totals
                    candidate.notes.append(f"{mode}: costs refined with the producers' channels "
                                           f"({'monotone' if monotone else 'free'} round {round_ + 1})")
                    best = candidate
        plan, moves = self.improve(best.plan, budget, mode, bound)
        if moves:
            totals = self.exact(plan)
            if feasible(totals) and totals["loss"] < best.totals["loss"]:
                best.plan, best.totals = plan, totals
                best.notes.append(f"{mode}: {moves} local move(s) with exact costs after the ILP")
        best.loss = best.totals["loss"]
        return best

    def frontier(self, mode: Mode = "joint") -> list[dict[str, float]]:
        """The (exact size, estimated loss) frontier of ``mode`` (Pareto DP on the bounded sizes)."""
        points = pareto_frontier(self.problem(mode), SIZE)
        out = []
        for p in points:
            totals = self.exact(p.plan)
            out.append({"size": totals[SIZE], "loss": totals["loss"]})
        out.sort(key=lambda r: (r["size"], r["loss"]))
        kept, floor = [], math.inf
        for r in out:
            if r["loss"] < floor:
                kept.append(r)
                floor = r["loss"]
        return kept

    # --- building ---------------------------------------------------------
    @classmethod
    def from_model(cls, model: Model, sensitivity: Mapping[str, Any], *, widths: Iterable[int] = PACKED_WIDTHS,
                   keeps: Iterable[float] = DEFAULT_KEEPS, round_to: int = 8, min_channels: int = 1,
                   exclude: Iterable[str] = (), block_size: int = 32) -> JointProblem:
        layers = model.layers()
        if not layers:
            raise UsageError("no quantizable layers to allocate to")
        missing = [l.id for l in layers if l.id not in sensitivity]
        if missing:
            raise UsageError(f"no sensitivity for layer(s) {', '.join(missing)}: run the sensitivity pass first")
        widths = tuple(sorted({FLOAT_BITS, *(int(b) for b in widths)}, reverse=True))
        bad = [b for b in widths if b != FLOAT_BITS and b not in PACKED_WIDTHS]
        if bad:
            raise UsageError(f"joint allocation stores weights packed: widths {bad} are not among {PACKED_WIDTHS}")
        keeps = sorted({float(k) for k in keeps} | {1.0}, reverse=True)
        if any(not 0 < k <= 1 for k in keeps):
            raise UsageError(f"keep fractions {keeps} must be in (0, 1]")
        prunable, refused = _prunable(model, set(exclude))
        node_layer = {id(l.node): l.id for l in layers}
        macs = layer_macs(model, layers)
        stored = 0
        joint: list[JointLayer] = []
        for layer in layers:
            w = layer.weight_array.astype(np.float64)
            stored += int(layer.weight_array.nbytes)
            axis = output_axis(layer) if w.ndim >= 2 else 0
            channels = int(w.shape[axis]) if w.ndim else 1
            rows = np.moveaxis(w, axis, 0).reshape(channels, -1)
            s = _scalar_sensitivity(sensitivity[layer.id], rows, block_size)
            errors = {}
            for bits in widths:
                if bits < FLOAT_BITS:
                    codes, scales = quantize_blocked(rows, bits, block_size)
                    q = dequantize_blocked(codes, scales, rows.shape[1]).astype(np.float64)
                    errors[bits] = ((q - rows) ** 2).sum(axis=1)
            region = prunable.get(layer.id)
            kept = [channels]
            consumers: list[tuple[str, int, int]] = []
            bias_bytes, bias_norm2 = 0, None
            if region is not None:
                for keep in keeps:
                    if keep < 1.0:
                        kept.append(channels - pruning.count(channels, 1.0 - keep, round_to=round_to,
                                                             min_channels=min_channels))
                kept = sorted(set(kept), reverse=True)
                for node, index, ax, point in region.slices:
                    if node is layer.node:
                        if index == 2:
                            b = node.inputs[2].const_value.numpy()
                            bias_bytes = int(b.nbytes // channels)
                            bias_norm2 = (np.moveaxis(b.astype(np.float64), ax, 0).reshape(channels, -1) ** 2).sum(1)
                        continue
                    if index == 1 and id(node) in node_layer:
                        consumers.append((node_layer[id(node)], ax, point.blk))
                stored_bias = bias_bytes * channels
                stored += stored_bias
            scores = np.abs(rows).sum(axis=1)
            joint.append(JointLayer(
                id=layer.id, op_type=layer.op_type, shape=tuple(int(d) for d in w.shape), out_axis=axis,
                in_axis=input_axis(layer) if w.ndim >= 2 else None, channels=channels, kept=kept,
                order=np.argsort(scores, kind="stable"), row_error=errors, row_norm2=(rows ** 2).sum(axis=1),
                bias_bytes=bias_bytes, bias_norm2=bias_norm2, sensitivity=s,
                macs=math.nan if macs.get(layer.id) is None else float(macs[layer.id]), consumers=consumers,
                why_not_pruned=None if region is not None else refused.get(layer.id, "excluded")))
        base = float(max(0, model.weight_bytes() - stored))
        return cls(joint, widths, base, sum(l.params for l in layers) or 1, block_size)


def _scalar_sensitivity(entry: Any, rows: np.ndarray, block_size: int) -> float:
    """``s_l``: the value itself, or from a per-bit table Ω(b) = ½ s ‖Q_b(W) − W‖² at its lowest width."""
    if not isinstance(entry, Mapping):
        return float(entry)
    table = {int(k): float(v) for k, v in entry.items() if int(k) < FLOAT_BITS}
    for bits in sorted(table):
        if bits in PACKED_WIDTHS:
            codes, scales = quantize_blocked(rows, bits, block_size)
            err = float(((dequantize_blocked(codes, scales, rows.shape[1]) - rows) ** 2).sum())
            if err > 0:
                return 2.0 * table[bits] / err
    return 0.0


def _prunable(model: Model, exclude: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Layers whose channels can be removed alone: {id: region}, and {id: why not} for the others."""
    regions, refused = pruning.trace(model.layers(), lambda layer: "excluded" if layer.id in exclude else None)
    groups = pruning.group(regions, refused)
    out = {}
    for members in groups:
        if len(members) == 1:
            out[members[0]] = regions[members[0]]
        else:
            for m in members:
                refused[m] = f"tied to {', '.join(x for x in members if x != m)} (one channel set): not offered"
    return out, refused


__all__ = ["DEFAULT_KEEPS", "OPTION_BASE", "PACKED_WIDTHS", "JointLayer", "JointProblem", "Mode", "decode", "option_id"]
