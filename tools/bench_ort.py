"""Benchmark: bitpass against ONNX Runtime's own int8 on the models users bring, side by side on this CPU.

    python -m bitpass.tools.bench_ort                      # resnet18, resnet50, mobilenet_v3_small (224 x 224,
                                                           # random init) and the digits-trained CNNs (full size)
    python -m bitpass.tools.bench_ort --quick              # resnet18 + resnet18_digits, fewer rounds
    python -m bitpass.tools.bench_ort --models resnet50 --markdown --json out.json
    python -m bitpass.tools.bench_ort --models sentence_embedding   # the real-weight transformer, batch 1 and 16

For each CNN family (``bitpass.tools.model_families``, exported with ``torchscript-17`` as users export):

* ``ORT fp32``: the exported model, the reference of every ratio;
* ``ORT U8S8`` / ``ORT S8S8``: ``quantize_static`` QDQ, per-channel int8 weights, uint8 / int8 activations,
  MinMax calibration on the same calibration samples bitpass gets, after ``quant_pre_process`` as ORT documents;
* ``ORT dynamic``: ``quantize_dynamic`` (int8 weights, ORT's default operator types), after ``quant_pre_process``;
* ``bitpass default``: ``bitpass.tools.api.compile(path, out, calibration=..., evaluation=...)``, no options;
* ``bitpass avg-bits=4``: the same with ``budget="avg-bits=4"``.

For a transformer family (``TRANSFORMER_FAMILIES``: output kind ``embedding``, e.g. ``sentence_embedding``, the
6 x 384 BERT-like encoder with real learned weights) the variants are what transformer users compare
(``TRANSFORMER_VARIANTS``), timed at batch 1 and 16 (the family's sequence length, 64):

* ``ORT fp32`` (as exported, dynamic batch/sequence axes) and ``ORT fp32 optimized``: ORT's transformer
  optimizer (``onnxruntime.transformers.optimizer.optimize_model``, model type bert, heads and width detected);
* ``ORT dynamic``: ``quantize_dynamic`` after ``quant_pre_process``, what ORT documents for BERT-class models;
* ``ORT NNCF-style``: ``quantize_static`` QDQ, uint8 activations x per-channel int8 weights, MinMax, with
  ``op_types_to_quantize=[MatMul, Gemm]``, ``DedicatedQDQPair`` and ``OpTypesToExcludeOutputQuantization``:
  only MatMul/Gemm inputs (weights and activations) read Q/DQ, so LayerNorm, Softmax, the mask's Where/Add, GELU and the residual Adds stay fp32, as
  NNCF's transformer model type leaves them (its ignored patterns); NNCF's SmoothQuant step is not reproduced;
* ``bitpass optimize`` (``pipeline="optimize"``, fp32), ``bitpass default``, ``bitpass packed``
  (``formats="packed"``: the mixed pipeline's default budget, weights stored low-bit, computed in fp32) and
  ``bitpass avg-bits=5`` (``budget="avg-bits=5"``).

Quality for an embedding output is the cosine per held-out sample (mean and lowest), not top-1 agreement.

The format column of a bitpass row is what its manifest says it chose (``records.quantization.search``: the
candidate and int8 flavour the whole-graph search kept, and how many layers ended in each result). Beside the
timings, each bitpass artifact's ONNX Runtime session graph (its optimized model as loaded with the options it
ships, compared by structure: ``format_search.session_signature``) says whether ``avg-bits=4`` runs the very graph
of ``bitpass default``: then it runs the same kernels on the same shapes, and its speed is the int8 artifact's by
construction, whatever a timing on a busy machine scatters to.

Speed: every variant of one model is timed in ONE fresh process without torch
(``bitpass.backends.onnxruntime.timing.time_groups``: alternating, order reversed every other round, thread
spinning off), at batch 1 and 8; a ratio is the median over rounds of the paired ratio ORT fp32 seconds /
variant seconds (> 1: faster than ORT fp32), with the 25-75 % band of the per-round ratios beside it.
Quality on the family's held-out evaluation samples (never the calibration samples): top-1 agreement with
ORT fp32 and mean cosine of the logits; accuracy against the labels for the digits-trained families. Note:
bitpass's quality gate is given the same evaluation samples (as a user gives them to ``compile``), so its
figures there are what the gate kept; for random-init families the gate compares by cosine (0.99), since
their near-tied logits make top-1 agreement noise. Bytes: the model file plus its external data, relative to the fp32 file.

The bitpass compile cache (latency and format-search tables, kept references) lives in a temporary
``BITPASS_CACHE_DIR`` deleted at the end, so runs are independent; ``--cache-dir`` keeps it. The digits
families' trained weights still come from the usual model cache (they are not what is measured).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("resnet18", "resnet50", "mobilenet_v3_small", "resnet18_digits", "resnet50_digits", "mobilenet_v3_small_digits")
QUICK_MODELS = ("resnet18", "resnet18_digits")
FP32 = "ORT fp32"
ORT_INT8 = ("ORT U8S8", "ORT S8S8", "ORT dynamic")
ORT_OPTIMIZED, ORT_NNCF = "ORT fp32 optimized", "ORT NNCF-style"
#: every ORT-made variant (the "fastest ORT" comparison picks among these)
ORT_VARIANTS = (FP32, *ORT_INT8, ORT_OPTIMIZED, ORT_NNCF)
BITPASS_DEFAULT, BITPASS_LOW = "bitpass default", "bitpass avg-bits=4"
BITPASS_OPTIMIZE, BITPASS_PACKED, BITPASS_MIXED5 = "bitpass optimize", "bitpass packed", "bitpass avg-bits=5"
VARIANTS = (FP32, *ORT_INT8, BITPASS_DEFAULT, BITPASS_LOW)
TRANSFORMER_VARIANTS = (FP32, ORT_OPTIMIZED, "ORT dynamic", ORT_NNCF, BITPASS_OPTIMIZE, BITPASS_DEFAULT,
                        BITPASS_PACKED, BITPASS_MIXED5)
#: output kinds benchmarked as transformers (their variants, batches and cosine quality)
TRANSFORMER_KINDS = ("embedding",)
BATCHES = (1, 8)
TRANSFORMER_BATCHES = (1, 16)
#: what ``compile`` gets per bitpass variant (nothing but the budget: the defaults are what is measured)
BITPASS_OPTIONS: dict[str, dict[str, Any]] = {
    BITPASS_DEFAULT: {}, BITPASS_LOW: {"budget": "avg-bits=4"}, BITPASS_OPTIMIZE: {"pipeline": "optimize"},
    BITPASS_PACKED: {"formats": "packed"}, BITPASS_MIXED5: {"budget": "avg-bits=5"}}
CALIBRATION_BATCH = 8
QUALITY_COLUMNS = ("top-1 agree", "accuracy", "cosine", "min cosine", "bytes x fp32", "build s")


def is_transformer(name: str) -> bool:
    """Whether family ``name`` is benchmarked with the transformer variants (by its output kind)."""
    from bitpass.tools import model_families

    return model_families.family(name).output_kind in TRANSFORMER_KINDS


def variants_for(name: str) -> tuple[str, ...]:
    """The variants family ``name`` is benchmarked with."""
    return TRANSFORMER_VARIANTS if is_transformer(name) else VARIANTS


def columns(batches: Sequence[int] = BATCHES) -> tuple[str, ...]:
    """The table's columns: per batch size the median ms and the ratio to ORT fp32, then quality and size."""
    timed = tuple(c for b in batches for c in (f"ms b{b}", f"x fp32 b{b}"))
    return ("model", "variant", "format", *timed, *QUALITY_COLUMNS)

