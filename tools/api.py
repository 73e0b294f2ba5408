"""The Python API: ``compile`` a model into an artifact, ``verify`` and ``load`` artifacts.

    from bitpass.tools import compile
    artifact = compile("model.onnx", "out/", calibration="calib.npz", evaluation="eval.npz")
    artifact = compile(module, "out/", example_inputs=(torch.zeros(1, 3, 32, 32),), calibration=...)
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from bitpass.backends import artifact as artifact_io
from bitpass.backends import layers as layer_report
from bitpass.backends import measure, report
from bitpass.backends.base import Backend, Runner, reference_runner
from bitpass.frontend import Dataset, Model, from_arrays, load_model, load_npz
from bitpass.frontend.errors import BitpassError, UnsupportedOperatorError, UsageError
from bitpass.passes.infra import PassContext, Target
from bitpass.passes.instruments import Timing
from bitpass.passes.pipeline import Pipeline
from bitpass.plugins import Registry, default_registry

REFERENCE = "reference.onnx"
_VERSIONED = ("bitpass", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "numpy", "torch", "scipy")

DataSource = str | Path | Mapping[str, np.ndarray] | Dataset | None


@dataclass(frozen=True)
class Artifact:
    """A compiled artifact on disk and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest["metrics"]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _dataset(source: DataSource, model: Model, role: str) -> Dataset | None:
    if source is None or isinstance(source, Dataset):
        return source
    if isinstance(source, (str, Path)):
        return load_npz(source, model.inputs, role=role)
    return from_arrays(source, model.inputs, role=role)


def _data_record(data: Dataset | None) -> dict[str, Any] | None:
    if data is None:
        return None
    return {"source": data.source, "sha256": data.sha256, "samples": len(data), "labels": data.labels is not None}


def _legalize(backend: Backend, model: Model, target: str, when: str) -> None:
    problems = backend.legalize(model, target)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UnsupportedOperatorError(f"{when}: {problems[0]}{more}")


def _sizes(reference_model: Model, weight_bytes: int, ref_bytes: int, directory: Path,
           files: Sequence[str]) -> dict[str, Any]:
    """Weight bytes (as the artifact stores them) and the deployable file's bytes, each beside the fp32 reference."""
    deployable = next((name for name in files if name.endswith(".so")), "model.onnx")
    size = (directory / deployable).stat().st_size
    sizes = {"fp32_weight_bytes": reference_model.weight_bytes(), "weight_bytes": weight_bytes,
             "weight_ratio": weight_bytes / max(reference_model.weight_bytes(), 1),
             "fp32_file_bytes": ref_bytes, "file": deployable, "file_bytes": size, "file_ratio": size / max(ref_bytes, 1)}
    if (directory / REFERENCE).is_file():  # unstructured zeros save nothing uncompressed: shown here only
        fp32_zip = artifact_io.deflated_size(directory / REFERENCE)
        zipped = artifact_io.deflated_size(directory / deployable)
        sizes.update(fp32_compressed_bytes=fp32_zip, compressed_bytes=zipped, compressed_ratio=zipped / max(fp32_zip, 1))
    return sizes


def _measure(reference: Runner, runner: Runner, ref_bytes: int, weight_bytes: int, reference_model: Model,
             directory: Path, files: Sequence[str], evaluation: Dataset | None, calibration: Dataset | None, latency: bool,
             progress: Callable[[str], None]) -> dict[str, Any]:
    metrics: dict[str, Any] = {"size": _sizes(reference_model, weight_bytes, ref_bytes, directory, files)}
    if evaluation is not None:
        progress(f"measuring quality on {len(evaluation)} held-out samples")
        metrics["quality"] = measure.quality(reference, runner, evaluation)
    timing_data = evaluation or calibration
    if latency and timing_data is not None:
        progress("measuring latency at batch 1 and 64 against fp32")
        metrics["latency"] = measure.latency_table(reference, runner, timing_data)
    return metrics


