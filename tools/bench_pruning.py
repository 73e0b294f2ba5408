"""Benchmark: one budget for bits and structured sparsity (``allocate-joint``), and unstructured pruning scores.

    python -m bitpass.tools.bench_pruning            # full run
    python -m bitpass.tools.bench_pruning --quick    # fewer budgets and timing rounds

Part 1, for the project's digits CNN and digits transformer (``bitpass.tools.zoo``; the preparation,
quality measures and the torch-free alternating timing are ``bench_mixed``'s): at several size
budgets (fractions of the fp32 weight bytes) three allocations by the same ILP on the same
Hessian (Hutchinson) loss estimate, each pruned with ``prune-channels`` and quantized ``packed``:

* ``bits``: per-layer widths 32/8/4/2, every channel kept (bits-only);
* ``sparsity``: fp32 weights, per-layer kept output channels 1/0.75/0.5/0.25 (sparsity-only);
* ``joint``: one (bits, kept channels) pair per layer.

Then latency budgets (``tN x``: the layers' summed time at batch 64, measured per kept channel count,
at most N × fp32's), alone and with a size budget (``sM x``): packed bits run at fp32 speed, so only
removed channels buy time and bits-only cannot meet them.

Measured: quality on held-out data (accuracy; transformer: cosine to the fp32 embeddings), the
artifact's real weight bytes, its zip-compressed size, and batch-1/64 latency ratios to fp32
(all variants alternating in one fresh process without torch). Per budget, joint vs the better
of bits-only and sparsity-only on the same held-out samples: WIN or LOSS where the paired difference
is significant (p < 0.05: exact McNemar test on accuracy, Wilcoxon signed-rank on cosine), else TIE;
the raw difference and p are printed beside every verdict that is not an exact tie.

Part 2, unstructured pruning at 50 % overall sparsity with per-layer ratios (``allocation=global``
and ``ecoflap``): magnitude vs Wanda vs GBLM on the CNN, MLP and transformer, held-out quality, with
the comparison group (row/layer) that wanda's and gblm's ``comparison=auto`` measured on calibration data.
Unstructured zeros do not shrink an ONNX Runtime artifact: only the zip shows them.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np


from bitpass.backends.artifact import deflated_size
from bitpass.frontend.cpu import host
from bitpass.tools import bench_mixed as bm

SEED = 0
MODES = ("bits", "sparsity", "joint")
#: latency budgets count the layers' measured time at this batch size
LATENCY_BATCH = 64
#: (size, latency) budgets of part 1b, as fractions of fp32 weight bytes and summed fp32 layer time
LATENCY_BUDGETS = [(None, 0.8), (None, 0.6), (0.3, 0.8), (0.15, 0.8), (0.15, 0.6)]


def _allocate(prepared: bm.Prepared, budget: int | str, mode: str):
    """``budget``: a size limit in bytes, or a budget string (``latency=`` ones time layers at batch 64)."""
    from bitpass.frontend.errors import UsageError
    from bitpass.passes.allocation.joint import AllocateJoint
    from bitpass.passes.pipeline import Pipeline, PipelineError
    from bitpass.passes.quantize import Quantize

    timed = isinstance(budget, str) and "latency" in budget
    ctx = bm.context(prepared, latency_probe=timed)
    spec = budget if isinstance(budget, str) else f"size={budget}"
    pipeline = Pipeline([AllocateJoint(budget=spec, mode=mode, latency_batch=LATENCY_BATCH), Quantize()])
    try:
        model = pipeline.run(prepared.base.clone(), ctx, verify=False)
    except PipelineError as err:
        if isinstance(err.cause, UsageError):  # this mode cannot meet the budget
            return None, None
        raise
    return model, ctx.records["allocation"]


def bench_joint(name: str, *, quick: bool, say) -> dict[str, Any]:
    prepared = bm.prepare(name, latency_probe=False, say=say)
    fp32_bytes = prepared.base.to_bytes()
    prepared.reference = [bm.outputs(fp32_bytes, prepared)]
    fp32_weight = prepared.base.weight_bytes()
    fp32 = bm.Variant("fp32", "fp32", fp32_bytes, fp32_weight)
    fp32.quality = bm.quality(prepared, prepared.reference[0])
    variants = [fp32]
    fractions = [0.6, 0.4, 0.25, 0.15, 0.1, 0.07] if quick else [0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.12,
                                                                  0.1, 0.085, 0.07]
    budgets: list[tuple[str, int | str]] = [(f"{f:5.3f}x", int(f * fp32_weight)) for f in fractions]
    for size, lat in LATENCY_BUDGETS[:3] if quick else LATENCY_BUDGETS:
        spec = f"latency={lat}x" + (f",size={int(size * fp32_weight)}" if size else "")
        budgets.append((f"t{lat}x" + (f" s{size}x" if size else ""), spec))
    rows = []
    start = time.perf_counter()
    for label, limit in budgets:
        row: dict[str, Any] = {"limit": limit, "label": label}
        for mode in MODES:
            model, record = _allocate(prepared, limit, mode)
            if model is None:
                row[mode] = None
                continue
            data = model.to_bytes()
            v = bm.Variant(f"{mode} {label}", mode, data, model.weight_bytes())
            out = bm.outputs(data, prepared)
            v.quality = bm.quality(prepared, out)
            v.per_sample = _per_sample(prepared, out)
            v.plan_bytes = record["totals"]["size"]
            row[mode] = v
            row[f"{mode}_plan"] = record["plan"]
            row[f"{mode}_zip"] = deflated_size(data)
            variants.append(v)
        rows.append(row)
    say(f"{name}: {len(variants) - 1} allocations built and measured in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    bm.time_in_subprocess(variants, quick, say)
    say(f"{name}: latency of {len(variants)} variants in {time.perf_counter() - start:.1f} s")
    return {"name": name, "prepared": prepared, "rows": rows, "fp32": fp32, "fp32_zip": deflated_size(fp32_bytes)}


def _per_sample(prepared: bm.Prepared, out: Any) -> Any:
    """Each held-out sample's score: 1/0 correct (classifier) or cosine to the fp32 embedding."""
    import numpy as np

    from bitpass.backends.measure import cosines

    if prepared.head is None:
        return (out.argmax(1) == prepared.eval_y).astype(np.float64)
    return cosines(prepared.reference[0], out)


