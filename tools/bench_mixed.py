"""Benchmark: bitpass mixed precision against ONNX Runtime's quantizers, uniform and random allocations.

    python -m bitpass.tools.bench_mixed            # full run (< 5 min on 2 cores)
    python -m bitpass.tools.bench_mixed --quick    # fewer budgets, rounds and random plans (< 90 s)

For the project's digits CNN and digits transformer (``bitpass.tools.zoo``), every variant is built
in one run and measured side by side:

* fp32 (the model after bitpass's fp32 folding and fusion: the reference of every ratio);
* ONNX Runtime ``quantize_static`` (QDQ, int8 per-channel S8S8, its own MinMax calibration on the
  same calibration set) and ``quantize_dynamic`` (int8);
* bitpass ``mixed`` at several budgets: Hessian-guided (Hutchinson) allocation by ILP, each width
  in the fastest format measured not slower than fp32 on this machine;
* uniform allocations (every layer the same width, ``set-bits(layers='*',weight=B,activation=32,
  format=packed)`` then ``quantize``);
* random allocations: many seeded random per-layer plans, the one with the most weight bytes not
  above the bitpass plan's is kept.

Quality is held-out accuracy (CNN), or cosine of the embeddings and top-1 agreement of the trained
head's predictions to fp32 (transformer: its output is an embedding). Latency ratios (fp32 / variant;
> 1 is faster) at batch 1 and 64 are medians of per-round ratios with all variants alternating in a
fresh process without torch (NOTES.md: torch in the process perturbs ONNX Runtime timings).

The comparison "at equal weight bytes" materializes the bitpass plan, the uniform plan and the random
plan in the same ``packed`` format, so only the allocation differs: WIN when bitpass's quality is
higher than both, TIE when equal to the better one, LOSS otherwise. It is printed as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SEED = 0


def _carried():
    """The analyses the benchmark carries from the shared preparation to each variant."""
    from bitpass.passes.analyses import ACTIVATION_RANGES, LATENCY_VARIANTS, SENSITIVITY, SENSITIVITY_BITS

    return (ACTIVATION_RANGES, SENSITIVITY, SENSITIVITY_BITS, LATENCY_VARIANTS)


@dataclass
class Variant:
    name: str
    kind: str  # fp32, ort, bitpass, uniform, random
    model_bytes: bytes
    weight_bytes: int
    plan_bytes: float | None = None  # quantizable-layer bytes by bitpass's size accounting (plans only)
    avg_bits: float | None = None
    quality: dict[str, float] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    per_sample: Any = None  # each held-out sample's score, for paired tests (bench_pruning)


@dataclass
class Prepared:
    """A model optimized, calibrated and analysed once; variants start from clones of it."""

    name: str
    base: Any  # bitpass Model (fp32, folded and fused, with sensitivity annotations)
    analyses: dict[str, Any]
    calibration: Any  # Dataset
    eval_x: np.ndarray
    eval_y: np.ndarray
    input_name: str
    head: tuple[np.ndarray, np.ndarray] | None  # transformer: the classification head (W, b)
    problem: Any = None  # allocation Problem (sizes and Ω per layer and width)
    reference: list[np.ndarray] | None = None


# --------------------------------------------------------------------------- preparation (torch)
def prepare(name: str, *, latency_probe: bool, say) -> Prepared:
    import torch

    from bitpass.backends.onnxruntime import OnnxRuntimeBackend
    from bitpass.frontend import from_arrays, from_torch
    from bitpass.passes.allocation.problem import Problem
    from bitpass.passes.infra import PassContext, Target
    from bitpass.plugins import default_registry
    from bitpass.tools import zoo

    start = time.perf_counter()
    with zoo.single_thread():
        if name == "cnn":
            module, split = zoo.trained_digits_cnn(SEED)
            head = None
        else:
            module, split = zoo.trained_digits_transformer(SEED)
            head = (module.classifier.head.weight.detach().numpy().T.copy(),
                    module.classifier.head.bias.detach().numpy().copy())
        model = from_torch(module, (torch.zeros(1, 1, 8, 8),))
        input_name = model.inputs[0].name
        # the CNN's calibration set is labelled (cross-entropy on the labels); the transformer's output is an
        # embedding, so it is calibrated without labels (pseudo-labels from the fp32 model itself)
        calib = {input_name: split.calib_x} | ({"labels": split.calib_y} if name == "cnn" else {})
        calibration = from_arrays(calib, model.inputs)
        backend = OnnxRuntimeBackend()
        options: dict[str, Any] = {"capabilities": backend.capabilities("cpu")}
        if latency_probe:
            options["latency_probe"] = backend.latency_probe("cpu")
        ctx = PassContext(calibration=calibration, target=Target("onnxruntime", "cpu", options), seed=SEED)
        prefix = default_registry().pipeline(
            "fold-constants,eliminate-dead-nodes,fuse,calibrate(method=minmax),sensitivity(method=hutchinson)")
        base = prefix.run(model, ctx)
    analyses = {k: ctx.analyses.require(k) for k in _carried() if ctx.analyses.cached(k)}
    prepared = Prepared(name, base, analyses, calibration, split.eval_x, split.eval_y, input_name, head)
    prepared.problem = Problem.from_model(base, analyses["sensitivity"], widths=options["capabilities"])
    say(f"{name}: trained, exported and analysed in {time.perf_counter() - start:.1f} s "
        f"({len(base.layers())} layers, sensitivity {ctx.records['sensitivity']['method']})")
    return prepared


def context(prepared: Prepared, *, latency_probe: bool):
    from bitpass.backends.onnxruntime import OnnxRuntimeBackend
    from bitpass.passes.infra import PassContext, Target

    backend = OnnxRuntimeBackend()
    options: dict[str, Any] = {"capabilities": backend.capabilities("cpu")}
    if latency_probe:
        options["latency_probe"] = backend.latency_probe("cpu")
    ctx = PassContext(calibration=prepared.calibration, target=Target("onnxruntime", "cpu", options), seed=SEED)
    for key, value in prepared.analyses.items():
        ctx.analyses.put(key, value)
    return ctx


def _plan_bytes(prepared: Prepared, plan: Mapping[str, int]) -> float:
    return prepared.problem.cost(plan, "size")


def _materialize(prepared: Prepared, plan: Mapping[str, int]):
    """The model with ``plan``'s widths stored packed (fp32 compute): only the allocation differs between plans."""
    from bitpass.passes.materialize import materialize, packed_plan

    return materialize(prepared.base, packed_plan(plan))


