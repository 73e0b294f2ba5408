"""Benchmark: decoder LMs with a KV cache, bitpass weight-only against ONNX Runtime's quantizers.

    python -m bitpass.tools.bench_decoder                      # real-weight byte LM + GPT-2-small size
    python -m bitpass.tools.bench_decoder --models real --study # + the torch-side width study
    python -m bitpass.tools.bench_decoder --quick              # fewer rounds and windows

Models: the byte-level GPT-2 trained here (``bitpass.tools.decoders.trained_byte_lm``: trained and
cached on first use, ~30 min) and a GPT-2-small-size model with random weights (124 M parameters;
speed and memory, and fidelity to its own fp32). Each is exported once as a KV-cache graph
(``bitpass.frontend.decoder``) and every variant starts from that same fp32 graph:

* ``fp32``: the exported graph;
* ``ort-rtn4-b32`` / ``ort-rtn4-b128``: ONNX Runtime's ``MatMulNBitsQuantizer`` (RTN, asymmetric,
  accuracy_level 4) on every MatMul with a constant weight;
* ``ort-int8-dyn``: ONNX Runtime ``quantize_dynamic`` (int8 weights, dynamic int8 activations) on the
  same MatMuls;
* ``bitpass-*`` (real-weight LM): ``bitpass.passes.weight_only`` codes written as MatMulNBits, with
  Hessians from calibration windows of the *training* text: ``rtn4-g32`` (control: must match ORT's
  RTN), ``gptq4-g32``, ``gptq4-g128``, ``mixed3.5-g32`` (group-wise 2/4/8-bit slices at 3.5 average bits);
* ``bitpass-decoder`` (every model): what ``compile --budget avg-bits=4`` writes for a decoder, the named
  ``decoder`` pipeline run on the exported graph (GPTQ 4-bit group 64 MatMulNBits, 8-bit embedding tables),
  calibrated on the real LM's training windows, or on random token windows for the sized random-init models.

Measured per variant: file and weight bytes, session RSS and peak in a fresh process (after one short
prefill), decode tokens/s (one token, batch 1, after ``--past`` cached positions), prefill tokens/s
(``--prefill`` tokens from an empty cache), and on held-out windows (never trained or calibrated on):
bits per byte, mean per-token KL to fp32 and per-token top-1 agreement. Times: all variants of a model
alternate in one fresh process without torch, ONNX Runtime thread spinning off, default intra-op threads;
each figure is the median over rounds, ratios are medians of per-round ratios to fp32 with their range.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Row:
    name: str
    path: str
    file_bytes: int
    weight_bytes: int
    memory: dict[str, int] = field(default_factory=dict)
    speed: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, float] = field(default_factory=dict)


def weight_bytes(path: Path) -> int:
    """Bytes of all initializers (the weights as stored, embeddings included)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=True)
    return int(sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer))


# --------------------------------------------------------------------------- building variants (torch)
def constant_matmuls(proto: Any) -> list[str]:
    constants = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in constants]


def ort_rtn(fp32: Path, out: Path, block: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=block, is_symmetric=False,
                                     accuracy_level=4)
    quantizer.process()
    onnx.save(quantizer.model.model, str(out))