def compile(  # noqa: A001 - the verb users expect; shadows the builtin only here
    model: Any,
    output_dir: str | Path,
    **options: Any,
) -> Artifact:
    """Compile ``model`` (ONNX path, ModelProto, nn.Module + example_inputs, or Model) into ``output_dir``.

    Options: ``pipeline`` (name, spec or file; default ``default``), ``calibration`` and
    ``evaluation`` (.npz path, {input: array} or Dataset), ``example_inputs`` (torch), ``backend``,
    ``target``, ``plugin_paths``, ``force``, ``latency`` (measure it; default True), ``seed``,
    ``progress`` (callable taking a message), ``overrides`` ({pass name: options}, e.g.
    ``{"allocate-bits": {"budget": "avg-bits=4"}}``, which turns ``default`` into ``mixed``).
    Nothing is written unless everything succeeds: the artifact appears atomically.

    Never slower than fp32: when bit allocation picked compute formats (int8 QDQ, MatMulNBits)
    from per-layer timings but the whole artifact measures slower than fp32, it is compiled
    again with every quantized layer packed (fp32 speed), and the manifest says so.
    """
    artifact = _compile(model, output_dir, **options)
    slower = _slower_than_fp32(artifact.manifest)
    if slower:
        say = options.get("progress") or (lambda _message: None)
        say(f"the artifact measured {slower}: recompiling with every quantized layer packed")
        overrides = dict(options.get("overrides") or {})
        overrides["allocate-bits"] = {**overrides.get("allocate-bits", {}), "formats": "packed"}
        note = f"compute formats chosen from per-layer timings were slower end to end ({slower}); used packed"
        artifact = _compile(model, output_dir, **{**options, "overrides": overrides, "force": True},
                            notes=[note])
    return artifact


def _slower_than_fp32(manifest: dict[str, Any], tolerance: float = 0.05) -> str | None:
    """How the artifact is slower than fp32 when allocation chose compute formats; else None."""
    formats = manifest.get("records", {}).get("allocation", {}).get("formats", {})
    if not any(f["format"] not in ("packed", "fp32") for f in formats.values()):
        return None
    slow = [f"{k.replace('_', ' ')} {row['speedup']:.2f}x" for k, row in manifest["metrics"].get("latency", {}).items()
            if row["speedup"] < 1 - tolerance]
    return ", ".join(slow) or None


def _compile(
    model: Any,
    output_dir: str | Path,
    *,
    pipeline: str = "default",
    calibration: DataSource = None,
    evaluation: DataSource = None,
    example_inputs: Any = None,
    backend: str = "onnxruntime",
    target: str | None = None,
    plugin_paths: Sequence[str | Path] = (),
    force: bool = False,
    latency: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    registry: Registry | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    notes: Sequence[str] = (),
) -> Artifact:
    """One compilation (see ``compile``)."""
    say = progress or (lambda _message: None)
    output_dir = Path(output_dir)
    artifact_io.check_destination(output_dir, force=force)
    registry = registry or default_registry(plugin_paths)
    backend_impl: Backend = registry.backend(backend)()
    target = target or backend_impl.default_target
    backend_impl.check_target(target)
    passes = registry.pipeline(pipeline)
    if overrides:
        passes = apply_overrides(passes, overrides, registry)

    say("importing model")
    source = load_model(model, example_inputs)
    calib = _dataset(calibration, source, "calibration")
    evaluation_data = _dataset(evaluation, source, "evaluation")
    _legalize(backend_impl, source, target, "input model")
    reference_model = source.clone()

    timing = Timing()
    target_options = {"capabilities": backend_impl.capabilities(target)}
    if latency:
        probe = backend_impl.latency_probe(target)
        if probe is not None:
            target_options["latency_probe"] = probe
    ctx = PassContext(calibration=calib, evaluation=evaluation_data, target=Target(backend, target, target_options),
                      instruments=[timing], seed=seed, progress=say)
    final = passes.run(source, ctx)
    if notes:
        ctx.records.setdefault("notes", []).extend(notes)
    _legalize(backend_impl, final, target, "compiled model")

    with artifact_io.staging(output_dir, force=force) as tmp:
        say(f"emitting {backend} artifact")
        files = backend_impl.emit(final, tmp, target)
        stored = backend_impl.stored_weight_bytes(final, tmp)
        backend_records = backend_impl.records(tmp)
        if backend_records:
            ctx.records["backend"] = backend_records
        reference_bytes = reference_model.to_bytes()
        (tmp / REFERENCE).write_bytes(reference_bytes)
        if backend_impl.runs_on_host(target):
            runner = backend_impl.load(tmp, {}, for_timing=True)
            reference = reference_runner(reference_model, for_timing=True)
            metrics = _measure(reference, runner, len(reference_bytes), stored, reference_model, tmp, files,
                               evaluation_data, calib, latency, say)
        else:
            say(f"target {target} does not run on this machine: quality and latency are not measured")
            metrics = {"size": _sizes(reference_model, stored, len(reference_bytes), tmp, files),
                       "not_measured": f"target {target} does not run on this machine"}
        records = layer_report.layer_records(reference_model, final)
        manifest = {
            "schema": artifact_io.MANIFEST_SCHEMA,
            "versions": versions(),
            "input_model": {"name": source.provenance.name, "kind": source.provenance.kind,
                            "sha256": source.provenance.sha256, "notes": source.provenance.notes},
            "pipeline": passes.spec(),
            "pipeline_name": passes.name,
            "backend": backend, "target": target,
            "inputs": [{"name": s.name, "shape": list(s.shape or []), "dtype": str(s.dtype)} for s in final.inputs],
            "outputs": [{"name": s.name, "shape": list(s.shape or []), "dtype": str(s.dtype)} for s in final.outputs],
            "data": {"calibration": _data_record(calib), "evaluation": _data_record(evaluation_data)},
            "passes": [{"pass": name, "seconds": round(seconds, 4)} for name, seconds in timing.seconds],
            "records": _jsonable(ctx.records),
            "layers": records,
            "summary": layer_report.summarize(records),
            "metrics": metrics,
            "seed": seed,
            "files": artifact_io.file_table(tmp, [*files, REFERENCE]),
        }
        artifact_io.write_manifest(tmp, manifest)
        (tmp / "report.html").write_text(report.render(manifest))
    return Artifact(output_dir, manifest)


