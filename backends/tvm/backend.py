"""The TVM backend: lower the annotated IR to Relax with bitpass's kernels, schedule, export model.so.

Artifact files: ``model.so`` (the Relax VM executable, weights embedded, built by
``export_library`` with the target's compiler), ``tvm.json`` (VM function per batch size,
inputs and outputs in graph order, target), ``tvm_run.py`` (a numpy + TVM-runtime runner for
the device) and ``model.onnx`` (the annotated IR the library was lowered from: the plan that
``bitpass verify`` checks). ``tvm`` is imported only when compiling or loading.

Bits: the lowering reads ``bits.weight`` annotations (int8 and 4-bit kernels for Gemm/MatMul, int8
for Conv). Capabilities say ``lowers_bits``, so the ``quantize`` pass leaves the graph to this backend
and the ``default`` and ``mixed`` pipelines work as they are.

Operators: bitpass's kernels and rules, and TVM's own ONNX importer for everything else. What cannot run
is asked of TVM: ``legalize`` lowers the model once without building (``lower.check``) and reports each
node TVM's importer or operator legalization refused. ``tvm.json`` records which layers run bitpass
kernels, how every op type was lowered, and the library's time per call on the host after building.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bitpass.backends.base import Backend, Capabilities, Runner
from bitpass.backends.tvm import targets as target_registry
from bitpass.backends.tvm.lower import WEIGHT_BITS
from bitpass.frontend import Model, annotation
from bitpass.frontend.errors import BitpassError

LIBRARY = "model.so"
CONFIG = "tvm.json"
RUNNER = "tvm_run.py"
PLAN = "model.onnx"


class EmulatedRunner(Runner):
    """Runs an aarch64 model.so under qemu-user with an arm64 TVM runtime (tools/setup_arm64.sh)."""

    def __init__(self, directory: Path, manifest: Mapping[str, Any]) -> None:
        self.directory = directory
        self.input_names = [i["name"] for i in manifest["inputs"]]
        self.output_names = [o["name"] for o in manifest["outputs"]]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        from bitpass.backends.tvm import emulate

        return emulate.run(self.directory, {n: feeds[n] for n in self.input_names}, self.output_names)


class TvmRunner(Runner):
    """Runs model.so in the Relax VM on this machine's CPU."""

    def __init__(self, directory: Path) -> None:
        from bitpass.backends.tvm.vmrun import VmModel

        try:
            self.model = VmModel(directory)
        except Exception as err:  # TVM raises its own error types
            raise BitpassError(f"TVM cannot load {directory / LIBRARY}: {str(err).strip().splitlines()[0]}") from err
        self.input_names = self.model.input_names
        self.output_names = self.model.output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BitpassError(f"missing input {missing[0]!r}; the model takes {', '.join(self.input_names)}")
        return self.model.run(feeds)