def ort_dynamic(fp32: Path, out: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = constant_matmuls(onnx.load(str(fp32), load_external_data=False))
    quantize_dynamic(str(fp32), str(out), op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                     weight_type=QuantType.QInt8)


def bitpass_weight_only(fp32_proto: Any, lm: Any, hessians: dict[str, np.ndarray], recipe: Any, out: Path) -> dict:
    """Round every linear layer with ``recipe``, write MatMulNBits, save; returns a summary."""
    import onnx

    from bitpass.passes.weight_only.apply import apply_to_onnx, quantize_layers
    from bitpass.passes.weight_only.calibration import weight_matrix

    weights = {i: weight_matrix(lm.get_submodule(i)) for i in hessians}
    layers = quantize_layers(weights, hessians, recipe)
    proto = onnx.ModelProto()
    proto.CopyFrom(fp32_proto)
    apply_to_onnx(proto, layers, accuracy_level=4)
    onnx.save(proto, str(out))
    bits = sum(float(np.mean(q.quantized.bits)) * weights[i].size for i, q in layers.items())
    return {"average_bits": bits / sum(w.size for w in weights.values()),
            "layer_bytes": sum(q.nbytes() for q in layers.values())}


def decoder_pipeline(model: Any, spec: Any, calibration: np.ndarray, out: Path) -> dict:
    """The artifact model ``compile --budget avg-bits=4`` writes for a decoder: the named ``decoder`` pipeline on
    ``model`` with token windows ``calibration``; saved to ``out``, returns the pass's summary."""
    from bitpass.frontend import from_arrays
    from bitpass.frontend.decoder import complete_lm_inputs
    from bitpass.passes.infra import PassContext
    from bitpass.plugins.registry import default_registry

    feeds, _ = complete_lm_inputs({spec.input_ids: calibration}, spec)
    ctx = PassContext(calibration=from_arrays(feeds, model.inputs))
    result = default_registry().pipeline("decoder").run(model, ctx)
    result.save(out)
    record = ctx.records["weight_only"]
    return {"average_bits": float(record["average_bits"])}


def build(name: str, lm: Any, workdir: Path, *, calibration: np.ndarray | None, say: Any,
          pipeline_calibration: np.ndarray | None = None) -> tuple[Any, list[Row]]:
    """Export ``lm`` and write every variant beside it; returns (spec, rows)."""
    import logging

    import onnx

    logging.disable(logging.INFO)  # ORT's quantizers log every node at INFO

    from bitpass.frontend.decoder import export_decoder
    from bitpass.passes.weight_only.apply import WeightOnlyRecipe
    from bitpass.passes.weight_only.calibration import layer_hessians, linear_layer_ids

    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, spec = export_decoder(lm, name=name)
    fp32 = folder / "fp32.onnx"
    model.save(fp32)
    say(f"[{name}] exported in {time.perf_counter() - started:.0f} s: {len(model.layers())} layers, {spec}")
    paths = {"fp32": fp32}
    for block in (32, 128):
        paths[f"ort-rtn4-b{block}"] = folder / f"ort-rtn4-b{block}.onnx"
        ort_rtn(fp32, paths[f"ort-rtn4-b{block}"], block)
    paths["ort-int8-dyn"] = folder / "ort-int8-dyn.onnx"
    ort_dynamic(fp32, paths["ort-int8-dyn"])
    notes: dict[str, dict] = {}
    if calibration is not None:
        started = time.perf_counter()
        ids = linear_layer_ids(lm)
        hessians = layer_hessians(lm, ids, calibration)
        say(f"[{name}] Hessians of {len(ids)} layers from {calibration.shape} calibration windows in "
            f"{time.perf_counter() - started:.0f} s")
        proto = model.to_proto()
        recipes = {"bitpass-rtn4-g32": WeightOnlyRecipe("rtn", 4, 32),
                   "bitpass-gptq4-g32": WeightOnlyRecipe("gptq", 4, 32),
                   "bitpass-gptq4-g128": WeightOnlyRecipe("gptq", 4, 128),
                   "bitpass-mixed3.5-g32": WeightOnlyRecipe("gptq", 3.5, 32, widths=(2, 4, 8))}
        for variant, recipe in recipes.items():
            started = time.perf_counter()
            paths[variant] = folder / f"{variant}.onnx"
            notes[variant] = bitpass_weight_only(proto, lm, hessians, recipe, paths[variant])
            say(f"[{name}] {variant}: {time.perf_counter() - started:.0f} s, "
                f"{notes[variant]['average_bits']:.2f} average bits")
    if pipeline_calibration is not None:
        started = time.perf_counter()
        paths["bitpass-decoder"] = folder / "bitpass-decoder.onnx"
        notes["bitpass-decoder"] = decoder_pipeline(model, spec, pipeline_calibration, paths["bitpass-decoder"])
        say(f"[{name}] bitpass-decoder (the decoder pipeline, {pipeline_calibration.shape} calibration windows): "
            f"{time.perf_counter() - started:.0f} s")
    onnx.checker.check_model(str(fp32))
    rows = [Row(v, str(p), p.stat().st_size, weight_bytes(p)) for v, p in paths.items()]
    for row in rows:
        row.fidelity.update({k: float(v) for k, v in notes.get(row.name, {}).items()})
    return spec, rows


# --------------------------------------------------------------------------- measuring (ONNX Runtime only)
def measure_fidelity(rows: list[Row], spec: Any, windows: np.ndarray, *, with_bits: bool) -> None:
    from bitpass.backends.onnxruntime.generate import DecoderSession, lm_fidelity

    reference = DecoderSession.load(rows[0].path, spec)
    for row in rows:
        candidate = reference if row.name == "fp32" else DecoderSession.load(row.path, spec)
        result = lm_fidelity(candidate, reference, windows, batch=8 if spec.vocab <= 4096 else 2)
        row.fidelity.update({"kl": result.kl, "top1_agreement": result.top1_agreement, "tokens": result.tokens})
        if with_bits:
            row.fidelity.update({"bits_per_byte": result.bits_per_byte,
                                 "bits_per_byte_increase": result.bits_per_byte_increase})


def measure_memory(rows: list[Row], spec: Any) -> None:
    from bitpass.backends.onnxruntime.generate import session_memory

    for row in rows:
        row.memory = asdict(session_memory(row.path, spec))


def time_in_fresh_process(rows: list[Row], spec: Any, *, past: int, prefill: int, rounds: int) -> None:
    request = {"paths": [r.path for r in rows], "spec": asdict(spec), "past": past, "prefill": prefill,
               "rounds": rounds}
    result = subprocess.run([sys.executable, "-m", "bitpass.tools.bench_decoder", "--time-request",
                             json.dumps(request)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"timing process failed: {result.stderr.strip()[-2000:]}")
    timings = json.loads(result.stdout.strip().splitlines()[-1])
    for row, figures in zip(rows, timings):
        row.speed = figures


def _time_request(request: dict) -> list[dict]:
    """In a fresh process (no torch): every variant alternately, ``rounds`` times."""
    from bitpass.backends.onnxruntime.generate import DecoderSession, decode_step_seconds, prefill_seconds
    from bitpass.frontend.decoder import DecoderSpec

    spec = DecoderSpec(**request["spec"])
    sessions = [DecoderSession.load(p, spec, for_timing=True) for p in request["paths"]]
    decode = np.zeros((request["rounds"], len(sessions)))
    fill = np.zeros_like(decode)
    for r in range(request["rounds"]):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))  # no variant always first
        for i in order:
            session = sessions[i]
            decode[r, i] = decode_step_seconds(session, past_length=request["past"], repeats=20)
            fill[r, i] = prefill_seconds(session, length=request["prefill"], repeats=3)
    out = []
    for i in range(len(sessions)):
        decode_ratio, fill_ratio = decode[:, 0] / decode[:, i], fill[:, 0] / fill[:, i]
        out.append({"decode_tokens_per_s": float(1 / np.median(decode[:, i])),
                    "prefill_tokens_per_s": float(request["prefill"] / np.median(fill[:, i])),
                    "decode_vs_fp32": float(np.median(decode_ratio)),
                    "decode_vs_fp32_range": [float(decode_ratio.min()), float(decode_ratio.max())],
                    "prefill_vs_fp32": float(np.median(fill_ratio)),
                    "prefill_vs_fp32_range": [float(fill_ratio.min()), float(fill_ratio.max())]})
    return out