def paired_verdict(mine, best, *, binary: bool, alpha: float = 0.05) -> tuple[str, float]:
    """WIN / LOSS only where the paired difference on the same held-out samples is significant, else TIE.

    Accuracy: exact McNemar test (a binomial test on the samples one plan gets right and the other
    wrong); cosine: Wilcoxon signed-rank. A one-sample difference out of 497 is noise, not a loss."""
    import numpy as np
    from scipy import stats

    diff = np.asarray(mine) - np.asarray(best)
    if not np.any(diff):
        return "TIE", 1.0
    if binary:
        gained, lost = int(np.sum(diff > 0)), int(np.sum(diff < 0))
        p = float(stats.binomtest(gained, gained + lost, 0.5).pvalue)
    else:
        p = float(stats.wilcoxon(diff).pvalue)
    if p >= alpha:
        return "TIE", p
    return ("WIN" if diff.mean() > 0 else "LOSS"), p


def _cell(prepared: bm.Prepared, v: bm.Variant | None, zip_bytes: int | None, transformer: bool) -> str:
    if v is None:
        return f"{'(cannot fit)':^38}"
    lat = v.latency or {}
    return (f"{bm.score(prepared, v):.4f} {v.weight_bytes:>7,} {zip_bytes or 0:>7,} "
            f"{lat.get('batch_1', float('nan')):5.2f} {lat.get('batch_64', float('nan')):5.2f}")