class TvmBackend(Backend):
    """TVM (Relax VM) with bitpass's own TIR kernels and schedules, cross-compiled per named target."""

    name = "tvm"
    static_shapes = True
    targets = {name: spec.description for name, spec in target_registry.TARGETS.items()}
    default_target = target_registry.host_target()

    def __init__(self, batches: tuple[int, ...] | None = None) -> None:
        """``batches``: the batch sizes the library is compiled for (default ``build.BATCHES``: 1 and 64)."""
        self.batches = batches
        self._checked: dict[tuple[str, str], list[str]] = {}  # (model sha256, target) -> problems

    def capabilities(self, target: str) -> Capabilities:
        self.check_target(target)
        from bitpass.backends.tvm import lower

        # bitpass's kernels and rules, and every op TVM's importer converts; ``legalize`` asks per node
        ops = lower.rule_ops() | lower.importer_ops()
        return Capabilities(ops=frozenset(("", op) for op in ops), weight_bits=dict(WEIGHT_BITS),
                            activation_bits=(8, 32), lowers_bits=True)

    def runs_on_host(self, target: str) -> bool:
        return target_registry.get(target).is_host_runnable()

    def emulated_runner(self, directory: Path, manifest: Mapping[str, Any]) -> Runner:
        return EmulatedRunner(Path(directory), manifest)

    def legalize(self, model: Model, target: str) -> list[str]:
        """Annotated widths without a kernel, then every node TVM cannot run (``lower.check``: the model is
        lowered once without building, each node through bitpass's rules or TVM's importer, then TVM's
        operator legalization). Remembered per model and target: the compile driver asks twice."""
        self.check_target(target)
        problems = []
        for node in model.graph.all_nodes():
            bits = annotation.weight_bits(node)
            if bits is not None and bits != annotation.FLOAT_BITS and \
                    bits not in WEIGHT_BITS.get(node.op_type, (annotation.FLOAT_BITS,)):
                problems.append(f"{node.op_type} {node.name!r} is annotated {bits}-bit weights; the tvm backend "
                                f"has {node.op_type} kernels for {WEIGHT_BITS.get(node.op_type, (32,))} bits")
        if problems:
            return problems
        key = (model.sha256(), target)
        if key not in self._checked:
            try:
                from bitpass.backends.tvm import kernels, lower
            except ImportError as err:
                raise BitpassError(f"the tvm backend needs apache-tvm: pip install -e '.[tvm]' ({err})") from err
            spec = target_registry.get(target)
            self._checked[key] = [str(p) for p in lower.check(model, kernels.scheme_for(spec.features))]
        return list(self._checked[key])

    def emit(self, model: Model, directory: Path, target: str, *, progress: Any = None,
             activation_ranges: Mapping[str, tuple[float, float]] | None = None) -> list[str]:
        """Build the library for ``target`` into ``directory``; with calibrated ``activation_ranges`` ({tensor:
        (lo, hi)}, the calibrate pass's), int8 convs pass each other uint8 codes of those scales (VNNI)."""
        from bitpass.backends.tvm import build as tvm_build
        from bitpass.backends.tvm import lower
        from bitpass.passes.progress import SILENT, as_reporter

        reporter = as_reporter(progress) if progress is not None else SILENT
        with reporter.task(f"tvm build for {target}", total=4, unit="stage") as task:
            return self._emit(model, directory, target, reporter, task, tvm_build, lower, activation_ranges)

    def _emit(self, model: Model, directory: Path, target: str, reporter: Any, task: Any, tvm_build: Any,
              lower: Any, ranges: Mapping[str, tuple[float, float]] | None = None) -> list[str]:
        done: list[str] = []

        def step(name: str) -> None:
            if done:
                task.advance()
            done.append(name)
            reporter(f"tvm: {name}")

        self.check_target(target)
        spec = target_registry.get(target)
        if not spec.compiler_available():
            raise BitpassError(f"target {target!r} needs the cross compiler {spec.cross_compiler!r}, which is not "
                               f"on PATH (Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu, or run "
                               f"tools/setup_arm64.sh)")
        proto = model.to_proto()
        try:
            built = tvm_build.build(model, spec, self.batches or tvm_build.BATCHES, step=step, ranges=ranges)
        except lower.LoweringError as err:
            raise BitpassError(f"tvm lowering: {err}") from err
        except Exception as err:  # TVM raises its own error types; name the stage, keep the cause
            raise BitpassError(f"tvm build for {target!r} failed: {lower.first_line(err)} (please report it with "
                               f"the model)") from err
        step("export the library")
        tvm_build.export(built, directory / LIBRARY, spec)
        config = {
            "target": target, "tvm_target": spec.tvm_dict(),
            "functions": {str(b): name for b, name in built.functions.items()},
            "inputs": [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}],
            "outputs": [o.name for o in proto.graph.output],
            "layers": built.report.layers,
            "ops": built.report.ops,
            "kernel_weight_bytes": built.report.weight_bytes,
        }
        (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if spec.is_host_runnable():
            from bitpass.backends.tvm import timing

            step("time the library on this machine")
            config["host_timing"] = timing.measure(directory, model.inputs, sorted(built.functions))
            (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(Path(__file__).with_name("vmrun.py"), directory / RUNNER)
        (directory / PLAN).write_bytes(model.to_bytes())
        task.advance(4 - len(done) + 1)
        return [LIBRARY, CONFIG, RUNNER, PLAN]

    def records(self, directory: Path) -> dict[str, Any]:
        """For the manifest: which layers run bitpass kernels (kernel, width, fused epilogue), how each op type
        was lowered (bitpass kernel or rule, TVM's importer, folded) and the host timing after building."""
        config = json.loads((Path(directory) / CONFIG).read_text())
        return {key: config[key] for key in ("layers", "ops", "host_timing") if key in config}

    def stored_weight_bytes(self, model: Model, directory: Path) -> int:
        """The graph's constants with each lowered layer's fp32 weight replaced by its kernel's stored bytes
        (int8 codes + scales, 4-bit codes + fp16 block scales), as ``tvm.json`` records them."""
        lowered = json.loads((Path(directory) / CONFIG).read_text()).get("layers", {})
        total = model.weight_bytes()
        for layer in model.layers():
            entry = lowered.get(layer.id)
            if entry is not None and "weight_bytes" in entry:
                total += int(entry["weight_bytes"]) - int(layer.weight_array.nbytes)
        return total

    def load(self, directory: Path, manifest: Mapping[str, Any] | None = None, *,
             for_timing: bool = False) -> Runner:
        config = json.loads((Path(directory) / CONFIG).read_text())
        spec = target_registry.get(config["target"])
        if not spec.is_host_runnable():
            raise BitpassError(f"this artifact was built for {config['target']!r} ({spec.triple}), which this "
                               f"machine cannot run; use `bitpass verify --emulate` for aarch64 targets")
        return TvmRunner(Path(directory))