Say = Callable[[str], None]


def say_stderr(message: str) -> None:
    print(f"[bench_ort] {message}", file=sys.stderr, flush=True)


@dataclass
class Row:
    """One variant of one model: how it was made, how fast, how faithful, how big."""

    model: str
    variant: str
    path: str | None = None
    format: str = ""
    build_seconds: float | None = None
    #: batch -> median seconds per call
    seconds: dict[int, float] = field(default_factory=dict)
    #: batch -> median paired ratio ORT fp32 / variant (> 1: faster), and its 25-75 % band
    speedup: dict[int, float] = field(default_factory=dict)
    speedup_band: dict[int, tuple[float, float]] = field(default_factory=dict)
    top1_agreement: float | None = None
    accuracy: float | None = None
    cosine: float | None = None
    min_cosine: float | None = None
    file_bytes: int | None = None
    bytes_ratio: float | None = None
    manifest: dict[str, Any] | None = None
    error: str | None = None
    #: structural digest of the graph ONNX Runtime runs for a bitpass artifact, with the session options it ships
    #: (``format_search.session_signature``): two rows with the same digest run the same kernels on the same shapes
    session_graph: str | None = None


@dataclass
class ModelResult:
    """A model's rows, and the comparisons issue #11 asks for (paired ratios from the same timing run)."""

    model: str
    size: str
    note: str
    rows: list[Row]
    #: batch -> {"fastest_ort": name, "bitpass_default_vs_fastest_ort": ratio, "low_vs_default": ratio,
    #: "low_same_graph_as_default": whether avg-bits=4 runs bitpass default's session graph}
    checks: dict[int, dict[str, Any]] = field(default_factory=dict)

    def row(self, variant: str) -> Row:
        return next(r for r in self.rows if r.variant == variant)