def _bitpass(prepared: Prepared, budget: str, analyses: dict[str, Any]) -> tuple[Any, dict[str, int]]:
    """The ``mixed`` pipeline's allocate-bits + quantize on the prepared model (formats measured: auto)."""
    from bitpass.passes.allocation.passes import AllocateBits
    from bitpass.passes.analyses import LATENCY_VARIANTS
    from bitpass.passes.pipeline import Pipeline
    from bitpass.passes.quantize import Quantize

    ctx = context(prepared, latency_probe=True)
    for key, value in analyses.items():  # the per-layer latency table, measured once per model
        ctx.analyses.put(key, value)
    model = Pipeline([AllocateBits(budget=budget), Quantize()]).run(prepared.base.clone(), ctx, verify=False)
    if ctx.analyses.cached(LATENCY_VARIANTS):
        analyses[LATENCY_VARIANTS] = ctx.analyses.require(LATENCY_VARIANTS)
    return model, dict(ctx.records["allocation"]["plan"])


def _ort_quantized(prepared: Prepared, dynamic: bool) -> bytes:
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)

    from bitpass.passes.execution import quiet

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            x = prepared.calibration.inputs[prepared.input_name]
            self.batches = iter([{prepared.input_name: x[i:i + 32]} for i in range(0, len(x), 32)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp, quiet():
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "q.onnx"
        proto = prepared.base.to_proto()
        del proto.graph.value_info[:]
        onnx.save(proto, src)
        if dynamic:
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True)
        else:
            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        return dst.read_bytes()


def _random_plan(prepared: Prepared, limit: float, samples: int, rng: np.random.Generator) -> dict[str, int] | None:
    """Among ``samples`` random plans (each layer a random offered width), the one with the most bytes <= limit."""
    problem = prepared.problem
    widths = [np.array(layer.widths) for layer in problem.layers]
    sizes = problem.cost_matrix("size")
    picks = np.stack([rng.integers(0, len(w), samples) for w in widths])  # (layers, samples)
    totals = float(problem.base.get("size", 0.0)) + sum(sizes[i][picks[i]] for i in range(len(widths)))
    fits = np.flatnonzero(totals <= limit * (1 + 1e-9))
    if not len(fits):
        return None
    best = fits[np.argmax(totals[fits])]
    return {layer.id: int(widths[i][picks[i, best]]) for i, layer in enumerate(problem.layers)}


def _uniform_plan(prepared: Prepared, bits: int) -> dict[str, int]:
    return {layer.id: bits for layer in prepared.problem.layers}


def _largest_uniform(prepared: Prepared, limit: float) -> tuple[int, dict[str, int]] | None:
    for bits in (32, 8, 4, 2):
        plan = _uniform_plan(prepared, bits)
        if _plan_bytes(prepared, plan) <= limit * (1 + 1e-9):
            return bits, plan
    return None


# --------------------------------------------------------------------------- quality
def outputs(model_bytes: bytes, prepared: Prepared) -> np.ndarray:
    from bitpass.backends.onnxruntime.runner import OrtRunner

    runner = OrtRunner.from_bytes(model_bytes, threads=1)
    return runner.run({prepared.input_name: prepared.eval_x})[0]


def quality(prepared: Prepared, out: np.ndarray) -> dict[str, float]:
    ref = prepared.reference
    assert ref is not None
    if prepared.head is None:
        return {"accuracy": float((out.argmax(1) == prepared.eval_y).mean()),
                "agreement": float((out.argmax(1) == ref[0].argmax(1)).mean())}
    from bitpass.backends.measure import cosines

    w, b = prepared.head
    a, r = out.astype(np.float64), ref[0].astype(np.float64)
    cosine = float(np.mean(cosines(r, a)))
    pred, ref_pred = (a @ w + b).argmax(1), (r @ w + b).argmax(1)
    return {"cosine": cosine, "agreement": float((pred == ref_pred).mean()),
            "accuracy": float((pred == prepared.eval_y).mean())}


def score(prepared: Prepared, variant: Variant) -> float:
    return variant.quality["cosine"] if prepared.head is not None else variant.quality["accuracy"]


# --------------------------------------------------------------------------- latency (fresh process)
def time_in_subprocess(variants: list[Variant], quick: bool, say) -> None:
    """Batch-1 and batch-64 ratios fp32/variant, all variants alternating, in a process without torch."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = []
        for i, variant in enumerate(variants):
            (folder / f"{i}.onnx").write_bytes(variant.model_bytes)
            names.append(variant.name)
        (folder / "names.json").write_text(json.dumps(names))
        command = [sys.executable, "-m", "bitpass.tools.bench_mixed", "--time-dir", str(folder)]
        if quick:
            command.append("--quick")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            say(f"timing subprocess failed: {done.stderr.strip().splitlines()[-1:]}")
            return
        ratios = json.loads((folder / "ratios.json").read_text())
    for variant in variants:
        variant.latency = ratios.get(variant.name, {})


def _time_directory(folder: Path, quick: bool) -> None:
    """The timing half (run in a fresh process): writes ratios.json beside the models."""
    from bitpass.backends.measure import latency_samples
    from bitpass.backends.onnxruntime.runner import OrtRunner

    names = json.loads((folder / "names.json").read_text())
    runners = {name: OrtRunner.from_bytes((folder / f"{i}.onnx").read_bytes(), for_timing=True)
               for i, name in enumerate(names)}
    input_name = next(iter(runners.values())).input_names[0]
    rng = np.random.default_rng(SEED)
    ratios: dict[str, dict[str, float]] = {name: {} for name in names}
    for batch in (1, 64):
        feeds = {input_name: rng.random((batch, 1, 8, 8), dtype=np.float32)}
        samples = latency_samples(runners, feeds, rounds=7 if quick else 15, min_seconds=0.01 if quick else 0.02)
        fp32 = np.array(samples[names[0]])
        for name in names:
            ratios[name][f"batch_{batch}"] = float(np.median(fp32 / np.array(samples[name])))
            ratios[name][f"ms_{batch}"] = 1e3 * float(np.median(samples[name]))
    (folder / "ratios.json").write_text(json.dumps(ratios))


# --------------------------------------------------------------------------- the benchmark of one model
def bench_model(name: str, *, quick: bool, say) -> dict[str, Any]:
    from bitpass.frontend import from_proto

    import onnx

    prepared = prepare(name, latency_probe=True, say=say)
    fp32_bytes = prepared.base.to_bytes()
    prepared.reference = [outputs(fp32_bytes, prepared)]
    fp32_weight = prepared.base.weight_bytes()
    variants: list[Variant] = [Variant("fp32", "fp32", fp32_bytes, fp32_weight, _plan_bytes(
        prepared, _uniform_plan(prepared, 32)), 32.0)]

    def add(variant: Variant) -> Variant:
        variant.quality = quality(prepared, outputs(variant.model_bytes, prepared))
        variants.append(variant)
        return variant

    def weight_bytes_of(model_bytes: bytes) -> int:
        return from_proto(onnx.load_model_from_string(model_bytes), name="variant").weight_bytes()

    start = time.perf_counter()
    for dynamic in (False, True):
        data = _ort_quantized(prepared, dynamic)
        add(Variant(f"ORT quantize_{'dynamic' if dynamic else 'static'} int8", "ort", data, weight_bytes_of(data)))
    say(f"{name}: ONNX Runtime quantizers in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    for bits in (8, 4, 2):
        model = _materialize(prepared, _uniform_plan(prepared, bits))
        plan = _uniform_plan(prepared, bits)
        add(Variant(f"uniform {bits}-bit (packed)", "uniform", model.to_bytes(), model.weight_bytes(),
                    _plan_bytes(prepared, plan), float(bits)))
    say(f"{name}: uniform allocations in {time.perf_counter() - start:.1f} s")

    # bitpass at several budgets; the size budget sits between uniform 2- and 4-bit bytes
    size_2 = _plan_bytes(prepared, _uniform_plan(prepared, 2))
    size_4 = _plan_bytes(prepared, _uniform_plan(prepared, 4))
    size_8 = _plan_bytes(prepared, _uniform_plan(prepared, 8))
    size_budget = f"size={int(size_2 + 0.5 * (size_4 - size_2))}"
    budgets = ["avg-bits=5", "avg-bits=3", size_budget] if quick else \
        ["avg-bits=8", "avg-bits=6", "avg-bits=5", "avg-bits=4", "avg-bits=3", "avg-bits=2.5", "avg-bits=2.25", size_budget,
         f"size={int(size_4 + 0.5 * (size_8 - size_4))}"]
    shared: dict[str, Any] = {}
    plans: dict[str, dict[str, int]] = {}
    start = time.perf_counter()
    for budget in budgets:
        model, plan = _bitpass(prepared, budget, shared)
        plans[budget] = plan
        totals = prepared.problem.totals(plan)
        add(Variant(f"bitpass {budget}", "bitpass", model.to_bytes(), model.weight_bytes(), totals["size"],
                    totals["avg-bits"]))
    say(f"{name}: bitpass mixed at {len(budgets)} budgets in {time.perf_counter() - start:.1f} s "
        f"(includes the one-off per-layer latency probe)")

    # at equal weight bytes: the bitpass plan, the largest uniform plan and the best-fitting random plan,
    # all packed (fp32 speed) so that only the allocation differs
    rng = np.random.default_rng(SEED)
    samples = 500 if quick else 5000
    compare_budgets = list(budgets)
    comparisons = []
    start = time.perf_counter()
    for budget in compare_budgets:
        plan = plans[budget]
        limit = _plan_bytes(prepared, plan)
        row: dict[str, Any] = {"budget": budget, "bytes": limit}
        bp = add(Variant(f"  = bitpass {budget} (packed)", "bitpass-packed",
                         _materialize(prepared, plan).to_bytes(), 0, limit, prepared.problem.totals(plan)["avg-bits"]))
        row["bitpass"] = bp
        uniform = _largest_uniform(prepared, limit)
        if uniform is not None:
            bits, uplan = uniform
            row["uniform"] = next(v for v in variants if v.name == f"uniform {bits}-bit (packed)") if bits < 32 \
                else variants[0]
        rplan = _random_plan(prepared, limit, samples, rng)
        if rplan is not None:
            model = _materialize(prepared, rplan)
            rb = _plan_bytes(prepared, rplan)
            row["random"] = add(Variant(f"  random <= {budget} (best of {samples})", "random", model.to_bytes(),
                                        model.weight_bytes(), rb, prepared.problem.totals(rplan)["avg-bits"]))
            row["random_plan"] = rplan
        row["plan"] = plan
        comparisons.append(row)
    for variant in variants:
        if variant.weight_bytes == 0:
            variant.weight_bytes = weight_bytes_of(variant.model_bytes)
    say(f"{name}: random and packed comparison plans in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    time_in_subprocess(variants, quick, say)
    say(f"{name}: latency of {len(variants)} variants (alternating, fresh process) in "
        f"{time.perf_counter() - start:.1f} s")
    return {"name": name, "prepared": prepared, "variants": variants, "comparisons": comparisons,
            "fp32_weight": fp32_weight}


# --------------------------------------------------------------------------- printing
def _print_model(result: dict[str, Any]) -> None:
    prepared: Prepared = result["prepared"]
    variants: list[Variant] = result["variants"]
    transformer = prepared.head is not None
    fp32_weight = result["fp32_weight"]
    title = ("digits transformer (2-layer pre-norm encoder, d=64, output = embedding)" if transformer
             else "digits CNN (3 conv + 2 linear)")
    print(f"\n== {title}: {len(prepared.base.layers())} quantizable layers, "
          f"{sum(layer.params for layer in prepared.base.layers()):,} weights; "
          f"{len(prepared.eval_x)} held-out samples ==")
    quality_head = "  cosine  top1-agr  head-acc" if transformer else "  accuracy  top1-agr"
    print(f"{'variant':<42} {'weight B':>9} {'ratio':>6} {'avg bits':>8}{quality_head}  {'b1 x':>6} {'b64 x':>6}")
    for v in variants:
        q = v.quality if v.kind != "fp32" else quality(prepared, prepared.reference[0])
        shown = (f"  {q['cosine']:.5f}  {q['agreement']:8.4f}  {q['accuracy']:8.4f}" if transformer
                 else f"  {q['accuracy']:8.4f}  {q['agreement']:8.4f}")
        bits = f"{v.avg_bits:8.2f}" if v.avg_bits is not None else f"{'-':>8}"
        lat = (f"{v.latency.get('batch_1', float('nan')):6.2f} {v.latency.get('batch_64', float('nan')):6.2f}"
               if v.latency else f"{'-':>6} {'-':>6}")
        print(f"{v.name:<42} {v.weight_bytes:>9,} {v.weight_bytes / fp32_weight:6.3f} {bits}{shown}  {lat}")
    fp32 = variants[0].latency
    if fp32:
        print(f"(fp32 latency: {fp32['ms_1']:.3f} ms at batch 1, {fp32['ms_64']:.3f} ms at batch 64; "
              "'x' = fp32 time / variant time, median of per-round ratios; > 1 is faster)")

    metric = "cosine to fp32 embeddings" if transformer else "held-out accuracy"
    print(f"\nAt equal weight bytes, Hessian-guided allocation beats uniform and random ({metric}; "
          "all three packed; bytes = the plan's size in bitpass's accounting: weights, scales, other constants):")
    print(f"{'budget':<14} {'bytes<=':>8} | {'bitpass (hutchinson)':>26} | {'uniform':>22} | {'random':>22} | result")
    wins = 0
    for row in result["comparisons"]:
        bp: Variant = row["bitpass"]
        cells = []
        scores = []
        for key in ("uniform", "random"):
            other: Variant | None = row.get(key)
            if other is None:
                cells.append(f"{'(none fits)':>22}")
                continue
            scores.append(score(prepared, other))
            label = f"{other.avg_bits:.0f}-bit" if key == "uniform" else f"{other.avg_bits:.2f} b"
            cells.append(f"{_fmt(score(prepared, other), transformer)} {int(other.plan_bytes):>7,}B {label:>6}")
        if row.get("random_plan") == row["plan"]:
            cells[1] = cells[1][:-1] + "="  # '=': the random search found the bitpass plan itself
        mine = score(prepared, bp)
        best_other = max(scores) if scores else -np.inf
        verdict = "WIN" if mine > best_other else ("TIE" if mine == best_other else "LOSS")
        wins += verdict == "WIN"
        print(f"{row['budget']:<14} {int(row['bytes']):>8,} | {_fmt(mine, transformer)} {int(bp.plan_bytes):>7,}B "
              f"{bp.avg_bits:5.2f} b | {cells[0]} | {cells[1]} | {verdict}")
    print(f"bitpass wins {wins} of {len(result['comparisons'])} points. (A random cell ending in '=' is the bitpass "
          "plan itself: with few layers, the random plan closest in bytes is the budget-filling ILP plan.)")
    for row in result["comparisons"]:
        print(f"  plan {row['budget']}: " + ", ".join(f"{k}={b}" for k, b in row["plan"].items()))
    scores = prepared.analyses.get("sensitivity", {})
    print("  hutchinson average trace per layer: " + ", ".join(f"{k}={v:.3g}" for k, v in scores.items()))


def _fmt(value: float, transformer: bool) -> str:
    return f"{value:.5f}" if transformer else f"{value:7.4f}"


def ilp_solve_time(layers: int = 200, repeats: int = 5) -> tuple[float, list[float]]:
    """Median seconds for the ILP on a synthetic problem of ``layers`` layers x 4 widths (avg-bits=4)."""
    from bitpass.passes.allocation.problem import random_problem
    from bitpass.passes.allocation.solvers import solve

    problem = random_problem(layers, SEED)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        solve(problem, "avg-bits=4", "ilp")
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bitpass.tools.bench_mixed",
        description="Benchmark bitpass mixed precision against ONNX Runtime's quantize_static/quantize_dynamic, "
                    "fp32, uniform and random allocations on the project's digits CNN and transformer; prints one "
                    "table per model, the equal-bytes comparison (WIN/LOSS per budget) and the ILP solve time.",
        epilog="Seeded; measured side by side in one run. Not a test: it prints what it measured.")
    parser.add_argument("--quick", action="store_true", help="fewer budgets, rounds and random plans (< 90 s)")
    parser.add_argument("--models", default="cnn,transformer", help="comma-separated: cnn, transformer")
    parser.add_argument("--time-dir", help=argparse.SUPPRESS)  # internal: the timing subprocess
    args = parser.parse_args(argv)
    if args.time_dir:
        _time_directory(Path(args.time_dir), args.quick)
        return 0

    def say(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    import torch

    torch.manual_seed(SEED)
    start = time.perf_counter()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - {"cnn", "transformer"})
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from cnn, transformer")
    results = [bench_model(m, quick=args.quick, say=say) for m in models]
    import onnxruntime

    from bitpass.frontend.cpu import host

    print(f"bitpass mixed-precision benchmark (seed {SEED}{', quick' if args.quick else ''}); "
          f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}")
    print(host().describe())
    for result in results:
        _print_model(result)
    median, times = ilp_solve_time(200, 3 if args.quick else 5)
    print(f"\nILP solve time, synthetic 200 layers x 4 widths (32/8/4/2), avg-bits=4: median {1e3 * median:.1f} ms "
          f"over {len(times)} solves ({', '.join(f'{1e3 * t:.1f}' for t in times)} ms)")
    print(f"total benchmark time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