def apply_overrides(pipeline: Pipeline, overrides: Mapping[str, Mapping[str, Any]], registry: Registry) -> Pipeline:
    """Replace the options of named passes; switch ``default`` to ``mixed`` when it lacks the pass."""
    names = {p.name for p in pipeline.passes}
    if "allocate-bits" in overrides and "allocate-bits" not in names and "allocate-joint" in names:
        # --budget/--method/--sweep address whichever allocator the pipeline has
        joint_fields = registry.pass_class("allocate-joint").Config.model_fields
        overrides = {**{k: v for k, v in overrides.items() if k != "allocate-bits"},
                     "allocate-joint": {k: v for k, v in overrides["allocate-bits"].items() if k in joint_fields}}
    if not set(overrides) <= names and pipeline.name == "default":
        pipeline = registry.pipeline("mixed")
        names = {p.name for p in pipeline.passes}
    missing = sorted(set(overrides) - names)
    if missing:
        raise UsageError(f"the pipeline {pipeline.spec()!r} has no {', '.join(missing)} pass to take those options; "
                         f"use --pipeline mixed or add the pass")
    rebuilt = [type(p)(**{**p.config.model_dump(exclude_defaults=True), **overrides[p.name]}) if p.name in overrides
               else p for p in pipeline.passes]
    return Pipeline(rebuilt, name=pipeline.name)