# --- making the variants --------------------------------------------------------------------------------------
def file_bytes(path: Path) -> int:
    """The ONNX file plus every external-data file it names (each counted once)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in _initializers(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def _initializers(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from _initializers(attr.g)
            for sub in attr.graphs:
                yield from _initializers(sub)


def preprocess(source: Path, target: Path) -> str:
    """ORT's ``quant_pre_process`` (symbolic shape inference, optimization, ONNX shape inference), as ORT's
    quantization guide runs it before quantizing; symbolic shape inference skipped only if it fails."""
    from onnxruntime.quantization import quant_pre_process

    # ORT writes temporary models (sym_shape_infer_temp.onnx, <uuid>.data) into the working directory:
    # keep them beside the target, not in the user's folder
    source, target = source.resolve(), target.resolve()
    with contextlib.chdir(target.parent):
        try:
            quant_pre_process(str(source), str(target))
            return "quant_pre_process"
        except Exception as err:  # noqa: BLE001 - ORT raises bare Exceptions from its shape inference
            quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
            return (f"quant_pre_process(skip_symbolic_shape=True): symbolic shape inference failed "
                    f"({_first_line(err)})")


def ort_static(source: Path, target: Path, calibration: dict[str, np.ndarray], activation: str,
               op_types: Sequence[str] | None = None, extra_options: dict[str, Any] | None = None) -> None:
    """``quantize_static`` QDQ, per-channel int8 weights, ``activation`` (uint8 or int8) activations, MinMax
    calibration over ``calibration`` in batches; ``op_types``: quantize only these (default: ORT's own set)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static

    count = len(next(iter(calibration.values())))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, count, CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.starts, None)
            if start is None:
                return None
            return {name: array[start:start + CALIBRATION_BATCH] for name, array in calibration.items()}

    quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    op_types_to_quantize=list(op_types) if op_types else None, extra_options=extra_options)


def ort_dynamic(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)


