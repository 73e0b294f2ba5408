"""Conformance: compile the model families users bring, exported as they export them, with every pipeline.

    python -m bitpass.tools.conformance --fast                      # small configs, a few combinations
    python -m bitpass.tools.conformance                             # real sizes (a long benchmark)
    python -m bitpass.tools.conformance --fast --families resnet18,bert --pipelines default,mixed \\
        --exports torchscript-17,module --json out.json --markdown

Each case (family x export x pipeline) compiles in its own process, with a timeout and a memory limit,
exactly as ``bitpass compile`` would (the pipeline's command-line options are parsed by bitpass's own
parser), and one table reports, per case: compiled or the one-line error, fidelity to the fp32 torch
module on held-out data judged by output kind, bitpass's own quality gate as the manifest records it, weight
bytes and latency against ONNX Runtime fp32 (as the artifact's manifest measured them, at batch 1 and its larger batch),
compile seconds and peak memory. A crash is a row with its one-line error, never a traceback.

bitpass gets the held-out data the runner judges on (``--eval``), and the runner's bound is bitpass's default
tolerance for the output kind, measured the same way (``GATE``); a module, whose outputs carry torch's op names,
is given that bound as ``tolerance``. So a row that passes bitpass's gate and misses the runner's is a bug in one
of the two, not a difference of definitions.

By default every pipeline runs on the first export and the ``default`` pipeline on the other exports
(``--cross`` runs every combination). ``run_case`` is one case, with picklable arguments, so the loop can
be handed to an executor; ``run`` is the whole loop. The lead hooks ``add_arguments`` / ``main`` into the
``bitpass`` command line as ``bitpass conformance``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitpass.passes.executors import EXECUTOR_HELP, SERIAL, Executor, executor_from_spec
from bitpass.tools import quality
from bitpass.tools.processes import kill_group, tree_rss_mb

#: pipeline name -> the ``bitpass compile`` options that select it
PIPELINES: dict[str, tuple[str, ...]] = {
    "optimize": ("--pipeline", "optimize"),
    "default": (),
    "mixed": ("--budget", "avg-bits=4"),
    "joint": ("--pipeline", "joint", "--budget", "size=0.3x"),
    "tvm": ("--backend", "tvm", "--pipeline", "optimize"),
}
#: the runner's bound by output kind: bitpass's own gate defaults (``bitpass.tools.quality``), measured the same way
#: (top-1 agreement where tied fp32 maxima count as agreeing, cosine per real token, per-token KL for language
#: models), so that an artifact bitpass's gate passes on this data passes here too
GATE = {"accuracy_drop_points": quality.DEFAULTS["accuracy-drop"], "top1_agreement": quality.DEFAULTS["agreement"],
        "min_cosine": quality.DEFAULTS["cosine"], "kl": quality.DEFAULTS["kl"]}
#: exports --fast tries by default (the first with every pipeline); a full run tries every export
FAST_EXPORTS = ("torchscript-17", "dynamo-23", "module")
FAST_TIMEOUT_S, FULL_TIMEOUT_S = 300.0, 900.0
PREPARE_TIMEOUT_S = 7200.0  # training a full-size family once (then cached) may take this long on a busy machine
DEFAULT_MEMORY_LIMIT_MB = 8192


# --- cases and rows ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One compile to try. Plain fields only: a case pickles and round-trips through JSON."""

    family: str
    size: str
    export: str
    pipeline: str
    #: the prepared family folder (calib.npz, eval.npz, reference.npy, one subfolder per export)
    folder: str
    seed: int = 0
    timeout_s: float = FAST_TIMEOUT_S
    memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB
    keep: bool = False