def _jsonable(value: Any) -> Any:
    """Records as plain JSON types (numpy scalars and tuples converted; sets sorted)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# --- using artifacts --------------------------------------------------------
def open_artifact(path: str | Path, registry: Registry | None = None) -> tuple[dict[str, Any], Runner]:
    """The manifest and a runner for an artifact directory (files checked against their hashes)."""
    path = Path(path)
    manifest = artifact_io.read_manifest(path)
    problems = artifact_io.check_files(path, manifest)
    if problems:
        raise BitpassError(f"{path}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    registry = registry or default_registry()
    runner = registry.backend(manifest["backend"])().load(path, manifest)
    return manifest, runner


def _specs(manifest: dict[str, Any]) -> list:
    from bitpass.frontend import TensorSpec

    return [TensorSpec(i["name"], tuple(d if isinstance(d, int) else str(d) for d in i["shape"]) or None,
                       np.dtype(i["dtype"])) for i in manifest["inputs"]]


def run(path: str | Path, inputs: str | Path | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an artifact on a batch of inputs; outputs by name."""
    manifest, runner = open_artifact(path)
    data = load_npz(inputs, _specs(manifest), role="input") if isinstance(inputs, (str, Path)) \
        else from_arrays(inputs, _specs(manifest), role="input")
    outputs = measure.predict(runner, data)
    return dict(zip(runner.output_names, outputs))


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def verify(path: str | Path, evaluation: DataSource = None, *, tolerance: float = 0.005,
           emulate: bool = False) -> list[Check]:
    """Re-check an artifact: files match their hashes, annotations match the plan, and quality still
    meets the recorded figures (within ``tolerance``) when evaluation data is given. ``emulate`` runs an
    artifact of a foreign target (aarch64) under emulation and compares it with the same plan built for
    this machine: rtol 1e-3 when every layer is fp32, else the same top-1 on every sample."""
    path = Path(path)
    manifest = artifact_io.read_manifest(path)
    checks = []
    problems = artifact_io.check_files(path, manifest)
    checks.append(Check("files", not problems, "; ".join(problems) or "all files match their sha256"))
    if problems:
        return checks
    from bitpass.frontend import from_onnx

    final = from_onnx(path / "model.onnx")
    reference_model = from_onnx(path / REFERENCE)
    now = {r["id"]: r.get("bits") for r in layer_report.layer_records(reference_model, final)}
    mismatched = [r["id"] for r in manifest["layers"] if r.get("bits") != now.get(r["id"])]
    checks.append(Check("plan", not mismatched, f"layers differ from the recorded plan: {', '.join(mismatched)}"
                        if mismatched else f"{len(now)} layers match the recorded bits"))
    backend = default_registry().backend(manifest["backend"])()
    if emulate:
        if evaluation is None:
            raise UsageError("verify --emulate needs samples to run: give --eval FILE")
        data = _dataset(evaluation, reference_model, "evaluation")
        assert data is not None
        checks.append(_emulated_check(backend, path, manifest, final, data.head(EMULATED_SAMPLES)))
        return checks
    if not backend.runs_on_host(manifest["target"]):
        checks.append(Check("quality", True, f"target {manifest['target']} does not run on this machine; "
                                             f"`verify --emulate` runs it under emulation"))
        return checks
    _, runner = open_artifact(path)
    if evaluation is None:
        return checks
    data = _dataset(evaluation, reference_model, "evaluation")
    assert data is not None
    quality = measure.quality(reference_runner(reference_model), runner, data)
    recorded = manifest["metrics"].get("quality")
    if recorded is None:
        checks.append(Check("quality", True, "no quality was recorded at compile time; measured only"))
        return checks
    if "accuracy" in recorded and "accuracy" in quality:
        got, want = quality["accuracy"]["artifact"], recorded["accuracy"]["artifact"]
        checks.append(Check("accuracy", got >= want - tolerance, f"artifact accuracy {got:.4f}, recorded {want:.4f}"))
    got_f, want_f = quality["fidelity"], recorded["fidelity"]
    ok = (got_f["cosine"] >= want_f["cosine"] - tolerance
          and got_f["top1_agreement"] >= want_f["top1_agreement"] - tolerance)
    checks.append(Check("fidelity", ok, f"cosine {got_f['cosine']:.5f} (recorded {want_f['cosine']:.5f}), top-1 "
                        f"agreement {got_f['top1_agreement']:.4f} (recorded {want_f['top1_agreement']:.4f})"))
    if data.sha256 != (manifest["data"].get("evaluation") or {}).get("sha256"):
        checks.append(Check("data", True, "evaluation data differs from compile time: compared with tolerance"))
    return checks


#: samples an emulated run compares (qemu is slow; the check is about numerics, not statistics)
EMULATED_SAMPLES = 32


def _emulated_check(backend: Backend, path: Path, manifest: dict[str, Any], final: Model, data: Dataset) -> Check:
    import tempfile

    emulated = measure.predict(backend.emulated_runner(path, manifest), data)[0]
    with tempfile.TemporaryDirectory(prefix="bitpass-host-twin-") as tmp:
        native = measure.predict(backend.host_twin(final, Path(tmp)), data)[0]
    all_fp32 = all(r.get("bits", {}).get("weight", 32) == 32 for r in manifest["layers"])
    if all_fp32:
        error = float(np.max(np.abs(emulated - native) / (np.abs(native) + 1e-3)))
        return Check("emulated", error <= 1e-3, f"{manifest['target']} under emulation vs the host build on "
                                                f"{len(data)} samples: max relative error {error:.2e} (limit 1e-3)")
    agree = float((emulated.reshape(len(data), -1).argmax(1) == native.reshape(len(data), -1).argmax(1)).mean())
    return Check("emulated", agree == 1.0, f"{manifest['target']} under emulation vs the host build on {len(data)} "
                                           f"samples: top-1 agreement {agree:.4f} (must be 1)")


def default_progress(message: str) -> None:
    print(f"[bitpass] {message}", file=sys.stderr, flush=True)