# --------------------------------------------------------------------------- the torch-side width study
def width_study(lm: Any, calibration: np.ndarray, windows: np.ndarray, say: Any,
                only: Sequence[str] = ()) -> list[dict]:
    """Held-out bits per byte of many weight-only recipes, materialized in the torch model (any width,
    3 bits included): GPTQ against RTN at equal bits, group-wise against layer-wise mixtures, LoRC, FP4/NF4/FP8
    codebooks against integer grids. ``only``: run just the recipes whose label contains one of these."""
    import copy

    import torch

    from bitpass.passes.weight_only.apply import (WeightOnlyRecipe, apply_to_torch, layerwise_widths,
                                                  quantize_groupwise, quantize_hierarchical, quantize_layers)
    from bitpass.passes.weight_only.calibration import layer_hessians, linear_layer_ids, weight_matrix
    from bitpass.tools.decoders import bits_per_byte

    ids = linear_layer_ids(lm)
    hessians = layer_hessians(lm, ids, calibration)
    weights = {i: weight_matrix(lm.get_submodule(i)) for i in ids}
    params = sum(w.size for w in weights.values())
    reference_bits = bits_per_byte(lm, windows)
    with torch.no_grad():
        reference_logp = torch.log_softmax(lm(input_ids=torch.from_numpy(windows[:, :-1])).logits, -1)

    def evaluate(label: str, recipe: Any) -> dict | None:
        if only and not any(token in label for token in only):
            return None
        layers = recipe() if callable(recipe) else quantize_layers(weights, hessians, recipe)
        variant = copy.deepcopy(lm)
        apply_to_torch(variant, layers)
        with torch.no_grad():
            logq = torch.log_softmax(variant(input_ids=torch.from_numpy(windows[:, :-1])).logits, -1)
        kl = float((reference_logp.exp() * (reference_logp - logq)).sum(-1).mean())
        bits = bits_per_byte(variant, windows)
        code_bits = sum(float(np.mean(q.quantized.bits)) * weights[i].size for i, q in layers.items()) / params
        row = {"recipe": label, "average_bits": code_bits, "layer_bytes": sum(q.nbytes() for q in layers.values()),
               "bits_per_byte": bits, "increase": bits / reference_bits - 1, "kl": kl}
        say(f"  {label:34s} {code_bits:5.2f} b  {row['layer_bytes']:9,d} B  bpb {bits:.4f} "
            f"({100 * row['increase']:+.2f} %)  KL {kl:.5f}")
        return row

    say(f"width study: fp32 held-out bits per byte {reference_bits:.4f}, {len(ids)} layers, {params:,} parameters")
    rows = [{"recipe": "fp32", "average_bits": 32.0, "layer_bytes": 4 * params, "bits_per_byte": reference_bits,
             "increase": 0.0, "kl": 0.0}]
    for bits in (4, 3, 2):
        for group in (32, 128):
            rows.append(evaluate(f"rtn{bits}-g{group}", WeightOnlyRecipe("rtn", bits, group)))
            rows.append(evaluate(f"gptq{bits}-g{group}", WeightOnlyRecipe("gptq", bits, group)))
            rows.append(evaluate(f"gptq{bits}-g{group}-act-order", WeightOnlyRecipe("gptq", bits, group,
                                                                                   act_order=True)))
    # floating-point and normal-float codebooks against integer grids at the same code width and group size
    # (codebooks store no zero point, so they are the smaller by one byte per 2 groups at 4 bits)
    for grid, group in (("nf4", 32), ("fp4", 32), ("nf4", 128), ("fp4", 128), ("fp8", 128)):
        bits = 8 if grid == "fp8" else 4
        for method in ("rtn", "gptq"):
            rows.append(evaluate(f"{method}-{grid}-g{group}", WeightOnlyRecipe(method, bits, group, grid=grid)))
    for method in ("rtn", "gptq"):
        rows.append(evaluate(f"{method}8-g128", WeightOnlyRecipe(method, 8, 128)))
    for widths in ((2, 3, 4, 8), (2, 4, 8), (3, 4)):
        rows.append(evaluate(f"per-layer group-wise 3.5 {widths} gptq", WeightOnlyRecipe("gptq", 3.5, 32, widths=widths)))
    for widths, proxy in (((3, 4), "rtn"), ((3, 4), "gptq"), ((2, 3, 4, 8), "gptq")):
        rows.append(evaluate(f"model-wide group-wise 3.5 {widths} {proxy}-proxy",
                             lambda w=widths, p=proxy: quantize_groupwise(weights, hessians, 3.5, widths=w, proxy=p)))
    if not only or any(token in "layer-wise 3/4 at 3.5 gptq" for token in only):
        per_layer = layerwise_widths(weights, hessians, (3, 4), 3.5)
        rows.append(evaluate("layer-wise 3/4 at 3.5 gptq", {i: WeightOnlyRecipe("gptq", b, 32) for i, b in
                                                           per_layer.items()}))
    # two levels: salient slices widened inside each layer (SliM-LLM), the layers' 3/4 mixtures chosen under one
    # budget by their measured GPTQ errors; steps=1 is the per-layer 3/4 mixture judged by the same errors
    for steps in (1, 2, 4, 8):
        kind = "layer-wise 3/4 at 3.5 gptq, measured errors" if steps == 1 else \
            f"two-level group-wise 3/4 at 3.5, 1/{steps} steps"
        rows.append(evaluate(kind, lambda s=steps: quantize_hierarchical(weights, hessians, 3.5, steps=s)))
    # the same mixtures judged by the model's output KL to fp32 with only that layer quantized, on the
    # calibration windows (never the held-out ones): layers weigh by their effect on the output
    calibration_logp: list[Any] = []

    def output_kl(layer_id: str, quantized: Any) -> float:
        from bitpass.passes.weight_only.calibration import set_weight_matrix

        if not calibration_logp:
            with torch.no_grad():
                calibration_logp.append(torch.log_softmax(lm(input_ids=torch.from_numpy(kl_windows)).logits, -1))
        variant = copy.deepcopy(lm)
        from bitpass.passes.weight_only.calibration import untie_output_embedding

        untie_output_embedding(variant)
        set_weight_matrix(variant.get_submodule(layer_id), quantized.dequantize())
        with torch.no_grad():
            logq = torch.log_softmax(variant(input_ids=torch.from_numpy(kl_windows)).logits, -1)
        logp = calibration_logp[0]
        return float((logp.exp() * (logp - logq)).sum(-1).mean())

    kl_windows = calibration[:, :-1]
    for steps in (1, 2, 4, 8):
        kind = "layer-wise 3/4 at 3.5 gptq, output-KL scored" if steps == 1 else \
            f"two-level group-wise 3/4 at 3.5, 1/{steps} steps, output-KL scored"
        rows.append(evaluate(kind, lambda s=steps: quantize_hierarchical(weights, hessians, 3.5, steps=s,
                                                                         score=output_kl)))
    for rank in (4, 8):
        rows.append(evaluate(f"gptq3-g32 + LoRC rank {rank}", WeightOnlyRecipe("gptq", 3, 32, lowrank=rank)))
    return [row for row in rows if row is not None]