@dataclass
class Row:
    """What one case gave. ``status``: ok, error (bitpass refused, one line), crash (an exception that is not a
    BitpassError, or the process died), timeout, memory (killed above the memory limit), export (the family
    could not be exported that way, so nothing was compiled)."""

    family: str
    size: str
    export: str
    pipeline: str
    status: str
    error: str = ""
    #: where the error came from (innermost bitpass frame) or what the process was doing when stopped
    where: str = ""
    output_kind: str = ""
    trained: bool = False
    fidelity: dict[str, Any] = field(default_factory=dict)
    gate: str = ""
    #: bitpass's own quality gate as the artifact's manifest records it (metric, value, samples, layers put back)
    bitpass_gate: str = ""
    weight_ratio: float | None = None
    latency: dict[str, float] = field(default_factory=dict)
    compile_s: float | None = None
    peak_mb: float | None = None
    passes: list[tuple[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- one-line errors --------------------------------------------------------------------------------------------
def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` of the innermost cause (exporters wrap the real reason twice)."""
    inner = err
    while inner.__cause__ is not None and inner.__cause__ is not inner:
        inner = inner.__cause__
    text = next((line.strip() for line in str(inner).splitlines() if line.strip()), "")
    outer = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    message = f"{type(inner).__name__}: {text}" if text else type(inner).__name__
    if inner is not err and outer and outer not in message:
        message = f"{message} (in {type(err).__name__}: {outer})"
    return _clip(message)


def _clip(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def origin(err: BaseException) -> str:
    """The innermost traceback frame inside bitpass (``passes/quantize.py:123 in run``), else the innermost."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "/site-packages/" not in f.filename and "/lib/python" not in f.filename]
    frame = (ours or frames or [None])[-1]
    if frame is None:
        return ""
    parts = Path(frame.filename).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else frame.filename
    return f"{short}:{frame.lineno} in {frame.name}"


# --- fidelity by output kind ------------------------------------------------------------------------------------
def fidelity(kind: str, reference: np.ndarray, output: np.ndarray, evaluation: dict[str, np.ndarray]) -> dict:
    """Fidelity of ``output`` to the fp32 ``reference`` on held-out data, judged by output kind.

    logits: top-1 agreement (strict, and with tied fp32 maxima counted as agreeing: bitpass's gate rule), and
    accuracy of both when labels are given; embedding: cosine per sample; features: cosine per real (unpadded)
    token for (batch, sequence, width) outputs with an attention mask, else per sample; lm-logits: per real
    token, KL from the fp32 next-token distribution, top-1 agreement and cosine.
    """
    if reference.shape != output.shape:
        raise ValueError(f"output shape {list(output.shape)} differs from the fp32 module's {list(reference.shape)}")
    result: dict[str, Any] = {"samples": int(len(reference))}
    mask = quality.token_mask(evaluation, reference) if kind in ("features", "lm-logits") else None
    if mask is not None:
        ref, got = reference[mask], output[mask]
    elif kind == "lm-logits":
        ref, got = reference.reshape(-1, reference.shape[-1]), output.reshape(-1, output.shape[-1])
    else:
        ref, got = reference.reshape(len(reference), -1), output.reshape(len(output), -1)
    cos = quality.cosines(ref, got)
    result.update(cos_min=float(np.min(cos)), cos_mean=float(np.mean(cos)))
    if kind in ("logits", "lm-logits"):
        result["top1_agreement"] = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
        result["top1_agreement_ties"] = quality.agreement(ref, got)
    if kind == "lm-logits":
        result.update(tokens=int(len(ref)), kl=quality.token_kl(ref, got))
    labels = evaluation.get("labels")
    if kind == "logits" and labels is not None:
        fp32 = float(np.mean(ref.argmax(-1) == labels))
        artifact = float(np.mean(got.argmax(-1) == labels))
        result.update(accuracy_fp32=fp32, accuracy=artifact, accuracy_drop_points=100 * (fp32 - artifact))
    return result


def gate(kind: str, measured: dict[str, Any]) -> str:
    """``pass`` or ``miss: why`` against bitpass's default tolerance for the output kind (``GATE``)."""
    if "accuracy_drop_points" in measured:
        drop = measured["accuracy_drop_points"]
        return "pass" if drop <= GATE["accuracy_drop_points"] else f"miss: accuracy -{drop:.2f} pt"
    if kind == "lm-logits" and "kl" in measured:
        kl = measured["kl"]
        return "pass" if kl <= GATE["kl"] else f"miss: KL {kl:.4f} nats"
    if kind in ("logits", "lm-logits"):
        agree = measured.get("top1_agreement_ties", measured["top1_agreement"])
        return "pass" if agree >= GATE["top1_agreement"] else f"miss: top-1 {100 * agree:.1f} %"
    low = measured["cos_min"]
    return "pass" if low >= GATE["min_cosine"] else f"miss: min cos {low:.3f}"


def tolerance_for(kind: str, labelled: bool) -> str:
    """The runner's bound as ``--tolerance``: given to bitpass for a module, whose outputs carry the exporter's
    op names (``linear``), so bitpass cannot tell class scores from an embedding by name."""
    if kind == "logits" and labelled:
        return f"accuracy-drop={GATE['accuracy_drop_points']:g}"
    if kind == "logits":
        return f"agreement={GATE['top1_agreement']:g}"
    if kind == "lm-logits":
        return f"kl={GATE['kl']:g}"
    return f"cosine={GATE['min_cosine']:g}"


# --- preparing a family: data, fp32 reference outputs, exports ---------------------------------------------------
PREPARED = "prepared.json"


def prepare(family: str, size: str, exports: Sequence[str], folder: str | Path, seed: int = 0) -> dict[str, Any]:
    """Build ``family``, write its data and fp32 torch outputs, and export it each way into ``folder``.

    Returns (and writes as prepared.json) what happened: per export the file or the exporter's one-line
    error, and whether ONNX Runtime runs the exported file with the torch module's outputs.
    """
    from bitpass.tools import model_families

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    built = model_families.build(family, size, seed)
    evaluation_inputs = built.inputs_of(built.evaluation)
    np.savez(folder / "calib.npz", **built.calibration)
    np.savez(folder / "eval.npz", **built.evaluation)
    np.save(folder / "reference.npy", built.reference_outputs(evaluation_inputs))
    info: dict[str, Any] = {"family": family, "size": size, "seed": seed, "output_kind": built.output_kind,
                            "trained": built.trained, "note": built.note, "parameters": built.parameters,
                            "input_names": list(built.input_names), "build_s": round(time.perf_counter() - start, 2),
                            "facts": _plain(built.facts), "exports": {}}
    for name in exports:
        if name == model_families.MODULE:
            info["exports"][name] = {"status": "ok", "note": "compiled from the module"}
            continue
        begin = time.perf_counter()
        try:
            path = model_families.export(built, model_families.EXPORTS[name], folder / name)
        except Exception as err:  # noqa: BLE001 - any exporter failure is a fact to report
            info["exports"][name] = {"status": "export", "error": f"export failed: {one_line(err)}"}
            continue
        record = {"status": "ok", "path": str(path), "export_s": round(time.perf_counter() - begin, 2),
                  "bytes": sum(f.stat().st_size for f in path.parent.iterdir())}
        record.update(_ort_check(path, built, evaluation_inputs))
        info["exports"][name] = record
    (folder / PREPARED).write_text(json.dumps(info, indent=1))
    return info


def _ort_check(path: Path, built: Any, inputs: dict[str, np.ndarray], samples: int = 8) -> dict[str, Any]:
    """Does ONNX Runtime run the exported file, with the torch module's outputs? (before bitpass sees it)"""
    import onnxruntime as ort

    feeds = {k: v[:samples] for k, v in inputs.items()}
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, feeds)[0]
    except Exception as err:  # noqa: BLE001
        return {"ort": f"ONNX Runtime cannot run the exported file: {one_line(err)}"}
    want = built.reference_outputs(feeds)
    if got.shape != want.shape:
        return {"ort": f"ONNX Runtime output shape {list(got.shape)} != torch {list(want.shape)}"}
    error = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))
    return {"ort": "ok" if error < 1e-3 else f"ONNX Runtime output differs from torch: max rel error {error:.1e}",
            "ort_max_rel_error": error}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# --- compiling one case (inside the worker process) ------------------------------------------------------------------
def compile_case(case: Case, artifact_dir: Path, progress_file: Path) -> dict[str, Any]:
    """Compile ``case`` as ``bitpass compile`` would and measure the artifact; returns the worker's result."""
    from bitpass.frontend.errors import BitpassError
    from bitpass.tools import api, cli

    folder = Path(case.folder)
    info = json.loads((folder / PREPARED).read_text())
    model_arg = info["exports"][case.export].get("path") or "module"
    argv = ["compile", model_arg, "-o", str(artifact_dir), "--calib", str(folder / "calib.npz"),
            "--eval", str(folder / "eval.npz"), "--seed", str(case.seed), *PIPELINES[case.pipeline]]
    args = cli.build_parser().parse_args(argv)

    def progress(message: str) -> None:
        with progress_file.open("a") as log:
            log.write(f"{time.time():.1f} {message}\n")

    options: dict[str, Any] = {"pipeline": args.pipeline, "calibration": args.calib, "evaluation": args.eval,
                               "budget": args.budget, "method": args.method, "sensitivity": args.sensitivity,
                               "formats": args.formats, "backend": args.backend, "target": args.target,
                               "seed": args.seed, "progress": progress, "tolerance": args.tolerance}
    model: Any = args.model
    if case.export == "module":
        progress("building the torch module")
        from bitpass.tools import model_families

        built = model_families.build(case.family, case.size, case.seed)
        model, options["example_inputs"] = built.module, built.example_inputs
        # the exporter names the inputs after forward()'s parameters, as a user passing data would key them
        names = forward_names(built.module)
        options["calibration"] = _renamed(folder / "calib.npz", info["input_names"], names)
        options["evaluation"] = _renamed(folder / "eval.npz", info["input_names"], names)
        if options["tolerance"] is None:
            options["tolerance"] = tolerance_for(info["output_kind"], "labels" in options["evaluation"])
    start = time.perf_counter()
    try:
        artifact = api.compile(model, artifact_dir, **options)
    except BitpassError as err:
        return {"status": "error", "error": _clip(str(err)), "where": origin(err),
                "compile_s": time.perf_counter() - start}
    except Exception as err:  # noqa: BLE001 - a bug in bitpass: reported as one line, traceback in the log
        traceback.print_exc()
        return {"status": "crash", "error": one_line(err), "where": origin(err),
                "compile_s": time.perf_counter() - start}
    compile_s = time.perf_counter() - start
    result: dict[str, Any] = {"status": "ok", "compile_s": compile_s}
    manifest = artifact.manifest
    metrics = manifest.get("metrics", {})
    result["weight_ratio"] = metrics.get("size", {}).get("weight_ratio")
    result["latency"] = {key: row["speedup"] for key, row in metrics.get("latency", {}).items()}
    result["passes"] = [(p["pass"], p["seconds"]) for p in manifest.get("passes", [])]
    result["notes"] = [str(n) for n in manifest.get("records", {}).get("notes", [])]
    result["bitpass_gate"] = describe_gate(manifest.get("records", {}).get("quality_gate") or {})
    progress("measuring fidelity against the fp32 module")
    try:
        result["fidelity"] = _measure_fidelity(artifact_dir, folder, info)
        result["gate"] = gate(info["output_kind"], result["fidelity"])
    except Exception as err:  # noqa: BLE001 - the artifact compiled but does not run: a failure too
        traceback.print_exc()
        result.update(status="crash", error=f"artifact does not run: {one_line(err)}", where=origin(err))
    return result


def describe_gate(record: dict[str, Any]) -> str:
    """bitpass's own gate as its manifest records it, in a few words: ``agreement 0.9922 on 128, 4 fp32``."""
    if not record:
        return ""
    if record.get("passed") is None:
        return f"not run: {record.get('skipped', '')}"
    metric = (record.get("tolerance") or {}).get("metric", "")
    value = record.get("final")
    text = f"{metric} {value:.4g}" if isinstance(value, (int, float)) else metric
    text += f" on {record.get('samples')}"
    if record.get("fp32_layers"):
        text += f", {len(record['fp32_layers'])} fp32"
    if not record.get("passed"):
        text += ", missed"
    if record.get("warning"):
        text += ", too few samples"
    return text


def forward_names(module: Any) -> list[str]:
    """The names of ``module.forward``'s parameters: what torch's exporter calls the graph inputs."""
    import inspect

    return [p.name for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _renamed(path: Path, ours: Sequence[str], theirs: Sequence[str]) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    mapping = dict(zip(ours, theirs))
    return {mapping.get(k, k): v for k, v in arrays.items()}


def _measure_fidelity(artifact_dir: Path, folder: Path, info: dict[str, Any]) -> dict[str, Any]:
    from bitpass.tools import api

    with np.load(folder / "eval.npz", allow_pickle=False) as data:
        evaluation = {k: data[k] for k in data.files}
    manifest, _ = api.open_artifact(artifact_dir)
    names = [i["name"] for i in manifest["inputs"]]
    # the artifact's inputs in the module's argument order (a module compiled by bitpass names them itself)
    feeds = {name: evaluation[ours] for name, ours in zip(names, info["input_names"])}
    outputs = api.run(artifact_dir, feeds)
    output = outputs[manifest["outputs"][0]["name"]] if manifest["outputs"][0]["name"] in outputs \
        else next(iter(outputs.values()))
    reference = np.load(folder / "reference.npy", allow_pickle=False)
    return fidelity(info["output_kind"], reference, output, evaluation)


def _worker(case_file: str, result_file: str) -> int:
    case = Case(**json.loads(Path(case_file).read_text()))
    scratch = Path(result_file).parent
    artifact_dir = scratch / "artifact"
    try:
        result = compile_case(case, artifact_dir, scratch / "progress.log")
    finally:
        if not case.keep:
            shutil.rmtree(artifact_dir, ignore_errors=True)
    Path(result_file).write_text(json.dumps(_plain(result)))
    return 0


def _prepare_worker(spec_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    prepare(spec["family"], spec["size"], spec["exports"], spec["folder"], spec["seed"])
    return 0


# --- processes with a timeout, a memory limit and their peak memory ---------------------------------------------------
@dataclass(frozen=True)
class Finished:
    returncode: int | None
    seconds: float
    peak_mb: float
    stopped: str = ""  # "timeout" or "memory" when we killed it


def run_isolated(argv: Sequence[str], *, timeout_s: float, memory_limit_mb: int, log: Path) -> Finished:
    """Run ``argv`` in its own process group; kill it past ``timeout_s`` or above ``memory_limit_mb`` of resident
    memory (polled). The peak is the kernel's maximum resident set size of the process and the children it
    waited for (``os.wait4``), so it is exact even between polls."""
    start = time.perf_counter()
    with log.open("ab") as out:
        process = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    stopped = ""
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid == process.pid:
            break
        elapsed = time.perf_counter() - start
        if not stopped and elapsed > timeout_s:
            stopped = "timeout"
        elif not stopped and tree_rss_mb(process.pid)[0] > memory_limit_mb:
            stopped = "memory"
        if stopped:
            kill_group(process.pid)
            _, status, usage = os.wait4(process.pid, 0)
            break
        time.sleep(0.2)
    process.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait for it again
    return Finished(process.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024, stopped)


def _worker_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bitpass.tools.conformance", "_worker", *args]


def run_case(case: Case) -> Row:
    """Compile one case in a fresh process (timeout, memory limit, peak memory) and return its row.

    Everything it needs is in ``case`` and ``case.folder`` (written by ``prepare``), so executors may call it
    anywhere that folder is visible."""
    info = json.loads((Path(case.folder) / PREPARED).read_text())
    row = Row(case.family, case.size, case.export, case.pipeline, status="ok", output_kind=info["output_kind"],
              trained=info["trained"])
    exported = info["exports"].get(case.export)
    if exported is None or exported["status"] != "ok":
        row.status, row.error = "export", (exported or {}).get("error", "not exported")
        return row
    if exported.get("ort", "ok") != "ok":
        row.notes.append(exported["ort"])
    scratch = Path(tempfile.mkdtemp(prefix=f"case-{case.family}-", dir=case.folder))
    try:
        (scratch / "case.json").write_text(json.dumps(asdict(case)))
        finished = run_isolated(_worker_command("compile", str(scratch / "case.json"), str(scratch / "result.json")),
                                timeout_s=case.timeout_s, memory_limit_mb=case.memory_limit_mb,
                                log=scratch / "worker.log")
        row.peak_mb = round(finished.peak_mb, 1)
        result_file = scratch / "result.json"
        if result_file.is_file():
            result = json.loads(result_file.read_text())
            for key, value in result.items():
                setattr(row, key, value)
        else:
            row.compile_s = round(finished.seconds, 1)
            row.status, row.error, row.where = stopped_reason(finished, scratch)
        if row.compile_s is not None:
            row.compile_s = round(row.compile_s, 2)
    finally:
        if case.keep:
            print(f"kept {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return row


def stopped_reason(finished: Finished, scratch: Path) -> tuple[str, str, str]:
    """(status, one-line error, what it was doing) for a worker that wrote no result."""
    doing = _last_progress(scratch / "progress.log")
    if finished.stopped == "timeout":
        return "timeout", f"no result after {finished.seconds:.0f} s (killed)", doing
    if finished.stopped == "memory":
        return "memory", f"killed above the memory limit ({finished.peak_mb:,.0f} MB resident)", doing
    code = finished.returncode or 0
    reason = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    tail = _last_line(scratch / "worker.log")
    return "crash", _clip(f"the compile process died ({reason})" + (f": {tail}" if tail else "")), doing


def _last_progress(path: Path) -> str:
    lines = path.read_text().splitlines() if path.is_file() else []
    return f"during: {lines[-1].split(' ', 1)[1]}" if lines else "before the first progress message"


def _last_line(path: Path) -> str:
    if not path.is_file():
        return ""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def prepare_isolated(family: str, size: str, exports: Sequence[str], folder: Path, seed: int, *,
                     timeout_s: float, memory_limit_mb: int) -> dict[str, Any]:
    """``prepare`` in a fresh process; on failure, every export of the family records the one-line reason."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "prepare.json"
    spec.write_text(json.dumps({"family": family, "size": size, "exports": list(exports), "folder": str(folder),
                                "seed": seed}))
    log = folder / "prepare.log"
    finished = run_isolated(_worker_command("prepare", str(spec)), timeout_s=timeout_s,
                            memory_limit_mb=memory_limit_mb, log=log)
    prepared = folder / PREPARED
    if prepared.is_file() and finished.returncode == 0:
        return json.loads(prepared.read_text())
    if finished.stopped:
        reason = f"building the family stopped: {finished.stopped} after {finished.seconds:.0f} s"
    else:
        reason = f"building the family failed: {_last_line(log) or f'exit status {finished.returncode}'}"
    from bitpass.tools import model_families

    known = model_families.family(family)
    info = {"family": family, "size": size, "output_kind": known.output_kind, "trained": known.trained,
            "input_names": [],
            "exports": {name: {"status": "export", "error": _clip(reason)} for name in exports}}
    prepared.write_text(json.dumps(info))
    return info


# --- the loop -------------------------------------------------------------------------------------------------
def plan(families: Sequence[str], exports: Sequence[str], pipelines: Sequence[str], *,
         cross: bool = False) -> list[tuple[str, str, str]]:
    """(family, export, pipeline) triples: every pipeline on the first export, and ``default`` (or the first
    pipeline given) on each other export; ``cross`` takes every combination."""
    triples = []
    others = list(pipelines) if cross else (["default"] if "default" in pipelines else list(pipelines[:1]))
    for fam in families:
        for i, exp in enumerate(exports):
            for pipe in (pipelines if i == 0 else others):
                triples.append((fam, exp, pipe))
    return triples


def run(families: Sequence[str], exports: Sequence[str], pipelines: Sequence[str], *, size: str, work: Path,
        cross: bool = False, seed: int = 0, timeout_s: float = FAST_TIMEOUT_S,
        memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB, keep: bool = False,
        on_row: Callable[[Row], None] = lambda row: None,
        run_one: Callable[[Case], Row] = run_case, done: Iterable[tuple[str, str, str]] = (),
        executor: Executor = SERIAL) -> list[Row]:
    """Prepare each family once and compile its cases; rows in plan order (``done`` triples are skipped).

    ``run_one`` is the per-case function (``run_case``). ``executor`` runs a family's cases (``--executor
    local:2`` compiles two at once; ``ray`` spreads them over a cluster that sees ``work``); ``on_row`` is
    called as each finishes."""
    rows = []
    skip = set(done)
    triples = [t for t in plan(families, exports, pipelines, cross=cross) if t not in skip]
    for fam in dict.fromkeys(t[0] for t in triples):
        mine = [t for t in triples if t[0] == fam]
        folder = work / f"{fam}-{size}"
        needed = list(dict.fromkeys(t[1] for t in mine))
        prepare_isolated(fam, size, needed, folder, seed, timeout_s=max(PREPARE_TIMEOUT_S, timeout_s),
                         memory_limit_mb=memory_limit_mb)
        cases = [Case(fam, size, exp, pipe, str(folder), seed, timeout_s, memory_limit_mb, keep)
                 for _, exp, pipe in mine]
        rows += executor.map(_run_one, run_one, cases, on_result=lambda _, row: on_row(row))
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def _run_one(run_one: Callable[[Case], Row], case: Case) -> Row:
    """``executor.map``'s task: the per-case function is the shared argument (picklable by name)."""
    return run_one(case)


# --- output ---------------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """CPU model, the flags that matter to the kernels, core count, and the versions that ran."""
    from bitpass.frontend.cpu import host
    from bitpass.tools.api import versions

    found = versions()
    from importlib import metadata

    for extra in ("apache-tvm", "transformers", "torchvision"):
        try:
            found[extra] = metadata.version(extra)
        except metadata.PackageNotFoundError:
            pass
    cpu = host()
    return {"cpu": cpu.model, "flags": list(cpu.kernel_flags), "cores": cpu.cores, "versions": found}


def describe_fidelity(row: Row) -> str:
    f = row.fidelity
    if not f:
        return ""
    if "accuracy" in f:
        return f"acc {100 * f['accuracy']:.2f} % ({-f['accuracy_drop_points']:+.2f} pt)"
    if "top1_agreement" in f:
        text = f"top-1 {100 * f['top1_agreement']:.1f} %"
        ties = f.get("top1_agreement_ties", f["top1_agreement"])
        if ties != f["top1_agreement"]:
            text += f" ({100 * ties:.1f} % with ties)"
        if "kl" in f:
            text += f", KL {f['kl']:.2g}"
        return text + f", cos {f['cos_mean']:.4f}"
    return f"cos min {f['cos_min']:.4f} / mean {f['cos_mean']:.4f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}×" if value < 0.1 else f"{value:.2f}×"


def _larger_batch(latency: dict[str, float]) -> str:
    """The speed ratio at the manifest's larger batch (64 unless one fp32 call there would be long: then named)."""
    key = next((k for k in latency if k != "batch_1"), None)
    if key is None:
        return ""
    return _ratio(latency[key]) + ("" if key == "batch_64" else f" (b{key.removeprefix('batch_')})")


def cells(row: Row) -> list[str]:
    """The table's cells for one row (shared by the console table and the markdown)."""
    result = "ok" if row.status == "ok" else f"{row.status}: {row.error}" + (f" [{row.where}]" if row.where else "")
    if row.notes and row.status != "ok":
        result += " (note: " + "; ".join(row.notes) + ")"
    weights = "trained" if row.trained else "random"
    return [row.family, weights, row.export, row.pipeline, result, describe_fidelity(row), row.gate, row.bitpass_gate,
            _ratio(row.weight_ratio), _ratio(row.latency.get("batch_1")), _larger_batch(row.latency),
            "" if row.compile_s is None else f"{row.compile_s:.1f}",
            "" if row.peak_mb is None else f"{row.peak_mb:,.0f}"]


COLUMNS = ("family", "weights", "export", "pipeline", "result", "fidelity", "gate", "bitpass gate", "weights ×",
           "b1 ×", "b64 ×", "compile s", "peak MB")


def header(info: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    return (f"CPU: {info['cpu']} ({info['cores']} cores); flags: {' '.join(info['flags']) or 'none of note'}\n"
            f"versions: {versions}")


def markdown(rows: Sequence[Row], info: dict[str, Any]) -> str:
    lines = [header(info).replace("\n", "  \n"), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells(row)) + " |")
    return "\n".join(lines)


def summary(rows: Sequence[Row]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        key = row.status if row.status != "ok" or not row.gate.startswith("miss") else "ok, misses the gate"
        counts[key] = counts.get(key, 0) + 1
    return f"{len(rows)} cases: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def print_table(rows: Sequence[Row], info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 220)
    console.print(header(info), markup=False)
    table = Table(title="bitpass conformance")
    for column in COLUMNS:
        table.add_column(column, overflow="fold", justify="right" if "×" in column or column in
                         ("compile s", "peak MB") else "left")
    for row in rows:
        table.add_row(*cells(row))
    console.print(table)
    console.print(summary(rows), markup=False)


def write_json(path: Path, rows: Sequence[Row], info: dict[str, Any], options: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps({"machine": info, "options": options, "rows": [asdict(r) for r in rows]}, indent=1))
    tmp.replace(path)


def rows_from_json(path: Path) -> list[Row]:
    return [Row(**row) for row in json.loads(path.read_text())["rows"]]


# --- command line ---------------------------------------------------------------------------------------------------
def _names(text: str | None, known: Sequence[str], what: str) -> list[str] | None:
    from bitpass.frontend.errors import UsageError

    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UsageError(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m bitpass.tools.conformance`` (for a ``bitpass conformance`` subcommand too)."""
    p.add_argument("--fast", action="store_true",
                   help=f"small configs of every family, exports {', '.join(FAST_EXPORTS)}, timeout "
                        f"{FAST_TIMEOUT_S:.0f} s (default: real sizes, every export, timeout {FULL_TIMEOUT_S:.0f} s)")
    p.add_argument("--families", metavar="A,B", help="comma-separated families (default: all; see --list)")
    p.add_argument("--exports", metavar="A,B", help="comma-separated exports; the first gets every pipeline")
    p.add_argument("--pipelines", metavar="A,B", help=f"comma-separated, from {', '.join(PIPELINES)} (default: all)")
    p.add_argument("--cross", action="store_true", help="every export with every pipeline")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds per compile before it is killed")
    p.add_argument("--memory-limit", type=int, default=DEFAULT_MEMORY_LIMIT_MB, metavar="MB",
                   help="kill a compile whose resident memory passes this (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", metavar="DIR", help="scratch folder for exports and artifacts (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep exports and artifacts in --work")
    p.add_argument("--json", metavar="OUT", help="write every row as JSON (rewritten after each case)")
    p.add_argument("--resume", action="store_true", help="with --json: skip the cases OUT already holds")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown (for the README)")
    p.add_argument("--executor", default="serial", metavar="SPEC",
                   help=f"{EXECUTOR_HELP}; cases run side by side, so their timings disturb each other")
    p.add_argument("--list", action="store_true", help="list families, exports and pipelines, then exit")


def run_command(args: argparse.Namespace) -> int:
    from bitpass.tools import model_families

    if args.list:
        for fam in model_families.FAMILIES.values():
            print(f"family   {fam.name:26s} {fam.output_kind:10s} {'trained' if fam.trained else 'random':8s} "
                  f"{fam.summary}")
        for exp in model_families.EXPORTS.values():
            print(f"export   {exp.name:26s} {exp.summary}")
        print(f"export   {model_families.MODULE:26s} bitpass.tools.api.compile(module, example_inputs=...)")
        for name, options in PIPELINES.items():
            print(f"pipeline {name:26s} bitpass compile {' '.join(options) or '(no options)'}")
        return 0
    families = _names(args.families, list(model_families.FAMILIES), "family") or list(model_families.FAMILIES)
    exports = _names(args.exports, model_families.EXPORT_NAMES, "export") or \
        list(FAST_EXPORTS if args.fast else model_families.EXPORT_NAMES)
    pipelines = _names(args.pipelines, list(PIPELINES), "pipeline") or list(PIPELINES)
    size = "fast" if args.fast else "full"
    timeout = args.timeout or (FAST_TIMEOUT_S if args.fast else FULL_TIMEOUT_S)
    info = machine()
    options = {"size": size, "families": families, "exports": exports, "pipelines": pipelines, "cross": args.cross,
               "timeout_s": timeout, "memory_limit_mb": args.memory_limit, "seed": args.seed}
    out = Path(args.json) if args.json else None
    rows: list[Row] = rows_from_json(out) if (out and args.resume and out.is_file()) else []
    done = [(r.family, r.export, r.pipeline) for r in rows]
    print(header(info), file=sys.stderr)
    total = len(set(plan(families, exports, pipelines, cross=args.cross)) - set(done))

    def on_row(row: Row) -> None:
        rows.append(row)
        count = len(rows) - len(done)
        print(f"[{count}/{total}] {row.family} / {row.export} / {row.pipeline}: {cells(row)[4]}"
              f"{'  ' + describe_fidelity(row) if row.fidelity else ''}", file=sys.stderr, flush=True)
        if out:
            write_json(out, rows, info, options)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bitpass-conformance-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        with executor_from_spec(args.executor) as executor:
            run(families, exports, pipelines, size=size, work=work, cross=args.cross, seed=args.seed,
                timeout_s=timeout, memory_limit_mb=args.memory_limit, keep=args.keep, on_row=on_row, done=done,
                executor=executor)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    order = {t: i for i, t in enumerate(plan(families, exports, pipelines, cross=args.cross))}
    rows.sort(key=lambda r: order.get((r.family, r.export, r.pipeline), len(order)))
    print_table(rows, info)
    if args.markdown:
        print(markdown(rows, info))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:  # internal: one case or one family's preparation, in its own process
        kind, *rest = argv[1:]
        return _worker(*rest) if kind == "compile" else _prepare_worker(*rest)
    parser = argparse.ArgumentParser(prog="python -m bitpass.tools.conformance", description=__doc__.splitlines()[0],
                                     epilog="\n".join(__doc__.splitlines()[2:6]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    from bitpass.frontend.errors import BitpassError

    try:
        return run_command(args)
    except BitpassError as err:
        print(f"conformance: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("conformance: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
