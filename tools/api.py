"""The Python API: ``compile`` a model into an artifact, ``verify`` and ``load`` artifacts.

    from bitpass.tools import compile
    artifact = compile("model.onnx", "out/", calibration="calib.npz", evaluation="eval.npz")
    artifact = compile(module, "out/", example_inputs=(torch.zeros(1, 3, 32, 32),), calibration=...)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from bitpass.backends import artifact as artifact_io
from bitpass.backends import layers as layer_report
from bitpass.backends import measure, report
from bitpass.backends.base import Backend, Runner, reference_runner
from bitpass.frontend import Dataset, Model, annotation, from_arrays, load_model, load_npz
from bitpass.frontend.decoder import DecoderSpec, complete_lm_inputs, export_decoder, is_causal_lm, lm_spec
from bitpass.frontend.errors import BitpassError, UnsupportedOperatorError, UsageError
from bitpass.frontend.model import PagedWeights, drop_mapped_pages, release_freed_memory
from bitpass.frontend.shapes import check_fixed, fix_dims
from bitpass.passes.analyses import ACTIVATION_RANGES
from bitpass.passes.executors import SERIAL, Executor, executor_from_spec
from bitpass.passes.infra import PassContext, Target
from bitpass.passes.instruments import PassInstrument, Timing, lifetime_peak_mb
from bitpass.passes.pipeline import Pipeline
from bitpass.passes.progress import Reporter, as_reporter
from bitpass.plugins import Registry, default_registry
from bitpass.tools import quality

if TYPE_CHECKING:
    from bitpass.passes.format_search import Replay

REPORT = "report.html"
_VERSIONED = ("bitpass", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "numpy", "torch", "scipy")

DataSource = str | Path | Mapping[str, np.ndarray] | np.ndarray | Sequence[np.ndarray] | Dataset | None


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
    """Samples for ``model``: an .npz path, ``{input name: array}``, one array (a single-input model), or a
    tuple of arrays in input order (a torch module's ``forward()`` order: its input names need not be known)."""
    if source is None or isinstance(source, Dataset):
        return source
    lm = lm_spec(model)
    if lm is not None:
        return _lm_dataset(source, model, lm, role)
    if isinstance(source, (str, Path)):
        return load_npz(source, model.inputs, role=role)
    names = [spec.name for spec in model.inputs]
    if isinstance(source, np.ndarray):
        if len(names) != 1:
            raise UsageError(f"{role} data is one array, but the model takes {len(names)} inputs "
                             f"({', '.join(names)}): give {{name: array}}")
        source = {names[0]: source}
    elif isinstance(source, (tuple, list)):
        if len(source) != len(names):
            raise UsageError(f"{role} data holds {len(source)} arrays, but the model takes {len(names)} inputs "
                             f"({', '.join(names)})")
        source = dict(zip(names, source))
    if not isinstance(source, Mapping):
        raise UsageError(f"{role} data must be an .npz path, {{input name: array}}, an array or a tuple of arrays, "
                         f"not {type(source).__name__}")
    return from_arrays(source, model.inputs, role=role)


def _lm_dataset(source: DataSource, model: Model, lm: DecoderSpec, role: str) -> Dataset:
    """A language model's data: token ids (an .npz with ``input_ids``, ``{name: array}``, or the ids array itself),
    completed into full feeds (mask, positions, empty cache: each sample one prefill) with per-token labels."""
    from bitpass.frontend.data import read_npz

    name = str(source) if isinstance(source, (str, Path)) else "<arrays>"
    if isinstance(source, (str, Path)):
        arrays = read_npz(source, role=role)
    elif isinstance(source, np.ndarray):
        arrays = {lm.input_ids: source}
    elif isinstance(source, Mapping):
        arrays = dict(source)
    elif isinstance(source, (tuple, list)):
        arrays = dict(zip([spec.name for spec in model.inputs], source))
    else:
        raise UsageError(f"{role} data must be an .npz path, {{input name: array}} or an array of token ids, "
                         f"not {type(source).__name__}")
    feeds, labels = complete_lm_inputs(arrays, lm, where=f"{role} data {name}")
    data = from_arrays(feeds, model.inputs, source=name, role=role)
    if labels is None:
        return data
    digest = hashlib.sha256(data.sha256.encode() + np.ascontiguousarray(labels, np.int64).tobytes()).hexdigest()
    return Dataset(data.inputs, np.asarray(labels, np.int64), digest, data.source, data.fixed_batch)


def _import(model: Any, example_inputs: Any) -> Model:
    """The model as a ``Model``; a transformers causal LM is exported with its KV cache (prefill and one-token
    decode in one graph: ``bitpass.frontend.decoder.export_decoder``), ``example_inputs`` not needed."""
    if is_causal_lm(model):
        return export_decoder(model)[0]
    return load_model(model, example_inputs)


def _decoder_overrides(overrides: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
    """The mixed-precision options as the decoder pipeline's: ``--budget avg-bits=N`` becomes
    ``quantize-weights(bits=N)``; what the weight-only pipeline has no use for is refused with what to do."""
    merged = {name: dict(options) for name, options in (overrides or {}).items()}
    allocate = merged.pop("allocate-bits", {})
    budget = str(allocate.pop("budget", "") or "")
    if budget:
        kind, _, value = budget.partition("=")
        try:
            bits = float(value)
        except ValueError:
            bits = float("nan")
        if "," in budget or kind.strip() != "avg-bits" or not 2 <= bits <= 8:
            raise UsageError(f"--budget {budget}: a decoder language model compiles weight-only (MatMulNBits), "
                             f"budgeted by --budget avg-bits=N with N from 2 to 8 (a fraction such as 3.5 mixes "
                             f"the two widths around it inside and across layers); for other budgets use "
                             f"--pipeline mixed")
        merged.setdefault("quantize-weights", {})["bits"] = bits
    if allocate:
        raise UsageError(f"{', '.join('--' + k.replace('_', '-') for k in sorted(allocate))} chooses how the mixed "
                         f"pipeline allocates bits; a decoder language model's weight-only pipeline has no such "
                         f"step: leave it out, or use --pipeline mixed")
    return merged or None


def _decoder_pipeline_fits(lm: DecoderSpec, overrides: Mapping[str, Mapping[str, Any]] | None) -> bool:
    """Whether ``default`` becomes ``decoder``: a language model (a KV cache, or a vocabulary head), unless the
    user asked for packed storage (the mixed pipeline's)."""
    wants_packed = (overrides or {}).get("allocate-bits", {}).get("formats") == "packed"
    return (lm.layers > 0 or lm.vocab >= 256) and not wants_packed


def _data_record(data: Dataset | None) -> dict[str, Any] | None:
    if data is None:
        return None
    return {"source": data.source, "sha256": data.sha256, "samples": len(data), "labels": data.labels is not None}


def _legalize(backend: Backend, model: Model, target: str, when: str) -> None:
    problems = backend.legalize(model, target)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UnsupportedOperatorError(f"{when}: {problems[0]}{more}")


#: fp32 models up to this size always get their zipped size measured; larger ones only when the artifact is sparse
#: (deflating costs ~30 CPU s per GB, and dense weights do not compress: a 124 M GPT-2 spent 42 s on it)
ZIP_ALWAYS_BYTES = 256 << 20


def _sizes(reference_model: Model, weight_bytes: int, reference_file: Path, directory: Path,
           files: Sequence[str], *, sparse: bool = True) -> dict[str, Any]:
    """Weight bytes (as the artifact stores them) and the deployable file's bytes, each beside the fp32 reference;
    the zipped sizes too when the artifact is ``sparse`` or the model small (``ZIP_ALWAYS_BYTES``)."""
    deployable = next((name for name in files if name.endswith(".so")), "model.onnx")
    size, fp32_size = _with_external_data(directory / deployable), _with_external_data(reference_file)
    sizes = {"fp32_weight_bytes": reference_model.weight_bytes(), "weight_bytes": weight_bytes,
             "weight_ratio": weight_bytes / max(reference_model.weight_bytes(), 1),
             "fp32_file_bytes": fp32_size, "file": deployable, "file_bytes": size,
             "file_ratio": size / max(fp32_size, 1)}
    if not sparse and fp32_size > ZIP_ALWAYS_BYTES:
        return sizes
    # unstructured zeros save nothing uncompressed: the zipped sizes show them
    fp32_zip = artifact_io.deflated_size(reference_file)
    zipped = artifact_io.deflated_size(directory / deployable)
    sizes.update(fp32_compressed_bytes=fp32_zip, compressed_bytes=zipped, compressed_ratio=zipped / max(fp32_zip, 1))
    return sizes


def _with_external_data(path: Path) -> int:
    """Bytes of a model file and of the external data ``Model.save`` writes beside it past 2 GiB."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _sparse(model: Model) -> bool:
    """Whether any layer of ``model`` was pruned (its zipped size can then differ from its file size)."""
    return any((annotation.sparsity(layer.node) or 0) > 0 for layer in model.layers())


#: fp32 weights above which the compile's measurements hold one ONNX Runtime session at a time (a language model's
#: fp32 and artifact sessions are 1.6 GB each at 355 M): the reference's outputs are kept instead of its session
ONE_SESSION_AT_A_TIME_BYTES = 512 << 20


@dataclass
class _Sessions:
    """The fp32 reference's and the artifact's runners for measuring, and how to load either again by path.
    ``in_turn``: at most one is held, asking for one releases the other (``ONE_SESSION_AT_A_TIME_BYTES``)."""

    load_reference: Callable[[], Runner]
    load_artifact: Callable[[], Runner]
    in_turn: bool
    reference: Runner | None = None
    artifact: Runner | None = None

    def get_reference(self) -> Runner:
        if self.reference is None:
            if self.in_turn:
                self.release()
            self.reference = self.load_reference()
        return self.reference

    def get_artifact(self) -> Runner:
        if self.artifact is None:
            if self.in_turn:
                self.release()
            self.artifact = self.load_artifact()
        return self.artifact

    def release(self) -> None:
        """Drop both sessions (their weights go back to the system before a measuring child starts)."""
        self.reference = self.artifact = None
        release_freed_memory()


def _measure(sessions: _Sessions, reference_file: Path, weight_bytes: int, reference_model: Model,
             directory: Path, files: Sequence[str], evaluation: Dataset | None, calibration: Dataset | None, latency: bool,
             progress: Callable[[str], None], lm: DecoderSpec | None = None,
             predicted: tuple[list[np.ndarray], list[np.ndarray]] | None = None, sparse: bool = True) -> dict[str, Any]:
    """Size, quality on ``evaluation`` and latency against fp32; ``predicted``: (fp32, artifact) outputs on
    ``evaluation`` the quality gate already has; ``sparse``: whether the artifact has pruned layers."""
    metrics: dict[str, Any] = {"size": _sizes(reference_model, weight_bytes, reference_file, directory, files,
                                              sparse=sparse)}
    if lm is not None:
        names = [spec.name for spec in reference_model.outputs]
        return {**metrics, **_measure_lm(sessions, names, reference_file, directory, evaluation, latency, progress,
                                         lm, predicted)}
    reference, runner = sessions.get_reference(), sessions.get_artifact()  # timed side by side: both held
    if evaluation is not None:
        progress(f"measuring quality on {len(evaluation)} held-out samples")
        known_reference, known_artifact = predicted or (None, None)
        metrics["quality"] = measure.quality(reference, runner, evaluation, reference_outputs=known_reference,
                                             artifact_outputs=known_artifact)
    timing_data = evaluation or calibration
    if latency and timing_data is not None:
        progress("measuring latency at batch 1 and a larger batch against fp32")
        metrics["latency"] = measure.latency_table(reference, runner, timing_data)
    return metrics


def _lm_fidelity(reference: Runner | Callable[[], Runner], runner: Runner | Callable[[], Runner], data: Dataset,
                 lm: DecoderSpec, predicted: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
                 output_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-token fidelity of a language model (``quality.lm_quality``) on ``data``'s windows; ``predicted``: the
    (fp32, artifact) outputs on ``data`` when known (a 124 M model's two predictions cost 20 CPU s and 1 GB).
    ``reference`` and ``runner`` may be functions that give the runner when it is needed (one at a time)."""
    def get(source: Runner | Callable[[], Runner]) -> Runner:
        return source if isinstance(source, Runner) else source()

    index = list(output_names or get(reference).output_names).index(lm.logits)
    if predicted is None or index >= min(len(predicted[0]), len(predicted[1])):
        known = measure.predict(get(reference), data, _lm_batch(lm, data))
        predicted = known, measure.predict(get(runner), data, _lm_batch(lm, data))
    ref, got = predicted[0][index], predicted[1][index]
    fidelity = quality.lm_quality(ref, got, data.inputs[lm.input_ids], data.labels)
    drop_mapped_pages([ref, got])
    return {"samples": len(data), **fidelity}


def _lm_batch(lm: DecoderSpec | None, data: Dataset) -> int:
    """Windows per prediction batch of a language model (its float32 logits: ``measure.batch_for``); other models
    ``measure.EVAL_BATCH`` samples."""
    if lm is None or lm.input_ids not in data.inputs:
        return measure.EVAL_BATCH
    ids = data.inputs[lm.input_ids]
    return measure.batch_for(4 * max(lm.vocab, 1) * (int(ids.shape[1]) if ids.ndim >= 2 else 1))


def _decoder_session(runner: Runner, source: bytes | Path, lm: DecoderSpec) -> Any:
    """A decoder session over ``runner``'s ONNX Runtime session (made for timing already: a second session of a
    350 M model would cost its weights again and seconds to build), else one loaded from ``source``."""
    import onnxruntime as ort

    from bitpass.backends.onnxruntime import generate

    session = getattr(runner, "session", None)
    if isinstance(session, ort.InferenceSession):
        return generate.DecoderSession(session, lm)
    return generate.DecoderSession.load(source, lm, for_timing=True)


def _measure_lm(sessions: _Sessions, output_names: Sequence[str], reference_file: Path, directory: Path,
                evaluation: Dataset | None, latency: bool, progress: Callable[[str], None], lm: DecoderSpec,
                predicted: tuple[list[np.ndarray], list[np.ndarray]] | None = None) -> dict[str, Any]:
    """A language model's figures: per-token quality, decode and prefill speed (both sessions alternately, or one
    after the other when ``sessions.in_turn``), session memory (fresh processes, once this one holds no session)."""
    from bitpass.backends.onnxruntime import generate

    metrics: dict[str, Any] = {}
    if evaluation is not None:
        progress(f"measuring per-token quality on {len(evaluation)} held-out windows")
        metrics["quality"] = _lm_fidelity(sessions.get_reference, sessions.get_artifact, evaluation, lm, predicted,
                                          output_names)
    model_path = directory / "model.onnx"
    if latency and model_path.is_file():
        progress("measuring decode (one token after 128 cached) and prefill (128 tokens) against fp32")
        if sessions.in_turn:
            metrics["latency"] = generate.decoder_latency_in_turn(
                lambda: _decoder_session(sessions.get_reference(), reference_file, lm),
                lambda: _decoder_session(sessions.get_artifact(), model_path, lm))
        else:
            metrics["latency"] = generate.decoder_latency(
                _decoder_session(sessions.get_reference(), reference_file, lm),
                _decoder_session(sessions.get_artifact(), model_path, lm))
    sessions.release()  # the children below measure a session's memory: none of this process's is held beside them
    if model_path.is_file():
        progress("measuring session memory of fp32 and the artifact in fresh processes")
        memory = {"fp32": generate.session_memory(reference_file, lm),
                  "artifact": generate.session_memory(model_path, lm)}
        metrics["memory"] = {name: {key: int(value) for key, value in vars(figures).items()}
                             for name, figures in memory.items()}
        metrics["memory"]["session_ratio"] = memory["artifact"].session_rss / max(memory["fp32"].session_rss, 1)
    return metrics


def compile(  # noqa: A001 - the verb users expect; shadows the builtin only here
    model: Any,
    output_dir: str | Path,
    *,
    pipeline: str = "default",
    calibration: DataSource = None,
    evaluation: DataSource = None,
    example_inputs: Any = None,
    budget: str | Sequence[str] | None = None,
    method: str | None = None,
    sensitivity: str | None = None,
    formats: str | None = None,
    sweep: bool = False,
    backend: str = "onnxruntime",
    target: str | None = None,
    plugin_paths: Sequence[str | Path] = (),
    force: bool = False,
    latency: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | bool | None = None,
    tolerance: str | None = None,
    allow_quality_loss: bool = False,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    registry: Registry | None = None,
    executor: str | Executor | None = None,
    **unknown: Any,
) -> Artifact:
    """Compile ``model`` into an artifact folder at ``output_dir`` and measure it against fp32.

    Args:
        model: an ONNX file path, an ``onnx.ModelProto``, a ``torch.nn.Module`` (with ``example_inputs``)
            or a bitpass ``Model``.
        output_dir: the artifact folder to create (missing parents are made). It must not exist, unless
            ``force`` and it is an earlier bitpass artifact.
        pipeline: a named pipeline (``optimize``, ``default``, ``mixed``, ``joint``), a one-line spec like
            ``"fold-constants,fuse,calibrate(method=entropy),quantize"``, or a .yaml/.toml file.
        calibration: samples to calibrate on: an .npz path, ``{input name: array}``, one array (single-input
            models) or a tuple of arrays in ``forward()`` order; samples on the first axis.
        evaluation: held-out samples (never the calibration set) to measure quality on; an optional
            ``labels`` array of class indices turns on accuracy.
        example_inputs: for a torch module, one example tensor per ``forward()`` argument.
        budget: mixed precision budgets (switches ``default`` to ``mixed``): ``"avg-bits=4"``,
            ``"size=60KB"``, ``"latency=0.5ms"``, ``"accuracy-drop=0.5"``, or a list of them.
        method: bit-allocation solver: ``ilp`` (default), ``pareto``, ``baq``, ``greedy``.
        sensitivity: how layer sensitivity is measured: ``auto`` (default), ``hutchinson``, ``eigenvalue``,
            ``fisher``, ``taylor``, ``output-kl``, ``output-mse``.
        formats: ``auto`` (default: the fastest form measured not slower than fp32), ``packed`` or ``compute``.
        sweep: record the whole size/loss frontier (report.html plots it).
        backend: ``onnxruntime`` (default) or ``tvm``.
        target: the backend's target (default: the backend's default, this machine).
        plugin_paths: extra plugin files or folders to load passes and backends from.
        force: replace ``output_dir`` if it is an intact artifact bitpass wrote (never anything else).
        latency: measure latency against fp32 (default True).
        seed: seed for randomized passes.
        progress: ``True`` prints progress to stderr, ``False`` nothing, or a callable taking one message;
            default: on when stderr is a terminal.
        tolerance: the quality the artifact must keep against fp32, measured on ``evaluation`` (or on calibration
            samples held back): ``"accuracy-drop=1"`` (points; the default with labels), ``"agreement=0.99"``
            (top-1 agreement; the default for logits), ``"cosine=0.99"`` (lowest per-sample cosine; the default
            for embeddings and features). A miss is repaired by putting layers back in fp32; if that fails too,
            nothing is written.
        allow_quality_loss: keep an artifact that misses ``tolerance`` (the manifest records by how much).
        overrides: ``{pass name: {option: value}}`` for passes of the pipeline, for what has no parameter here.
        registry: a plugin registry to use instead of the installed entry points.
        executor: where the expensive per-layer loops run: ``"serial"`` (default), ``"local:N"`` (N worker
            processes), ``"ray"`` (``RAY_ADDRESS``'s cluster, else a local one) or ``"ray://HOST:PORT"``, or an
            ``Executor``. The artifact is the same byte for byte wherever they ran.

    Returns the ``Artifact`` (its path and manifest). Nothing is written unless everything succeeds: the
    artifact appears atomically. Never slower than fp32: when bit allocation picked compute formats from
    per-layer timings but the whole artifact is slower than fp32 with the format search's confidence
    (``_speed_check``), it is compiled again with every quantized layer packed (fp32 speed), and the manifest
    says so.
    """
    if unknown:
        raise UsageError(_unknown_parameters(unknown, compile))
    say = _progress_callable(progress)
    overrides = _merged_overrides(overrides, budget=budget, method=method, sensitivity=sensitivity, formats=formats,
                                  sweep=sweep)
    options: dict[str, Any] = dict(pipeline=pipeline, calibration=calibration, evaluation=evaluation,
                                   example_inputs=example_inputs, backend=backend, target=target,
                                   plugin_paths=plugin_paths, latency=latency, seed=seed, progress=say,
                                   overrides=overrides, registry=registry, tolerance=tolerance,
                                   allow_quality_loss=allow_quality_loss)
    # plugins and passes are imported (torch among them) before anything is written: a signal that lands inside
    # a C extension's import aborts the process, and must not find a half-made destination
    options["registry"] = registry or default_registry(plugin_paths)
    workers = executor_from_spec(executor)  # one the caller gave stays open; one made here is closed here
    with (contextlib.nullcontext() if workers is executor else workers), \
            artifact_io.Destination(output_dir, force=force) as destination:
        options["executor"] = workers
        manifest, stage = _compile(model, destination, **options)
        slower = _slower_than_fp32(manifest)
        if slower:
            say(f"the artifact measured {slower}: recompiling with every quantized layer packed")
            repacked = dict(overrides or {})
            repacked["allocate-bits"] = {**repacked.get("allocate-bits", {}), "formats": "packed"}
            note = f"compute formats chosen from per-layer timings were slower end to end ({slower}); used packed"
            destination.discard(stage)
            manifest, stage = _compile(model, destination, **{**options, "overrides": repacked}, notes=[note])
        path = destination.publish(stage)
    return Artifact(path, manifest)


def _unknown_parameters(unknown: Mapping[str, Any], function: Callable[..., Any]) -> str:
    """``compile() got an unknown parameter 'calib'; did you mean 'calibration'?``"""
    import difflib
    import inspect

    known = [name for name, p in inspect.signature(function).parameters.items() if p.kind == p.KEYWORD_ONLY]
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5) \
            or [k for k in known if k.startswith(name[:4]) and len(name) >= 4][:1]
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (f"{function.__name__}() got unknown parameter{'s' if len(parts) > 1 else ''} {', '.join(parts)}; "
            f"see help(bitpass.tools.{function.__name__})")


def _progress_callable(progress: Callable[[str], None] | bool | None) -> Reporter:
    """``progress`` as a reporter: a callable is used as is; True: bars on a terminal, plain lines elsewhere;
    None (the default): on when stderr is a terminal."""
    from bitpass.tools.progress import console_reporter

    if callable(progress):
        return as_reporter(progress)
    return console_reporter(sys.stderr.isatty() if progress is None else progress)


def _merged_overrides(overrides: Mapping[str, Mapping[str, Any]] | None, *, budget: str | Sequence[str] | None,
                      method: str | None, sensitivity: str | None, formats: str | None,
                      sweep: bool) -> dict[str, dict[str, Any]] | None:
    """The named mixed-precision parameters as pass options, on top of ``overrides``."""
    merged = {name: dict(options) for name, options in (overrides or {}).items()}
    allocate: dict[str, Any] = {}
    if budget:
        allocate["budget"] = budget if isinstance(budget, str) else ",".join(budget)
    if method:
        allocate["method"] = method
    if formats:
        allocate["formats"] = formats
    if sweep:
        allocate["sweep"] = True
    if allocate:
        merged["allocate-bits"] = {**merged.get("allocate-bits", {}), **allocate}
    if sensitivity:
        merged["sensitivity"] = {**merged.get("sensitivity", {}), "method": sensitivity}
    return merged or None


def _slower_than_fp32(manifest: dict[str, Any]) -> str | None:
    """How the artifact is slower than fp32 when allocation chose compute formats (``_speed_check`` said so with
    the format search's confidence); else None."""
    check = manifest.get("records", {}).get("speed_check") or {}
    return check.get("slower") or None


#: batch sizes the slower-than-fp32 check times (the format search's: a fixed choice, so its timings are cached)
SPEED_CHECK_BATCHES = (1, 8)


def _speed_check(ctx: PassContext, metrics: Mapping[str, Any], reference_file: Path, model_file: Path, final: Model,
                 data: Dataset | None, say: Callable[[str], None]) -> dict[str, Any] | None:
    """Whether an artifact whose allocation chose compute formats from per-layer timings runs slower than fp32,
    by the format search's rule (``format_search.slower_than_reference``: fp32 faster with confidence, on paired
    rounds of a long timing in a fresh process, cached so the next compile decides the same way). The summary's
    latency table is one short timing in this process: a 0.25 ms MobileNetV3 measured 0.54x there once, noise on
    a shared machine, and was recompiled packed. None when there is nothing to check (no compute formats, no
    latency measured)."""
    allocated = (ctx.records.get("allocation") or {}).get("formats") or {}
    if not any(f.get("format") not in ("packed", "fp32") for f in allocated.values()):
        return None
    results = {str(r.get("result")) for r in ((ctx.records.get("quantization") or {}).get("layers") or {}).values()}
    if results and results <= {"fp32", "packed"}:  # the format search kept none of them: fp32 speed already
        return None
    if not metrics.get("latency") or data is None:
        return None
    probe = (ctx.target.options or {}).get("latency_probe")
    if not hasattr(probe, "graphs") or not model_file.is_file():
        # no whole-model timer on this target: slower only where fp32 won in more than 3 rounds of 4
        slow = {key: row for key, row in metrics["latency"].items()
                if max(row.get("speedup_band") or [row["speedup"]]) < 1.0}
        return {"rule": "the summary's rounds: fp32 faster in more than 3 rounds of 4 (no whole-model timer)",
                "slower": ", ".join(f"{k.replace('_', ' ')} {r['speedup']:.2f}x" for k, r in slow.items()) or None}
    from bitpass.passes.format_search import disabled_optimizers, slower_than_reference

    batches = (data.fixed_batch,) if data.fixed_batch else SPEED_CHECK_BATCHES
    say(f"timing the artifact against fp32 at batch {', '.join(map(str, batches))} in a fresh process")
    verdict = slower_than_reference(probe, model_file, reference_file, {b: data.batch_of(b) for b in batches},
                                    disabled_optimizers(final))
    slower = None
    if verdict.faster:
        slower = ", ".join(f"batch {b} {1 / m:.2f}x" for b, m in sorted(verdict.median.items()))
    return {"rule": "slower when fp32 is faster with the format search's confidence: faster in at least 3 rounds "
                    "of 4 at every batch and 1.05x overall (paired medians of a long timing)",
            "fp32_against_artifact": verdict.record(), "slower": slower}


#: passes that turn bit annotations into rounded weights: the quality gate's repair restarts before the first
QUANTIZING_PASSES = ("refine-rounding", "quantize", "quantize-weights")


class _BeforeQuantize(PassInstrument):
    """Keeps the model (and its activation ranges) as the first quantizing pass (``refine-rounding`` or
    ``quantize``) receives it: the quality gate's repair re-runs the pipeline from there with some layers
    back in fp32.

    It keeps a clone, not the model itself: ``refine-rounding`` works in place and replaces each low-bit
    layer's weight with its rounded grid values, so a kept reference would hand the repair rounded weights
    and a layer "back in fp32" would still carry its 4-bit rounding error (MobileNetV3-small at avg-bits=4
    missed the gate with every layer back). A clone shares the constant tensors: it costs the graph, not
    the weights."""

    def __init__(self) -> None:
        self.index: int | None = None
        self.model: Model | None = None
        self.ranges: Any = None
        self._seen = 0

    def run_before_pass(self, pass_: Any, model: Model, ctx: PassContext) -> None:
        if self.model is None and pass_.name in QUANTIZING_PASSES:
            self.index, self.model = self._seen, model.clone()
            if ctx.analyses.cached(ACTIVATION_RANGES):
                self.ranges = ctx.analyses.require(ACTIVATION_RANGES)
        if not getattr(pass_, "composite", False):
            self._seen += 1


@dataclass
class _Built:
    """One emitted artifact in a stage, with what measuring it needs."""

    final: Model
    stage: Path
    files: list[str]
    runner: Runner | None
    #: (fp32's, its own) outputs on the quality gate's data, once predicted (the summary's quality reuses them)
    gate_outputs: tuple[list[np.ndarray], list[np.ndarray]] | None = field(default=None, repr=False)


def _compile(
    model: Any,
    destination: artifact_io.Destination,
    *,
    pipeline: str = "default",
    calibration: DataSource = None,
    evaluation: DataSource = None,
    example_inputs: Any = None,
    backend: str = "onnxruntime",
    target: str | None = None,
    plugin_paths: Sequence[str | Path] = (),
    latency: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    registry: Registry | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    tolerance: str | None = None,
    allow_quality_loss: bool = False,
    notes: Sequence[str] = (),
    executor: Executor = SERIAL,
) -> tuple[dict[str, Any], Path]:
    """One compilation into a stage of ``destination`` (see ``compile``); returns the manifest and the stage."""
    say = as_reporter(progress)
    registry = registry or default_registry(plugin_paths)
    backend_impl: Backend = registry.backend(backend)()
    target = target or backend_impl.default_target
    backend_impl.check_target(target)
    passes = registry.pipeline(pipeline)
    wanted = quality.parse_tolerance(tolerance) if tolerance else None

    say("importing model")
    source = _import(model, example_inputs)
    phase_resources: dict[str, Any] = {}  # records.resources takes it at the end (a gate's repair replaces records)
    early = None
    if source is not model:  # a caller's Model is left as it is
        # a large imported model's weights are paged out before the passes, so every clone a pass or the compile
        # keeps shares one file-backed copy (the maps outlive their files: the folder goes at once)
        with tempfile.TemporaryDirectory(prefix="bitpass-paged-") as folder:
            early = _page_out(Path(folder), source.weight_bytes(), [source], say, phase_resources)
    lm = lm_spec(source)
    if lm is not None and passes.name == "default" and _decoder_pipeline_fits(lm, overrides):
        say("a decoder language model: weight-only pipeline 'decoder'")
        passes, overrides = registry.pipeline("decoder"), _decoder_overrides(overrides)
    if overrides:
        passes = apply_overrides(passes, overrides, registry)
    calib = _dataset(calibration, source, "calibration")
    evaluation_data = _dataset(evaluation, source, "evaluation")
    held_back = None
    if evaluation_data is None:  # the gate measures on calibration samples held back from calibrating
        calib, held_back = quality.hold_back(calib)
    if backend_impl.static_shapes and calib is not None:
        fixed = fix_dims(source, calib)
        if fixed:
            sizes = ", ".join(f"{name}={size}" for name, size in fixed.items())
            say(f"{backend} compiles fixed shapes: {sizes} (the calibration data's), the batch stays free")
            notes = [*notes, f"symbolic dimensions fixed from the calibration data: {sizes}"]
            if lm is not None:  # a library of one sequence length cannot take one token at a time
                lm = None
                notes.append("a language model compiled at one sequence length: measured as a plain model "
                             "(no token-by-token generation)")
            for role, data in (("evaluation", evaluation_data), ("held-back calibration", held_back)):
                if data is not None:
                    check_fixed(fixed, source, data, role)
    _legalize(backend_impl, source, target, "input model")
    reference_model = source.clone()
    if lm is not None:  # the artifact's graph says how to generate with it (bitpass run --generate)
        source.ir.metadata_props.update(lm.to_metadata())

    timing, before_quantize = Timing(), _BeforeQuantize()
    target_options = {"capabilities": backend_impl.capabilities(target)}
    if latency:
        probe = backend_impl.latency_probe(target)
        if probe is not None:
            target_options["latency_probe"] = probe
    target_spec = Target(backend, target, target_options)
    ctx = PassContext(calibration=calib, evaluation=evaluation_data, target=target_spec,
                      instruments=[timing, before_quantize], seed=seed, progress=say, executor=executor)
    final = passes.run(source, ctx)
    _peak_so_far(phase_resources, "passes")
    if notes:
        ctx.records.setdefault("notes", []).extend(notes)
    on_host = backend_impl.runs_on_host(target)

    def build(candidate: Model) -> _Built:
        _legalize(backend_impl, candidate, target, "compiled model")
        stage = destination.stage()
        say(f"emitting {backend} artifact")
        files = backend_impl.emit(candidate, stage, target, **_progress_keyword(backend_impl.emit, ctx.progress),
                                  **_ranges_keyword(backend_impl.emit, ctx))
        for pages in (early, paged):  # emitting read every paged-out weight: not held beside the artifact's session
            if pages is not None:
                pages.drop_pages()
        release_freed_memory()  # nor the heap emitting freed (0.8 GB at 355 M)
        runner = backend_impl.load(stage, {}, for_timing=True) if on_host else None
        return _Built(candidate, stage, files, runner)

    # the fp32 reference as a file (streamed: a 355 M model's bytes are never held; past 2 GiB with external data),
    # removed when the compile ends: sessions of it are loaded by path
    scratch = tempfile.TemporaryDirectory(prefix="bitpass-reference-")
    reference_file = Path(scratch.name) / "reference.onnx"
    provenance = source.provenance
    # a large language model is measured holding one session at a time: fp32's outputs on the gate's data are
    # predicted before the artifact's session exists, and its session released; and its fp32 weights are not held
    # in memory beside the artifact's (fusions give the artifact new tensors): the reference reads them from its
    # file, memory-mapped, from here on
    in_turn = lm is not None and reference_model.weight_bytes() > ONE_SESSION_AT_A_TIME_BYTES
    owned = [] if in_turn or source is model else [source]  # a caller's Model is left as it is
    if in_turn:
        reference_model.save_external(reference_file)
        reference_model = Model(ir.load(reference_file), provenance)
        del source
    else:
        reference_model.save(reference_file)
    paged = _page_out(Path(scratch.name), reference_model.weight_bytes(),
                      [m for m in (final, before_quantize.model, reference_model, *owned) if m is not model], say,
                      phase_resources)
    del owned
    if early is not None:  # the passes and the reference file read the weights paged out before them: not held
        early.drop_pages()  # beside the fp32 reference's session
    gate_data = evaluation_data or held_back
    reference = _reference_runner(reference_file) if on_host else None
    reference_outputs, output_names = None, [spec.name for spec in reference_model.outputs]
    if reference is not None and gate_data is not None:
        say(f"predicting fp32 outputs on {len(gate_data)} held-out samples")
        # a language model is judged on its logits (the first output) alone: its KV-cache outputs (0.4 GB over the
        # gate's data at 355 M) are dropped batch by batch, never gathered
        reference_outputs = measure.predict(reference, gate_data, count=1 if lm is not None else None,
                                            batch_size=_lm_batch(lm, gate_data))
        if len(reference_outputs) < len(output_names) \
                and quality.output_kind(reference_outputs, output_names, gate_data.labels) != "lm":
            reference_outputs = measure.predict(reference, gate_data)  # judged on every output after all
        if in_turn:
            reference = None
            release_freed_memory()
    _peak_so_far(phase_resources, "fp32_reference")
    built = build(final)
    if reference_outputs is not None and built.runner is not None and gate_data is not None:
        built, gate = _quality_gate(built, reference_outputs, output_names, gate_data, wanted, passes,
                                    before_quantize, build, destination, reference_model, ctx, say)
        del reference_outputs
        ctx.records["quality_gate"] = gate
        if gate.get("warning"):
            ctx.records.setdefault("notes", []).append(gate["warning"])
        if not gate["passed"]:
            message = (f"quality gate: the artifact misses the tolerance: {gate['final_text']}, "
                       f"{gate['shortfall']}; tried {gate['tried']}")
            if not allow_quality_loss:
                raise BitpassError(message + "; nothing was written (--allow-quality-loss keeps it anyway, "
                                             "--tolerance sets another bound)")
            say(f"warning: {message}; kept because the loss is allowed")
    elif gate_data is None:
        ctx.records["quality_gate"] = {"passed": None, "skipped": "no evaluation data and too few calibration "
                                                                  "samples to hold some back"}
    else:
        ctx.records["quality_gate"] = {"passed": None, "skipped": f"target {target} does not run on this machine"}

    _peak_so_far(phase_resources, "emit_and_quality_gate")
    final, stage, files = built.final, built.stage, built.files
    stored = backend_impl.stored_weight_bytes(final, stage)
    backend_records = backend_impl.records(stage)
    if backend_records:
        ctx.records["backend"] = backend_records
    if on_host and built.runner is not None:
        predicted = built.gate_outputs if evaluation_data is not None and evaluation_data is gate_data else None
        sessions = _Sessions(lambda: _reference_runner(reference_file),
                             lambda: backend_impl.load(stage, {}, for_timing=True), in_turn, reference, built.runner)
        built.runner = reference = None  # held by ``sessions`` alone, which releases them
        metrics = _measure(sessions, reference_file, stored, reference_model, stage, files,
                           evaluation_data, calib, latency, say, lm, predicted, sparse=_sparse(final))
        sessions.release()
        speed_check = _speed_check(ctx, metrics, reference_file, stage / "model.onnx", final, evaluation_data or calib,
                                   say)
        if speed_check is not None:
            ctx.records["speed_check"] = speed_check
    else:
        say(f"target {target} does not run on this machine: quality and latency are not measured")
        metrics = {"size": _sizes(reference_model, stored, reference_file, stage, files, sparse=_sparse(final)),
                   "not_measured": f"target {target} does not run on this machine"}
    records = layer_report.layer_records(reference_model, final)
    # the whole compile's peak (import, passes, emit, quality gate, summary), beside the passes' own in ``resources``:
    # this process's high-water mark. The timing and session-memory processes it starts run beside it and are not
    # in it (``RUSAGE_CHILDREN`` cannot say: a forked child starts with the parent's pages resident)
    _peak_so_far(phase_resources, "measure")
    ctx.records.setdefault("resources", {}).update(phase_resources,
                                                   compile_peak_rss_mb=round(lifetime_peak_mb() or 0.0, 1))
    manifest = {
        "schema": artifact_io.MANIFEST_SCHEMA,
        "versions": versions(),
        "input_model": {"name": provenance.name, "kind": provenance.kind, "sha256": provenance.sha256,
                        "notes": provenance.notes},
        "pipeline": passes.spec(),
        "pipeline_name": passes.name,
        "backend": backend, "target": target,
        "inputs": [{"name": s.name, "shape": list(s.shape or []), "dtype": str(s.dtype)} for s in final.inputs],
        "outputs": [{"name": s.name, "shape": list(s.shape or []), "dtype": str(s.dtype)} for s in final.outputs],
        "data": {"calibration": _data_record(calib), "evaluation": _data_record(evaluation_data),
                 "held_back_for_quality_gate": _data_record(held_back) if evaluation_data is None else None},
        "passes": [{"pass": name, "seconds": round(seconds, 4)} for name, seconds in timing.seconds],
        "records": _jsonable(ctx.records),
        "layers": records,
        "summary": layer_report.summarize(records),
        "metrics": metrics,
        "seed": seed,
        "reference": _keep_reference(model, reference_file, reference_model),
        "files": artifact_io.file_table(stage, files),
    }
    if lm is not None:
        manifest["decoder"] = lm.to_json()
    (stage / REPORT).write_text(report.render(manifest))
    manifest["files"].update(artifact_io.file_table(stage, [REPORT]))
    artifact_io.write_manifest(stage, manifest)
    scratch.cleanup()
    return manifest, stage


def _peak_so_far(resources: dict[str, Any], phase: str) -> None:
    """Record this process's peak resident memory so far at the end of ``phase`` (the manifest's ``records.resources.
    peak_rss_mb_after``): where the whole compile's peak rose, phase by phase (the passes record their own)."""
    resources.setdefault("peak_rss_mb_after", {})[phase] = round(lifetime_peak_mb() or 0.0, 1)


#: fp32 weights above which the models a compile keeps after its passes (the emitted one, the one before quantizing,
#: the in-memory reference) are paged out to a scratch file before the measuring starts (``PagedWeights``)
PAGE_OUT_BYTES = 256 << 20


def _page_out(folder: Path, fp32_bytes: int, models: Sequence[Model | None], say: Callable[[str], None],
              resources: dict[str, Any]) -> PagedWeights | None:
    """The weights of ``models`` paged out into ``folder`` when the model is past ``PAGE_OUT_BYTES``, else None;
    ``resources`` (for the manifest's ``records.resources``) gets the MiB moved.

    What the compile does with them after the passes (emit once, read shapes and annotations, maybe a quality-gate
    ranking or repair) does not need them in memory while ONNX Runtime sessions of the fp32 reference and the
    artifact run: at 355 M they were 1.4 GB beside each session."""
    if fp32_bytes <= PAGE_OUT_BYTES:
        return None
    paged = PagedWeights(folder)
    moved = paged.page_out(*[m for m in models if m is not None])
    say(f"paged {moved / (1 << 20):.0f} MiB of weights out to a scratch file until they are read again")
    resources["paged_out_mb"] = round(resources.get("paged_out_mb", 0.0) + moved / (1 << 20), 1)
    return paged


def _quality_gate(built: _Built, ref_out: list[np.ndarray], output_names: Sequence[str], data: Dataset,
                  wanted: quality.Tolerance | None, passes: Pipeline, before_quantize: _BeforeQuantize,
                  build: Callable[[Model], _Built], destination: artifact_io.Destination, reference_model: Model,
                  ctx: PassContext, say: Callable[[str], None]) -> tuple[_Built, dict[str, Any]]:
    """Measure ``built`` against fp32's outputs ``ref_out`` on ``data`` (``output_names`` in order); on a miss,
    put the layers that add the most error back in fp32 (re-running the pipeline from its ``quantize`` pass) until
    the tolerance is met. Returns the artifact to keep and the gate's record (every step, the tolerance, whether
    it passed)."""
    import time

    started = time.perf_counter()
    kind = quality.output_kind(ref_out, list(output_names), data.labels)
    # a language model is judged on its logits alone: its KV-cache outputs (0.4 GB per model at 355 M) are dropped
    outputs_kept = 1 if kind == "lm" else len(ref_out)
    del ref_out[outputs_kept:]  # in place: the caller's list lets go of them too
    tolerance = wanted or quality.default_tolerance(kind)
    mask = quality.token_mask(data.inputs, ref_out[0])
    # a language model's logits a few windows at a time (``measure.batch_for``), as its reference's were
    batch = measure.batch_for(ref_out[0][:1].nbytes) if kind == "lm" else measure.EVAL_BATCH
    built.gate_outputs = (ref_out, measure.predict(built.runner, data, batch, count=outputs_kept))
    value = quality.score(tolerance, ref_out, built.gate_outputs[1], data.labels, mask)
    record: dict[str, Any] = {"output_kind": kind, "tolerance": tolerance.to_json(), "data": data.source,
                              "samples": len(data), "initial": value, "final": value, "steps": [],
                              "passed": tolerance.met(value), "final_text": tolerance.describe(value)}
    if mask is not None and tolerance.metric == "cosine":
        record["per_token"] = f"cosine per real token ({int(mask.sum())} tokens, '{quality.ATTENTION_MASK}' input)"
    say(f"quality gate: {tolerance.describe(value)} on {len(data)} held-out samples")
    too_few = quality.too_few_samples(tolerance, len(data), quality.gate_units(tolerance, ref_out[0], data.labels,
                                                                                mask))
    if too_few:
        record["warning"] = too_few
        say(f"warning: {too_few}")
    drop_mapped_pages([*ref_out, *built.gate_outputs[1]])  # read once here: not kept resident beside the rest
    if record["passed"]:
        record["seconds"] = round(time.perf_counter() - started, 3)
        return built, record
    base, index = before_quantize.model, before_quantize.index
    # the repair rebuilds the format search's choice (per-layer formats, int8 on widened codes, dynamic int8, the
    # flavour, ORT fusions off) with some layers moved to fp32, and does not search again (minutes on a ResNet-50)
    from bitpass.passes.format_search import Replay

    searched = (ctx.records.get("quantization") or {}).get("search") or {}
    choice = Replay.from_record(searched)
    candidates = _repairable(base, choice) if base is not None else []
    if base is None or index is None or not candidates:
        record.update(shortfall=tolerance.shortfall(value), seconds=round(time.perf_counter() - started, 3),
                      tried="nothing to repair (no quantized layer to put back in fp32)")
        return built, record
    say(f"quality gate: repairing: ranking {len(candidates)} quantized layers by the error they add")
    ranked = quality.rank_by_added_error(base, built.final, data, candidates)
    tail = Pipeline(passes.passes[index:], name=passes.name)
    repair_options = {k: v for k, v in (ctx.target.options or {}).items() if k != "latency_probe"}
    if searched.get("flavour"):  # no plan recorded (nothing was searched): the flavour at least
        repair_options["int8_flavour"] = searched["flavour"]
    attempts: dict[int, _Built] = {}
    attempt_records: dict[int, dict[str, Any]] = {}

    def evaluate(k: int) -> float:
        repaired = base.clone()
        keep = set(ranked[:k])
        for layer in repaired.layers():
            if layer.id in keep:
                annotation.set_weight_bits(layer.node, annotation.FLOAT_BITS)
                annotation.set_activation_bits(layer.node, annotation.FLOAT_BITS)
        options = {**repair_options, "search_replay": choice.with_fp32(keep)} if choice is not None \
            else repair_options
        inner = PassContext(calibration=ctx.calibration, evaluation=ctx.evaluation,
                            target=Target(ctx.target.backend, ctx.target.name, options),
                            seed=ctx.seed, progress=lambda _message: None, executor=ctx.executor)
        if before_quantize.ranges is not None:
            inner.analyses.put(ACTIVATION_RANGES, before_quantize.ranges)
        candidate = build(tail.run(repaired, inner))
        candidate.gate_outputs = (ref_out, measure.predict(candidate.runner, data, batch, count=outputs_kept))
        got = quality.score(tolerance, ref_out, candidate.gate_outputs[1], data.labels, mask)
        drop_mapped_pages([*ref_out, *candidate.gate_outputs[1]])
        say(f"quality gate: {k} layer(s) in fp32: {tolerance.describe(got)}")
        # only the fewest-layers attempt that meets the bound can be published: drop the others at once (each
        # holds an ONNX Runtime session; a ResNet-50's attempts together outgrew 24 GB)
        if tolerance.met(got) and all(other > k for other in attempts):
            for other in list(attempts):
                destination.discard(attempts.pop(other).stage)
                attempt_records.pop(other, None)
            attempts[k], attempt_records[k] = candidate, inner.records
        else:
            destination.discard(candidate.stage)
        return got

    search = quality.Search(ranked, tolerance, evaluate)
    found = search.run()
    record["steps"] = _jsonable(search.steps)
    record["ranking"] = ranked
    chosen = attempts.get(found) if found is not None else None
    for k, attempt in attempts.items():  # keep only the stage that will be published
        if attempt is not chosen:
            destination.discard(attempt.stage)
    attempts.clear()
    if chosen is None:
        last = search.steps[-1]["value"] if search.steps else value
        record.update(final=last, final_text=tolerance.describe(last), shortfall=tolerance.shortfall(last),
                      tried=f"all {len(ranked)} quantized layers back in fp32 ({len(search.steps)} rebuilds)",
                      seconds=round(time.perf_counter() - started, 3))
        return built, record
    destination.discard(built.stage)
    ctx.records.update(attempt_records[found])  # what the re-run passes record describes the artifact kept
    if searched and isinstance(ctx.records.get("quantization"), dict):  # ... and the search whose choice it replayed
        ctx.records["quantization"]["search"] = searched
    final_value = search.steps[[s["fp32_layers"] == ranked[:found] for s in search.steps].index(True)]["value"]
    record.update(passed=True, final=final_value, final_text=tolerance.describe(final_value),
                  fp32_layers=ranked[:found], seconds=round(time.perf_counter() - started, 3))
    return chosen, record


def _repairable(base: Model, choice: Replay | None) -> list[str]:
    """The layers the gate's repair may put back in fp32, in graph order: those the searched plan quantizes
    (``choice``: layers the search moved to fp32 are fp32 already; ones its ``merged`` plan moved from fp32 to int8
    are not), else those the annotations quantize."""
    if choice is None:
        return quality.quantized_layers(base)
    annotated = set(quality.quantized_layers(base))
    from bitpass.passes.format_search import is_quantized

    return [layer.id for layer in base.layers()
            if (is_quantized(choice.plan[layer.id]) if layer.id in choice.plan
                else layer.id in annotated)]


def _progress_keyword(emit: Callable[..., Any], progress: Any) -> dict[str, Any]:
    """``{"progress": ...}`` for a backend whose ``emit`` takes it (a plugin's may not)."""
    return {"progress": progress} if _takes_keyword(emit, "progress") else {}


def _ranges_keyword(emit: Callable[..., Any], ctx: PassContext) -> dict[str, Any]:
    """``{"activation_ranges": {tensor: (lo, hi)}}`` for a backend whose ``emit`` takes the calibrated ranges (TVM:
    int8 convs pass each other uint8 codes of those scales), when the pipeline calibrated."""
    ranges = ctx.analyses.optional(ACTIVATION_RANGES)
    if ranges is None or not _takes_keyword(emit, "activation_ranges"):
        return {}
    return {"activation_ranges": dict(ranges.ranges)}


def _takes_keyword(function: Callable[..., Any], name: str) -> bool:
    """Whether ``function`` has a parameter ``name`` (False when its signature cannot be read)."""
    import inspect

    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _keep_reference(model: Any, reference_file: Path, reference_model: Model) -> dict[str, Any]:
    """Where ``verify`` will find the fp32 reference, which never ships inside the artifact: the input file
    itself when the model came from one, else a content-addressed copy in the cache folder (past 2 GiB a folder
    ``<sha256>/`` holding the file and its external data). The sha256 is the file's, or past 2 GiB the model's
    (``Model.sha256``: its weights included)."""
    import shutil

    data = reference_file.with_name(reference_file.name + ".data")
    if data.is_file():
        digest = reference_model.sha256()
    else:
        with reference_file.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
    if isinstance(model, (str, os.PathLike)):
        return {"sha256": digest, "source": str(Path(model).resolve()), "cached": False}
    cached = _cached_reference(digest, external=data.is_file())
    try:
        if not cached.is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            if data.is_file():  # the folder is complete once its model file appears (written last)
                shutil.copyfile(data, cached.parent / data.name)
            partial = cached.with_suffix(f".{os.getpid()}.partial")
            shutil.copyfile(reference_file, partial)
            partial.replace(cached)
    except OSError:
        return {"sha256": digest, "source": None, "cached": False}
    return {"sha256": digest, "source": None, "cached": True}


def _cached_reference(digest: str, *, external: bool) -> Path:
    """The cached reference of ``digest``: ``<sha256>.onnx``, or ``<sha256>/reference.onnx`` with external data."""
    return reference_cache() / digest / "reference.onnx" if external else reference_cache() / f"{digest}.onnx"


def _reference_runner(path: Path) -> Runner:
    """The fp32 reference's runner, loaded by path (external data beside it past 2 GiB), set up to be timed."""
    from bitpass.backends.onnxruntime.runner import OrtRunner

    return OrtRunner.from_path(path, for_timing=True)


def reference_cache() -> Path:
    """Folder of fp32 references of models compiled from memory (torch modules, protos), by sha256."""
    from bitpass.frontend.cache import cache_dir

    return cache_dir() / "references"


def find_reference(manifest: Mapping[str, Any], given: str | Path | None = None) -> Model | None:
    """The artifact's fp32 reference model: ``given``, else the cached copy, else the recorded input file,
    each accepted only if it is the model the artifact was compiled from (by sha256). None when none is."""
    from bitpass.frontend import from_onnx

    recorded = manifest.get("reference") if isinstance(manifest.get("reference"), Mapping) else {}
    digest = str(recorded.get("sha256", ""))
    source_digest = str((manifest.get("input_model") or {}).get("sha256", ""))
    candidates: list[Path] = []
    if given is not None:
        candidates.append(Path(given))
    if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        candidates.extend(_cached_reference(digest, external=external) for external in (False, True))
    if recorded.get("source"):
        candidates.append(Path(str(recorded["source"])))
    for path in candidates:
        if not path.is_file():
            if given is not None and path == Path(given):
                raise UsageError(f"--reference {path}: no such model file")
            continue
        model = from_onnx(path)
        if model.provenance.sha256 in (source_digest, digest) or model.sha256() == digest:
            return model
        if given is not None and path == Path(given):
            raise UsageError(f"--reference {path} is not the model this artifact was compiled from (sha256 differs)")
    return None


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
    """The manifest and a runner for an artifact directory, refused unless every file is as compiled."""
    path = Path(path)
    manifest = artifact_io.read_manifest(path)
    problems = artifact_io.verify_files(path, manifest)
    if problems:
        raise BitpassError(f"{path}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
                           + "; run `bitpass verify` for details")
    registry = registry or default_registry()
    runner = registry.backend(manifest["backend"])().load(path, manifest)
    return manifest, runner


def _specs(manifest: dict[str, Any]) -> list:
    """The artifact's input specs as the manifest records them (a malformed entry is one clear error)."""
    from bitpass.frontend import TensorSpec

    try:
        return [TensorSpec(str(i["name"]), tuple(d if isinstance(d, int) else str(d) for d in i["shape"]) or None,
                           np.dtype(i["dtype"])) for i in manifest["inputs"]]
    except (KeyError, TypeError, ValueError) as err:
        raise BitpassError(f"the manifest's inputs are malformed ({type(err).__name__}: {str(err)[:80]})") from err


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


#: per-layer fields the plan check compares between the manifest and the model read back
_PLAN_FIELDS = ("final_op_type", "bits", "sparsity", "stored")


def _plan_check(manifest: dict[str, Any], read_back: list[dict[str, Any]]) -> Check:
    """The per-layer plan read back from the model files equals the manifest's, both ways."""
    recorded = {r.get("id"): r for r in manifest["layers"] if isinstance(r, dict) and r.get("status") != "removed"}
    actual = {r["id"]: r for r in read_back}
    missing = sorted(set(actual) - set(recorded), key=str)
    unknown = sorted(set(recorded) - set(actual), key=str)
    differ = sorted((k for k in set(actual) & set(recorded)
                     if any(actual[k].get(f) != recorded[k].get(f) for f in _PLAN_FIELDS)), key=str)
    if not (missing or unknown or differ):
        return Check("plan", True, f"{len(actual)} layers read back from the model match the recorded plan")
    parts = [f"{label}: {', '.join(map(str, ids[:5]))}{' ...' if len(ids) > 5 else ''}"
             for label, ids in (("layers missing from the manifest", missing),
                                ("layers the model does not have", unknown),
                                ("layers that differ from the recorded plan", differ)) if ids]
    return Check("plan", False, "; ".join(parts))


def verify(path: str | Path, evaluation: DataSource = None, *, tolerance: float = 0.005,
           emulate: bool = False, reference: str | Path | None = None) -> list[Check]:
    """Re-check an artifact from its files: every file and the manifest are as compiled, the per-layer plan
    read back from the model equals the manifest's, and, given evaluation data, quality still meets the
    recorded figures (within ``tolerance``). The fp32 reference (needed for fidelity) is ``reference``, or the
    model the artifact was compiled from (found by its sha256). ``emulate`` runs an artifact of a foreign
    target (aarch64) under emulation and compares it with the same plan built for this machine: rtol 1e-3 when
    every layer is fp32, else the same top-1 on every sample."""
    path = Path(path)
    manifest = artifact_io.read_manifest(path)
    checks = []
    problems = artifact_io.verify_files(path, manifest)
    checks.append(Check("files", not problems, "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)"
                                                                          if len(problems) > 5 else "")
                        or f"{len(manifest['files'])} files and the manifest match their sha256"))
    if problems:
        return checks
    from bitpass.frontend import from_onnx

    final = from_onnx(path / "model.onnx")
    checks.append(_plan_check(manifest, _plan_read_back(final)))
    backend = default_registry().backend(manifest["backend"])()
    if emulate:
        if evaluation is None:
            raise UsageError("verify --emulate needs samples to run: give --eval FILE")
        data = _dataset(evaluation, final, "evaluation")
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
    data = _dataset(evaluation, final, "evaluation")
    assert data is not None
    reference_model = find_reference(manifest, reference)
    if reference_model is None:
        checks.append(Check("quality", False, "the fp32 reference model was not found (it never ships in the "
                                              "artifact): pass --reference MODEL.onnx, the model you compiled"))
        return checks
    reference = reference_runner(reference_model)
    checks.append(_gate_check(manifest, reference, runner, data))
    lm = lm_spec(final)
    quality = _lm_fidelity(reference, runner, data, lm) if lm is not None \
        else measure.quality(reference, runner, data)
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