# --------------------------------------------------------------------------- allocations through the pass
def allocation_study(model: Any, spec: Any, calibration: np.ndarray, windows: np.ndarray, averages: Sequence[float],
                     say: Any, *, group_size: int = 32) -> list[dict]:
    """Held-out bits per byte of the ``quantize-weights`` pass's allocations of a fractional average (``group``,
    ``layer``, ``two-level`` by layer-local error and by output KL) at each of ``averages``, beside the uniform
    widths around it: every artifact written as MatMulNBits and scored in ONNX Runtime, bytes as stored."""
    from bitpass.backends.onnxruntime.generate import DecoderSession, lm_fidelity
    from bitpass.frontend import from_arrays
    from bitpass.frontend.decoder import complete_lm_inputs
    from bitpass.passes.weight_only.quantize import Quantizer, Recipe

    feeds, _ = complete_lm_inputs({spec.input_ids: calibration}, spec)
    data = from_arrays(feeds, model.inputs)
    reference = DecoderSession.load(model, spec)
    quantizer = Quantizer()  # one memo: the Hessians are taken once
    rows = []
    for average in averages:
        low, high = Recipe(bits=average).two_widths
        recipes: dict[str, Recipe] = {f"uniform {b}-bit": Recipe(bits=b, group_size=group_size) for b in (low, high)}
        recipes.update({f"group {average:g}": Recipe(bits=average, group_size=group_size, allocation="group"),
                        f"layer {average:g}": Recipe(bits=average, group_size=group_size, allocation="layer")})
        for steps in (2, 4):
            for score in ("error", "output-kl"):
                recipes[f"two-level {average:g} 1/{steps} steps {score}"] = Recipe(
                    bits=average, group_size=group_size, allocation="two-level", steps=steps, score=score)
        for label, recipe in recipes.items():
            started = time.perf_counter()
            result, outcome = quantizer(model, data, recipe)
            seconds = time.perf_counter() - started
            record = outcome.record(recipe)
            fidelity = lm_fidelity(DecoderSession.load(result, spec), reference, windows, batch=8)
            row = {"recipe": label, "average_bits": record["average_bits"],
                   "layer_bytes": int(sum(r["bytes"] for r in record["layers"].values() if "bytes" in r)),
                   "bits_per_byte": fidelity.bits_per_byte, "increase": fidelity.bits_per_byte_increase,
                   "kl": fidelity.kl, "top1_agreement": fidelity.top1_agreement, "seconds": seconds}
            rows.append(row)
            say(f"  {label:36s} {row['average_bits']:5.2f} b {row['layer_bytes']:9,d} B  bpb "
                f"{row['bits_per_byte']:.4f} ({100 * row['increase']:+.2f} %)  KL {row['kl']:.5f}  "
                f"agree {row['top1_agreement']:.3f}  {seconds:5.1f} s")
    return rows