def ort_nncf_style(source: Path, target: Path, calibration: dict[str, np.ndarray]) -> None:
    """QDQ U8S8 per-channel int8 on MatMul/Gemm inputs only (weights and activations; their outputs are not
    re-quantized), one dedicated Q/DQ pair per MatMul input: every other operator (LayerNorm, Softmax, the
    mask's Where/Add on the scores, the residual Add that reads the same LayerNorm output as the projections)
    reads fp32, as NNCF's transformer mode leaves it."""
    import onnx

    ort_static(source, target, calibration, "uint8", op_types=("MatMul", "Gemm"),
               extra_options={"DedicatedQDQPair": True, "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]})
    proto = onnx.load(str(target))
    if _float_reads_for_others(proto, ("MatMul", "Gemm")):
        onnx.save(proto, str(target))


def _float_reads_for_others(proto: Any, quantized: Sequence[str]) -> int:
    """Rewire every node that is not one of ``quantized`` from a Q -> DQ pair back to the float tensor the pair
    quantizes (ORT shares a LayerNorm output's pair with the residual Add even with ``DedicatedQDQPair``);
    the number of inputs rewired."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    rewired = 0
    for node in proto.graph.node:
        if node.op_type in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            dq = producers.get(name)
            q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
                rewired += 1
    while True:  # the Q/DQ pairs nothing reads any more
        read = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
        dead = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(out in read for out in n.output)]
        if not dead:
            return rewired
        for node in dead:
            proto.graph.node.remove(node)


def ort_optimized(source: Path, target: Path) -> None:
    """ORT's transformer optimizer (model type bert; heads and hidden size detected from the graph), fp32."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimize_model(str(source), model_type="bert", num_heads=0, hidden_size=0).save_model_to_file(str(target))


@contextlib.contextmanager
def bitpass_cache(folder: Path) -> Iterator[None]:
    """``BITPASS_CACHE_DIR`` set to ``folder`` for the duration (and restored), for compile's caches only."""
    previous = os.environ.get("BITPASS_CACHE_DIR")
    os.environ["BITPASS_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("BITPASS_CACHE_DIR", None)
        else:
            os.environ["BITPASS_CACHE_DIR"] = previous


def bitpass_format(manifest: dict[str, Any]) -> str:
    """What the manifest says bitpass chose: the searched candidate and int8 flavour, and layers by result."""
    record = manifest.get("records", {}).get("quantization", {})
    search = record.get("search") or {}
    parts = []
    if search:
        parts.append(f"{search.get('chosen')} {search.get('flavour')}")
    elif record.get("format"):
        parts.append(str(record["format"]))
    results = Counter(str(layer.get("result")) for layer in record.get("layers", {}).values())
    if results:
        parts.append(" ".join(f"{name}:{n}" for name, n in sorted(results.items())))
    allocation = manifest.get("records", {}).get("allocation") or {}
    allocated = Counter(str(f.get("format")) for f in (allocation.get("formats") or {}).values())
    if allocated:  # what the one-layer timings chose, before the whole-graph search (its int8 flavour timed in)
        flavour = f" {allocation['int8_flavour']}" if allocation.get("int8_flavour") else ""
        parts.append(f"allocated{flavour} " + " ".join(f"{name}:{n}" for name, n in sorted(allocated.items())))
    return "; ".join(parts) or "-"


def compile_bitpass(source: Path, target: Path, built: Any, options: dict[str, Any], cache: Path,
                    progress: Say | bool) -> dict[str, Any]:
    from bitpass.tools import api

    from bitpass.tools import model_families

    if not model_families.family(built.family).trained and "tolerance" not in options:
        # random-init logits are near ties: top-1 agreement is noise there, so the gate compares by cosine
        # (what the README's tour tells users with random weights); trained families keep the default gate
        options = {**options, "tolerance": "cosine=0.99"}
    with bitpass_cache(cache):
        artifact = api.compile(str(source), str(target), calibration=built.inputs_of(built.calibration),
                               evaluation=built.evaluation, progress=progress, **options)
    return artifact.manifest


def build_variants(name: str, size: str, work: Path, cache: Path, say: Say = say_stderr,
                   variants: Sequence[str] = VARIANTS, verbose: bool = False) -> tuple[Any, list[Row]]:
    """Build family ``name`` at ``size``, export it and make every variant under ``work``; the rows (a variant
    that could not be made carries its error) and the ``Built`` (its data)."""
    from bitpass.tools import model_families

    start = time.perf_counter()
    built = model_families.build(name, size)  # trained weights from the usual model cache, not ``cache``
    fp32 = model_families.export(built, model_families.EXPORTS["torchscript-17"], work / "fp32")
    rows = [Row(name, FP32, str(fp32), "exported (torchscript-17)", time.perf_counter() - start)]
    say(f"{name} ({size}): built and exported in {rows[0].build_seconds:.1f} s ({built.note})")
    pre = work / "pre" / "model.onnx"
    pre.parent.mkdir(parents=True, exist_ok=True)
    how = ""
    if any(v in (*ORT_INT8, ORT_NNCF) for v in variants):
        try:
            how = preprocess(fp32, pre)
        except Exception as err:  # noqa: BLE001 - reported in the table, the bitpass rows still run
            how = f"quant_pre_process failed: {_first_line(err)}"
    calibration = built.inputs_of(built.calibration)
    makers: dict[str, Callable[[Path], None]] = {
        "ORT U8S8": lambda out: ort_static(pre, out, calibration, "uint8"),
        "ORT S8S8": lambda out: ort_static(pre, out, calibration, "int8"),
        "ORT dynamic": lambda out: ort_dynamic(pre, out),
        ORT_NNCF: lambda out: ort_nncf_style(pre, out, calibration),
    }
    for variant in variants:
        if variant == FP32:
            continue
        folder = work / variant.replace(" ", "_").replace("=", "")
        row = Row(name, variant)
        start = time.perf_counter()
        try:
            if variant == ORT_OPTIMIZED:
                folder.mkdir(parents=True)
                ort_optimized(fp32, folder / "model.onnx")
                row.path, row.format = str(folder / "model.onnx"), "fp32, ORT transformer optimizer (bert)"
            elif variant in makers:
                if not pre.is_file():
                    raise RuntimeError(how)
                folder.mkdir(parents=True)
                out = folder / "model.onnx"
                makers[variant](out)
                scope = " MatMul/Gemm only" if variant == ORT_NNCF else ""
                row.path, row.format = str(out), f"QDQ per-channel{scope} after {how}" if "dynamic" not in variant \
                    else f"dynamic int8 after {how}"
            else:
                progress: Say | bool = (lambda m, v=variant: say(f"{name} {v}: {m}")) if verbose else False
                row.manifest = compile_bitpass(fp32, folder, built, BITPASS_OPTIONS[variant], cache, progress)
                row.path = str(folder / row.manifest.get("metrics", {}).get("size", {}).get("file", "model.onnx"))
                row.format = bitpass_format(row.manifest)
        except Exception as err:  # noqa: BLE001 - one variant failing is a finding, not the end of the run
            row.error = f"{type(err).__name__}: {_first_line(err)}"
        row.build_seconds = time.perf_counter() - start
        say(f"{name} {variant}: {'FAILED ' + row.error if row.error else 'made'} in {row.build_seconds:.1f} s")
        rows.append(row)
    return built, rows


# --- quality and timing -------------------------------------------------------------------------------------
def outputs(path: str, inputs: dict[str, np.ndarray], threads: int, batch: int = 16) -> np.ndarray:
    """The first output of the model at ``path`` over ``inputs``, batch by batch (ORT, CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    count = len(inputs[names[0]])
    parts = [session.run(None, {n: inputs[n][s:s + batch] for n in names})[0] for s in range(0, count, batch)]
    return np.concatenate(parts)


def fidelity(got: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> dict[str, float | None]:
    """Top-1 agreement with the reference, mean and lowest per-sample cosine of the logits, accuracy."""
    got2, ref2 = got.reshape(len(got), -1).astype(np.float64), reference.reshape(len(reference), -1).astype(np.float64)
    cosines = (got2 * ref2).sum(1) / np.maximum(np.linalg.norm(got2, axis=1) * np.linalg.norm(ref2, axis=1), 1e-30)
    return {"top1_agreement": float(np.mean(got2.argmax(1) == ref2.argmax(1))), "cosine": float(cosines.mean()),
            "min_cosine": float(cosines.min()),
            "accuracy": None if labels is None else float(np.mean(got2.argmax(1) == labels))}


def measure_quality(rows: list[Row], built: Any, threads: int) -> None:
    """Fidelity of every row against ORT fp32 on the held-out samples (cosine only for embeddings: the argmax
    of an embedding means nothing), and its bytes."""
    inputs = built.inputs_of(built.evaluation)
    labels = built.evaluation.get("labels")
    reference = outputs(rows[0].path, inputs, threads)
    fp32_bytes = file_bytes(Path(rows[0].path))
    for row in rows:
        if row.error or row.path is None:
            continue
        try:
            got = reference if row.variant == FP32 else outputs(row.path, inputs, threads)
            for key, value in fidelity(got, reference, labels).items():
                setattr(row, key, value)
            if built.output_kind in TRANSFORMER_KINDS:
                row.top1_agreement = None
            row.file_bytes = file_bytes(Path(row.path))
            row.bytes_ratio = row.file_bytes / fp32_bytes
        except Exception as err:  # noqa: BLE001 - an artifact ORT cannot run is reported in its row
            row.error = f"running on the evaluation data: {type(err).__name__}: {_first_line(err)}"


def measure_speed(result: ModelResult, built: Any, batches: Sequence[int], threads: int, rounds: int) -> None:
    """Every variant of the model in one ``time_groups`` run; ratios paired per round against ORT fp32."""
    from bitpass.backends.onnxruntime.timing import Group, time_groups

    evaluation = built.inputs_of(built.evaluation)
    feeds = {b: {n: np.ascontiguousarray(_repeat(a, b)) for n, a in evaluation.items()} for b in batches}
    live = [r for r in result.rows if not r.error and r.path]
    group = Group({r.variant: Path(r.path) for r in live}, feeds, disabled_optimizers=shipped_session_options(live))
    time_groups([group], threads=threads, rounds=rounds)
    for row in live:
        if row.variant in group.errors:
            row.error = f"timing: {group.errors[row.variant]}"
            continue
        for b in batches:
            median = group.median(row.variant, b)
            if median is None:
                continue
            row.seconds[b] = median
            row.speedup[b] = group.ratio(row.variant, FP32, b)
            paired = _paired(group, row.variant, FP32, b)
            row.speedup_band[b] = (float(np.percentile(paired, 25)), float(np.percentile(paired, 75)))
    for b in batches:
        timed = {r.variant: r.speedup.get(b) for r in live if r.speedup.get(b) is not None}
        ort = {v: s for v, s in timed.items() if v in ORT_VARIANTS}
        if not ort:
            continue
        fastest = max(ort, key=lambda v: ort[v])
        check: dict[str, Any] = {"fastest_ort": fastest}
        if BITPASS_DEFAULT in timed:
            check["bitpass_default_vs_fastest_ort"] = group.ratio(BITPASS_DEFAULT, fastest, b)
        if BITPASS_DEFAULT in timed and BITPASS_LOW in timed:
            check["low_vs_default"] = group.ratio(BITPASS_LOW, BITPASS_DEFAULT, b)
            same = same_session_graph(result.row(BITPASS_LOW), result.row(BITPASS_DEFAULT))
            if same is not None:
                check["low_same_graph_as_default"] = same
        result.checks[b] = check


def session_graphs(rows: Sequence[Row]) -> None:
    """Each bitpass row's ``session_graph``: what ONNX Runtime runs for it, loaded as it ships (session.json)."""
    from bitpass.passes.format_search import session_signature

    disabled = shipped_session_options(rows)
    for row in rows:
        if row.error or row.path is None or not row.variant.startswith("bitpass"):
            continue
        with tempfile.TemporaryDirectory(prefix="bench-ort-graph-") as tmp:
            row.session_graph = session_signature(Path(row.path), Path(tmp), disabled.get(row.variant, ()))


def same_session_graph(row: Row, other: Row) -> bool | None:
    """Whether two rows run the same ONNX Runtime session graph (same kernels, same shapes: the same speed by
    construction, whatever a timing on a busy machine says); None when either is unknown."""
    if row.session_graph is None or other.session_graph is None:
        return None
    return row.session_graph == other.session_graph


def shipped_session_options(rows: Sequence[Row]) -> dict[str, list[str]]:
    """The ORT optimizers each bitpass artifact's ``session.json`` turns off: an artifact is timed as it ships
    (``bitpass run`` and the runner apply them; timing without them measured the sentence encoder's default at
    1.91x / 1.97x fp32 where it runs 2.08x / 2.34x)."""
    from bitpass.backends.onnxruntime.runner import read_session_config

    out = {}
    for row in rows:
        config = read_session_config(Path(row.path).parent) if row.variant.startswith("bitpass") else None
        if config and config.get("disabled_optimizers"):
            out[row.variant] = list(config["disabled_optimizers"])
    return out


def _paired(group: Any, name: str, reference: str, batch: int) -> np.ndarray:
    mine, theirs = group.samples[name][batch], group.samples[reference][batch]
    n = min(len(mine), len(theirs))
    return np.array(theirs[:n]) / np.array(mine[:n])


def _repeat(array: np.ndarray, batch: int) -> np.ndarray:
    """The first ``batch`` samples (repeated when there are fewer)."""
    reps = -(-batch // len(array))
    return np.concatenate([array] * reps)[:batch]


def bench_model(name: str, *, size: str = "full", batches: Sequence[int] = BATCHES, threads: int = 2,
                rounds: int = 9, cache: Path, say: Say = say_stderr, verbose: bool = False,
                keep: Path | None = None, variants: Sequence[str] | None = None) -> ModelResult:
    """``variants`` (by default ``variants_for(name)``; ORT fp32 always) of family ``name``: made, checked on
    held-out data and timed side by side."""
    variants = variants_for(name) if variants is None else variants
    with contextlib.ExitStack() as stack:
        work = keep / name if keep else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ort-")))
        built, rows = build_variants(name, size, work, cache, say, variants=variants, verbose=verbose)
        result = ModelResult(name, size, built.note, rows)
        measure_quality(rows, built, threads)
        session_graphs(rows)
        start = time.perf_counter()
        say(f"{name}: timing {sum(1 for r in rows if not r.error)} variants at batch "
            f"{', '.join(map(str, batches))} ({threads} threads, {rounds} rounds, one fresh process)")
        measure_speed(result, built, batches, threads, rounds)
        say(f"{name}: timed in {time.perf_counter() - start:.1f} s")
    return result


# --- reporting --------------------------------------------------------------------------------------------
def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cells(row: Row, batches: Sequence[int] = BATCHES) -> list[str]:
    """The table's cells for one row (console and markdown)."""
    def speed(b: int) -> str:
        if b not in row.speedup:
            return "-"
        low, high = row.speedup_band.get(b, (row.speedup[b], row.speedup[b]))
        return f"{row.speedup[b]:.2f} ({low:.2f}-{high:.2f})"

    if row.error:
        return [row.model, row.variant, f"FAILED: {row.error}"[:80]] + ["-"] * (2 * len(batches) + 5) + \
            [_num(row.build_seconds, 1)]
    timed = [c for b in batches for c in (_num(1e3 * row.seconds[b] if b in row.seconds else None), speed(b))]
    return [row.model, row.variant, row.format[:60], *timed, _num(row.top1_agreement, 3), _num(row.accuracy, 3),
            _num(row.cosine, 4), _num(row.min_cosine, 4), _num(row.bytes_ratio, 3), _num(row.build_seconds, 1)]


def header(threads: int, rounds: int) -> str:
    from bitpass.frontend.cpu import host as cpu

    import onnxruntime

    return (f"{cpu().describe()}\nONNX Runtime {onnxruntime.__version__}, {threads} threads, up to {rounds} "
            f"rounds; every variant of a model timed alternately in one fresh process, spinning off; "
            f"x fp32 = median paired ratio ORT fp32 / variant (25-75 % band), > 1 faster; quality on held-out "
            f"samples vs ORT fp32; bytes = model file + external data")


def checks_lines(results: Sequence[ModelResult]) -> list[str]:
    lines = []
    for result in results:
        for b, check in sorted(result.checks.items()):
            text = f"{result.model} b{b}: fastest ORT is {check['fastest_ort']}"
            if "bitpass_default_vs_fastest_ort" in check:
                text += f"; bitpass default is {_num(check['bitpass_default_vs_fastest_ort'])}x its speed"
            if "low_vs_default" in check:
                low = result.row(BITPASS_LOW)
                text += (f"; avg-bits=4 is {_num(check['low_vs_default'])}x bitpass default's speed at "
                         f"{_num(low.bytes_ratio, 3)}x fp32 bytes")
            if "low_same_graph_as_default" in check:
                text += ("; it runs bitpass default's ONNX Runtime session graph (same kernels and shapes: equal "
                         "speed by construction)" if check["low_same_graph_as_default"] else
                         "; its ONNX Runtime session graph differs from bitpass default's")
            lines.append(text)
    return lines


def table(results: Sequence[ModelResult], batches: Sequence[int] = BATCHES) -> str:
    names = columns(batches)
    rows = [list(names)] + [cells(r, batches) for result in results for r in result.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(names))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def markdown(results: Sequence[ModelResult], batches: Sequence[int] = BATCHES) -> str:
    names = columns(batches)
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in cells(r, batches)) + " |"
              for res in results for r in res.rows]
    return "\n".join(lines)


def to_json(results: Sequence[ModelResult], info: dict[str, Any]) -> dict[str, Any]:
    out = []
    for result in results:
        rows = []
        for row in result.rows:
            data = asdict(row)
            manifest = data.pop("manifest")
            if manifest:
                data["search"] = manifest.get("records", {}).get("quantization", {}).get("search")
                data["bitpass_metrics"] = manifest.get("metrics")
            rows.append(data)
        out.append({"model": result.model, "size": result.size, "note": result.note, "rows": rows,
                    "checks": {str(b): c for b, c in result.checks.items()}})
    return {**info, "results": out}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", help=f"comma-separated families (default: {','.join(MODELS)})")
    parser.add_argument("--size", choices=("fast", "full"), default="full", help="family size (default full)")
    parser.add_argument("--quick", action="store_true", help=f"{' + '.join(QUICK_MODELS)} and 5 rounds")
    parser.add_argument("--rounds", type=int, help="timing rounds per batch size (default 9, --quick 5)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--batches", help=f"batch sizes to time (default {','.join(map(str, BATCHES))}; "
                                          f"{','.join(map(str, TRANSFORMER_BATCHES))} when a transformer "
                                          f"family is among --models)")
    parser.add_argument("--variants", help="comma-separated variants (default: every variant of each family's "
                                           "kind; ORT fp32 is always made)")
    parser.add_argument("--cache-dir", type=Path, help="keep bitpass's compile cache here (default: a temporary "
                                                       "folder, deleted at the end)")
    parser.add_argument("--keep", type=Path, help="keep every variant's model under this folder")
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    parser.add_argument("--json", type=Path, help="write every figure (and bitpass's search records) here")
    parser.add_argument("--verbose", action="store_true", help="forward bitpass's own progress lines")
    args = parser.parse_args(argv)
    from bitpass.tools import model_families

    models = tuple(m for m in args.models.split(",") if m) if args.models else \
        (QUICK_MODELS if args.quick else MODELS)
    unknown = [m for m in models if m not in model_families.FAMILIES]
    if unknown:
        parser.error(f"unknown model famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
                     f"known: {', '.join(model_families.FAMILIES)}")
    default_batches = TRANSFORMER_BATCHES if any(is_transformer(m) for m in models) else BATCHES
    try:
        batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else default_batches
    except ValueError:
        parser.error(f"--batches takes comma-separated integers, not {args.batches!r}")
    chosen: tuple[str, ...] | None = None
    if args.variants:
        chosen = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        known = (*ORT_VARIANTS, *BITPASS_OPTIONS)
        wrong = [v for v in chosen if v not in known]
        if wrong:
            parser.error(f"unknown variant {', '.join(wrong)}; known: {', '.join(known)}")
        chosen = (FP32, *(v for v in chosen if v != FP32))
    rounds = args.rounds or (5 if args.quick else 9)
    if args.keep and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep} is not empty: name a new folder")
    results = []
    with contextlib.ExitStack() as stack:
        if args.cache_dir:
            cache = args.cache_dir
            cache.mkdir(parents=True, exist_ok=True)
        else:
            cache = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ort-cache-")))
        say_stderr(f"bitpass compile cache: {cache}{'' if args.cache_dir else ' (temporary)'}")
        for name in models:
            results.append(bench_model(name, size=args.size, batches=batches, threads=args.threads, rounds=rounds,
                                       cache=cache, verbose=args.verbose, keep=args.keep, variants=chosen))
    text = header(args.threads, rounds)
    print(text)
    print(table(results, batches))
    for line in checks_lines(results):
        print(line)
    if args.markdown:
        print()
        print(markdown(results, batches))
    if args.json:
        info = {"header": text, "threads": args.threads, "rounds": rounds, "batches": list(batches),
                "size": args.size}
        args.json.write_text(json.dumps(to_json(results, info), indent=1, default=_jsonable))
    failed = [f"{r.model} {r.variant}: {r.error}" for res in results for r in res.rows if r.error]
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed else 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["BITPASS_OPTIONS", "columns", "MODELS", "ModelResult", "Row", "TRANSFORMER_VARIANTS", "VARIANTS",
           "bench_model", "variants_for",
           "bitpass_format", "fidelity", "file_bytes", "markdown", "table"]