def _gate_check(manifest: Mapping[str, Any], reference: Runner, runner: Runner, data: Dataset) -> Check:
    """The compile-time quality gate, re-run on ``data``: the recorded tolerance (or the default for the
    output kind), so that no artifact that loses most of its quality can pass ``verify``."""
    ref_out, got = measure.predict(reference, data), measure.predict(runner, data)
    gate = (manifest.get("records") or {}).get("quality_gate") or {}
    recorded = gate.get("tolerance") if isinstance(gate, Mapping) else None
    if isinstance(recorded, Mapping) and recorded.get("metric") in quality.DEFAULTS:
        tolerance = quality.Tolerance(recorded["metric"], float(recorded["threshold"]))
    else:
        tolerance = quality.default_tolerance(quality.output_kind(ref_out, reference.output_names, data.labels))
    if tolerance.metric == "accuracy-drop" and data.labels is None:
        tolerance = quality.default_tolerance(quality.output_kind(ref_out, reference.output_names, None))
    value = quality.score(tolerance, ref_out, got, data.labels, quality.token_mask(data.inputs, ref_out[0]))
    allowed = isinstance(gate, Mapping) and gate.get("passed") is False
    detail = f"{tolerance.describe(value)} on {len(data)} samples"
    if allowed and not tolerance.met(value):
        detail += " (compiled with --allow-quality-loss)"
    return Check("gate", tolerance.met(value), detail)


def _plan_read_back(final: Model) -> list[dict[str, Any]]:
    """The per-layer plan as the model file itself records it (each layer's first node carrying its id)."""
    from bitpass.frontend import annotation

    seen: dict[str, dict[str, Any]] = {}
    for node in final.graph.all_nodes():
        layer_id = annotation.layer_id(node)
        if layer_id is None or layer_id in seen:
            continue
        notes = annotation.all_of(node)
        seen[layer_id] = {"id": layer_id, "final_op_type": node.op_type,
                          "bits": {"weight": notes.get(annotation.WEIGHT_BITS, annotation.FLOAT_BITS),
                                   "activation": notes.get(annotation.ACTIVATION_BITS, annotation.FLOAT_BITS)},
                          "sparsity": notes.get(annotation.SPARSITY, 0.0),
                          "stored": layer_report.stored_weight(node)}
    return list(seen.values())


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
    """A plain progress line on stderr (what the command line prints when stderr is not a terminal)."""
    from bitpass.tools.progress import print_message

    print_message(message)