# --------------------------------------------------------------------------- KV-cache quantization
def kv_cache_study(lm: Any, calibration: np.ndarray, windows: np.ndarray, workdir: Path, *, past: int, prefill: int,
                   rounds: int, say: Any) -> list[dict]:
    """fp32 weights with a float, int8 and int4 cache (KVQuant: per-channel keys, per-token values): decode-mode
    bits per byte (prefill 32 tokens, then one step per token), cache bytes at ``prefill`` tokens, decode speed."""
    from bitpass.backends.onnxruntime.generate import DecoderSession, lm_fidelity
    from bitpass.frontend.decoder import export_decoder
    from bitpass.passes.weight_only.kvcache import cache_bytes, key_scales, packed_cache_bytes

    folder = workdir / "real-kv"
    folder.mkdir(parents=True, exist_ok=True)
    rows, specs = [], {}
    for bits in (32, 8, 4):
        scales = key_scales(lm, calibration, bits) if bits < 32 else None
        model, spec = export_decoder(lm, kv_bits=bits, key_scales=scales)
        path = folder / f"kv{bits}.onnx"
        model.save(path)
        specs[bits] = spec
        rows.append(Row(f"fp32-weights kv{bits}", str(path), path.stat().st_size, weight_bytes(path)))
    reference = DecoderSession.load(rows[0].path, specs[32])
    ids = windows[:1, :prefill] if windows.shape[1] >= prefill else np.zeros((1, prefill), np.int64)
    for row, bits in zip(rows, (32, 8, 4)):
        session = DecoderSession.load(row.path, specs[bits])
        result = lm_fidelity(session, reference, windows, batch=16, decode_after=32)
        _, present = session.prefill(ids)
        row.fidelity.update({"bits_per_byte": result.bits_per_byte,
                             "bits_per_byte_increase": result.bits_per_byte_increase, "kl": result.kl,
                             "top1_agreement": result.top1_agreement, "cache_bytes": cache_bytes(present),
                             "cache_bytes_packed": packed_cache_bytes(present, bits) if bits < 32
                             else cache_bytes(present)})
        say(f"  kv{bits:<2d} decode-mode bpb {result.bits_per_byte:.4f} ({100 * result.bits_per_byte_increase:+.2f} %) "
            f"KL {result.kl:.5f} agree {result.top1_agreement:.3f}  cache at {prefill} tokens: "
            f"{row.fidelity['cache_bytes']:,} B (codes packed: {row.fidelity['cache_bytes_packed']:,} B)")
    time_in_fresh_process(rows, specs[32], past=past, prefill=prefill, rounds=rounds)
    for row in rows:
        say(f"  {row.name:20s} decode {row.speed['decode_tokens_per_s']:8.1f} tok/s "
            f"({row.speed['decode_vs_fp32']:.2f}x float cache)")
    return [asdict(r) for r in rows]