def print_joint(result: dict[str, Any]) -> tuple[int, int, int]:
    prepared: bm.Prepared = result["prepared"]
    transformer = prepared.head is not None
    fp32: bm.Variant = result["fp32"]
    metric = "cosine to fp32 embeddings" if transformer else "held-out accuracy"
    print(f"\n== {result['name']}: {metric}; fp32 {bm.score(prepared, fp32):.4f}, {fp32.weight_bytes:,} weight B, "
          f"zip {result['fp32_zip']:,} B; fp32 latency {fp32.latency.get('ms_1', float('nan')):.3f} ms (b1), "
          f"{fp32.latency.get('ms_64', float('nan')):.3f} ms (b64) ==")
    print("each cell: quality, real weight bytes, zip bytes, fp32/variant time at batch 1 and 64 (> 1 faster)")
    head = f"{'quality':>6} {'bytes':>7} {'zip':>7} {'b1 x':>5} {'b64 x':>5}"
    print(f"{'budget':>21} | {'bits-only  ' + head:>38} | {'sparsity-only ' + head:>38} | {'joint  ' + head:>38} | "
          "joint vs best")
    wins = ties = losses = 0
    for row in result["rows"]:
        others = [bm.score(prepared, row[m]) for m in ("bits", "sparsity") if row[m] is not None]
        joint = row["joint"]
        if joint is None:
            verdict = "-"
        elif not others:
            verdict = "WIN (only joint fits)"
            wins += 1
        else:
            rival = max((row[m] for m in ("bits", "sparsity") if row[m] is not None),
                        key=lambda v: bm.score(prepared, v))
            verdict, p = paired_verdict(joint.per_sample, rival.per_sample, binary=not transformer)
            delta = bm.score(prepared, joint) - bm.score(prepared, rival)
            if delta:
                verdict += f" ({delta:+.4f}, p={p:.2g})"
            wins += verdict.startswith("WIN")
            ties += verdict.startswith("TIE")
            losses += verdict.startswith("LOSS")
        cells = " | ".join(_cell(prepared, row[m], row.get(f"{m}_zip"), transformer) for m in MODES)
        limit = f"{row['limit']:>8,}" if isinstance(row["limit"], int) else ""
        print(f"{row['label']:>12} {limit:>8} | {cells} | {verdict}")
    print(f"joint vs max(bits-only, sparsity-only), paired test p < 0.05: {wins} WIN, {ties} TIE, {losses} LOSS")
    for row in result["rows"]:
        plan = row.get("joint_plan")
        if plan:
            pruned = {k: p["channels"] for k, p in plan.items() if p["channels"].split(" -> ")[0] !=
                      p["channels"].split(" -> ")[1]}
            print(f"  joint {row['label'].strip()}: bits " + ",".join(f"{k}={p['bits']}" for k, p in plan.items())
                  + (f"; channels {pruned}" if pruned else "; no channel removed"))
    return wins, ties, losses


# --------------------------------------------------------------------------- part 2: unstructured pruning
def bench_unstructured(name: str, *, say) -> dict[str, Any]:
    import torch

    from bitpass.frontend import from_arrays, from_torch
    from bitpass.passes.infra import PassContext
    from bitpass.passes.pipeline import Pipeline
    from bitpass.passes.pruning.passes import Prune
    from bitpass.plugins import default_registry
    from bitpass.tools import zoo

    start = time.perf_counter()
    with zoo.single_thread():
        if name == "cnn":
            module, split = zoo.trained_digits_cnn(SEED)
        elif name == "mlp":
            module, split = zoo.trained_digits_mlp(SEED)
        else:
            module, split = zoo.trained_digits_transformer(SEED)
        head = None if name != "transformer" else (module.classifier.head.weight.detach().numpy().T.copy(),
                                                   module.classifier.head.bias.detach().numpy().copy())
        model = from_torch(module, (torch.zeros(1, 1, 8, 8),))
        input_name = model.inputs[0].name
        calib = {input_name: split.calib_x} | ({"labels": split.calib_y} if name != "transformer" else {})
        ctx = PassContext(calibration=from_arrays(calib, model.inputs), seed=SEED)
        base = default_registry().pipeline("fold-constants,eliminate-dead-nodes,fuse").run(model, ctx)
        prepared = bm.Prepared(name, base, {}, ctx.calibration, split.eval_x, split.eval_y, input_name, head)
        prepared.reference = [bm.outputs(base.to_bytes(), prepared)]
        results: dict[tuple[str, str], float] = {}
        for allocation in ("global", "ecoflap"):
            for method in ("magnitude", "wanda", "gblm"):
                pctx = PassContext(calibration=ctx.calibration, seed=SEED)
                pruned = Pipeline([Prune(method=method, sparsity=0.5, allocation=allocation)]).run(
                    base.clone(), pctx, verify=False)
                out = bm.outputs(pruned.to_bytes(), prepared)
                results[(allocation, method)] = bm.score(prepared, bm.Variant("", "", b"", 0,
                                                                               quality=bm.quality(prepared, out)))
                results[(allocation, method, "per_sample")] = _per_sample(prepared, out)
                results[(allocation, method, "mse")] = float(np.mean((out.astype(np.float64) -
                                                                      prepared.reference[0]) ** 2))
                results[(allocation, method, "comparison")] = pctx.records["pruning"]["comparison"]
                results[(allocation, method, "sparsity")] = pctx.records["pruning"]["sparsity"]
    say(f"{name}: unstructured pruning compared in {time.perf_counter() - start:.1f} s")
    fp32 = bm.score(prepared, bm.Variant("", "", b"", 0, quality=bm.quality(prepared, prepared.reference[0])))
    return {"name": name, "fp32": fp32, "results": results, "transformer": head is not None}