# --------------------------------------------------------------------------- report
def print_table(name: str, rows: list[Row], *, past: int, prefill: int) -> None:
    mb = 1e6
    print(f"\n{name}: decode = 1 token after {past} cached positions, prefill = {prefill} tokens, batch 1")
    header = (f"{'variant':22s} {'file MB':>8s} {'weights MB':>10s} {'RSS MB':>7s} {'peak MB':>8s} "
              f"{'decode tok/s':>12s} {'x fp32 [range]':>18s} {'prefill tok/s':>13s} {'x fp32':>6s} "
              f"{'bits/byte':>9s} {'Δ%':>6s} {'KL':>8s} {'agree':>6s}")
    print(header)
    print("-" * len(header))
    for row in rows:
        speed, fid = row.speed, row.fidelity
        decode_range = speed.get("decode_vs_fp32_range", [float("nan")] * 2)
        bits = f"{fid['bits_per_byte']:9.4f}" if "bits_per_byte" in fid else f"{'n/a':>9s}"
        increase = f"{100 * fid['bits_per_byte_increase']:+6.2f}" if "bits_per_byte_increase" in fid else f"{'':>6s}"
        print(f"{row.name:22s} {row.file_bytes / mb:8.2f} {row.weight_bytes / mb:10.2f} "
              f"{row.memory.get('session_rss', 0) / mb:7.0f} {row.memory.get('peak_rss', 0) / mb:8.0f} "
              f"{speed.get('decode_tokens_per_s', float('nan')):12.1f} "
              f"{speed.get('decode_vs_fp32', float('nan')):6.2f} [{decode_range[0]:4.2f}-{decode_range[1]:4.2f}] "
              f"{speed.get('prefill_tokens_per_s', float('nan')):13.0f} {speed.get('prefill_vs_fp32', float('nan')):6.2f} "
              f"{bits} {increase} {fid.get('kl', float('nan')):8.5f} {fid.get('top1_agreement', float('nan')):6.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="real,gpt2-small", help="comma-separated: real, gpt2-small, gpt2-medium")
    parser.add_argument("--past", type=int, default=128, help="cached positions before the timed decode step")
    parser.add_argument("--prefill", type=int, default=128, help="prompt tokens of the timed prefill")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--windows", type=int, default=128, help="held-out windows of 129 bytes")
    parser.add_argument("--workdir", type=Path, default=Path("bench-decoder"))
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--study", action="store_true", help="add the torch-side width study (real-weight LM)")
    parser.add_argument("--study-only", metavar="A,B", default="",
                        help="only the real LM's width-study recipes whose label contains one of these (e.g. "
                             "'fp4,nf4,fp8,rtn4-g,gptq4-g,8-g128' compares the codebook formats with integer grids at "
                             "equal bytes): no speed table, no KV-cache study")
    parser.add_argument("--allocations", metavar="A,B", default="",
                        help="only the real LM's allocation study through the quantize-weights pass at these "
                             "averages (e.g. '3,6': group / layer / two-level against uniform widths, group 32)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 32 windows")
    parser.add_argument("--time-request", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_request:
        print(json.dumps(_time_request(json.loads(args.time_request))))
        return 0
    if args.quick:
        args.rounds, args.windows = 2, 32

    import onnxruntime
    import torch

    from bitpass.frontend.cpu import host
    from bitpass.tools import decoders

    torch.set_num_threads(1)  # torch work here is small; one thread was far faster on this shared machine
    say = lambda text: print(text, flush=True)  # noqa: E731
    print(host().describe())
    print(f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}; timing: variants alternate in one "
          f"fresh process without torch, ORT thread spinning off, {args.rounds} rounds")
    corpus = decoders.text_corpus()
    report: dict[str, Any] = {"cpu": host().as_dict(), "args": {k: str(v) for k, v in vars(args).items()}}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "real":
            lm = decoders.trained_byte_lm(corpus=corpus, progress=lambda s, b: say(f"  training step {s}: {b:.3f}"))
            calibration = corpus.calibration(decoders.DEFAULT_RECIPE.context, 128)
        elif name.startswith("gpt2-"):
            lm, calibration = decoders.gpt2_sized(name.split("-", 1)[1]), None
        else:
            parser.error(f"unknown model {name!r}")
        windows = corpus.evaluation(min(129, lm.config.n_positions), args.windows)
        if args.allocations:
            if name == "real":
                from bitpass.frontend.decoder import export_decoder

                model, spec = export_decoder(lm, name=name)
                say(f"allocation study: {len(windows)} held-out windows, {calibration.shape} calibration windows")
                report["allocations"] = allocation_study(
                    model, spec, calibration, windows, [float(a) for a in args.allocations.split(",") if a], say)
            continue
        if args.study_only:
            if name == "real":
                report["width_study"] = width_study(lm, calibration, windows, say,
                                                    tuple(t for t in args.study_only.split(",") if t))
            continue
        # the decoder pipeline's calibration: the real LM's training windows; for random-init sizes, text bytes
        # as token ids (only speed and memory are compared there)
        pipeline_calibration = calibration if calibration is not None else corpus.calibration(128, 16)
        spec, rows = build(name, lm, args.workdir, calibration=calibration, say=say,
                           pipeline_calibration=pipeline_calibration)
        measure_fidelity(rows, spec, windows if name == "real" else windows[:8], with_bits=name == "real")
        measure_memory(rows, spec)
        time_in_fresh_process(rows, spec, past=args.past, prefill=args.prefill, rounds=args.rounds)
        print_table(name, rows, past=args.past, prefill=args.prefill)
        report[name] = [asdict(r) for r in rows]
        if args.study and name == "real":
            report["kv_cache"] = kv_cache_study(lm, calibration, windows[:64], args.workdir, past=args.past,
                                                prefill=args.prefill, rounds=args.rounds, say=say)
            report["width_study"] = width_study(lm, calibration, windows, say)
        del lm
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