def print_unstructured(rows: list[dict[str, Any]]) -> None:
    print("\n== unstructured pruning, 50 % overall sparsity, per-layer ratios; held-out quality "
          "(accuracy; transformer: cosine to fp32) ==")
    print("quality per method, then the held-out output error (mean squared error to the fp32 outputs, "
          "less noisy than accuracy on 497 samples)")
    print(f"{'model':<12} {'allocation':<9} {'fp32':>7} {'magnitude':>10} {'wanda':>8} {'gblm':>8} "
          f"{'sparsity':>8} {'wanda/gblm':>11} {'mse: mag':>9} {'wanda':>8} {'gblm':>8} | "
          "Wanda/GBLM lose less than magnitude?")
    for r in rows:
        for allocation in ("global", "ecoflap"):
            res = r["results"]
            mag, wan, gb = (res[(allocation, m)] for m in ("magnitude", "wanda", "gblm"))
            best = max(wan, gb)
            verdict = "YES" if best > mag else ("TIE" if best == mag else "NO (LOSS)")
            which = "wanda" if wan >= gb else "gblm"
            _, p = paired_verdict(res[(allocation, which, "per_sample")], res[(allocation, "magnitude", "per_sample")],
                                  binary=not r["transformer"])
            groups = "/".join(res[(allocation, m, "comparison")] for m in ("wanda", "gblm"))
            print(f"{r['name']:<12} {allocation:<9} {r['fp32']:7.4f} {mag:10.4f} {wan:8.4f} {gb:8.4f} "
                  f"{res[(allocation, 'magnitude', 'sparsity')]:8.3f} {groups:>11} "
                  + " ".join(f"{res[(allocation, m, 'mse')]:{w}.4g}" for m, w in
                             (("magnitude", 9), ("wanda", 8), ("gblm", 8)))
                  + f" | {verdict}"
                  + (f" ({which} {best - mag:+.4f}, paired p={p:.2g})" if verdict != "TIE" else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bitpass.tools.bench_pruning",
        description="Joint bits + structured-sparsity allocation vs bits-only and sparsity-only on the digits CNN "
                    "and transformer (quality, real bytes, zip bytes, latency, side by side), and magnitude vs "
                    "Wanda vs GBLM at 50 % unstructured sparsity on the CNN, MLP and transformer.",
        epilog="Seeded; measured side by side in one run. Not a test: it prints what it measured.")
    parser.add_argument("--quick", action="store_true", help="fewer budgets and timing rounds")
    parser.add_argument("--models", default="cnn,transformer", help="joint part: cnn, transformer")
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    import onnxruntime
    import torch

    torch.manual_seed(SEED)
    start = time.perf_counter()
    joint = [bench_joint(m.strip(), quick=args.quick, say=say) for m in args.models.split(",") if m.strip()]
    unstructured = [bench_unstructured(m, say=say) for m in ("cnn", "mlp", "transformer")]
    print(f"bitpass pruning benchmark (seed {SEED}{', quick' if args.quick else ''}); onnxruntime "
          f"{onnxruntime.__version__}, torch {torch.__version__}")
    print(host().describe())
    print("bits-only: widths 32/8/4/2, all channels; sparsity-only: fp32 weights, kept output channels "
          "1/0.75/0.5/0.25 (prune-channels, rounded to 8); joint: both. Same ILP, same Hutchinson loss estimate; "
          "quantized widths stored packed (fp32 speed); bytes = the artifact's real weight bytes.")
    totals = [0, 0, 0]
    for result in joint:
        for i, n in enumerate(print_joint(result)):
            totals[i] += n
    print(f"\noverall joint vs max(bits-only, sparsity-only): {totals[0]} WIN, {totals[1]} TIE, {totals[2]} LOSS")
    print_unstructured(unstructured)
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
