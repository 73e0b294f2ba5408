"""Pass instruments (after TVM's ``ir/instrument.py``): hooks around every pass."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from bitpass.frontend import annotation
from bitpass.frontend.errors import BitpassError

if TYPE_CHECKING:
    from bitpass.frontend import Model
    from bitpass.passes.infra import Pass, PassContext, PassResult


class PassInstrument:
    """Base instrument: override the hooks you need."""

    def run_before_pass(self, pass_: Pass, model: Model, ctx: PassContext) -> None:  # noqa: B027
        pass

    def run_after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:  # noqa: B027
        pass


class Timing(PassInstrument):
    """Wall time, CPU time and peak resident memory of each pass, in run order (the members of a composite, not
    the composite itself). They go to ``ctx.records["resources"]`` for the manifest: per pass ``seconds``,
    ``cpu_seconds`` (user + system of this process and the child processes it waited for, e.g. timing
    subprocesses: on a shared machine wall time counts other people's work, CPU time does not) and
    ``peak_rss_mb`` (see ``PeakMemory``), and the process's peak so far."""

    def __init__(self, *, memory: bool = True) -> None:
        self.seconds: list[tuple[str, float]] = []
        self.cpu_seconds: list[float] = []
        self._starts: list[float] = []  # a stack: a composite's members start and end inside it
        self._cpu_starts: list[float] = []
        self.memory = PeakMemory() if memory else None

    def run_before_pass(self, pass_: Pass, model: Model, ctx: PassContext) -> None:
        if self.memory is not None:
            self.memory.run_before_pass(pass_, model, ctx)
        self._starts.append(time.perf_counter())
        self._cpu_starts.append(process_cpu_seconds())

    def run_after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:
        start = self._starts.pop()
        elapsed = time.perf_counter() - start
        cpu = process_cpu_seconds() - self._cpu_starts.pop()
        if self.memory is not None:
            self.memory.run_after_pass(pass_, result, ctx)
        if pass_.composite:
            return
        self.seconds.append((pass_.spec(), elapsed))
        self.cpu_seconds.append(cpu)
        peaks = self.memory.peaks if self.memory is not None else []
        ctx.records["resources"] = {
            "passes": [{"pass": name, "seconds": round(seconds, 4), "cpu_seconds": round(self.cpu_seconds[i], 3),
                        **({"peak_rss_mb": peaks[i][1]} if i < len(peaks) else {})}
                       for i, (name, seconds) in enumerate(self.seconds)],
            "peak_rss_mb": round(lifetime_peak_mb() or 0.0, 1),
        }


def process_cpu_seconds() -> float:
    """User + system CPU seconds of this process and of the children it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def resident_mb() -> float | None:
    """This process's resident memory now, in MiB."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def lifetime_peak_mb() -> float | None:
    """This process's peak resident memory so far (the kernel's high-water mark), in MiB."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kib / 1024


class PeakMemory(PassInstrument):
    """Peak resident memory of each pass, in MiB, in run order (the members of a composite, not the composite).

    Exact when the pass raised the process's high-water mark (the kernel's ``VmHWM``); otherwise the largest
    resident size sampled every ``interval`` seconds while it ran (a spike shorter than that can be missed).
    The high-water mark is never reset: a parent measuring this process's peak with ``wait4`` stays right."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peaks: list[tuple[str, float]] = []
        self._stack: list[tuple[float, list[float], threading.Event, threading.Thread]] = []

    def run_before_pass(self, pass_: Pass, model: Model, ctx: PassContext) -> None:
        samples: list[float] = [resident_mb() or 0.0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(self.interval):
                now = resident_mb()
                if now is not None and now > samples[0]:
                    samples[0] = now

        thread = threading.Thread(target=sample, name="bitpass-peak-memory", daemon=True)
        thread.start()
        self._stack.append((lifetime_peak_mb() or 0.0, samples, stop, thread))

    def run_after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:
        high_before, samples, stop, thread = self._stack.pop()
        stop.set()
        thread.join()
        high_after = lifetime_peak_mb() or 0.0
        peak = high_after if high_after > high_before else max(samples[0], resident_mb() or 0.0)
        if not pass_.composite:
            self.peaks.append((pass_.spec(), round(peak, 1)))


class VerificationError(BitpassError):
    """A pass left the model invalid."""


class Verifier(PassInstrument):
    """After each pass that changed the model: onnx checker, shape inference, annotation schema."""

    def run_after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:
        if not result.modified or pass_.composite:  # a composite's members were verified one by one
            return
        verify(result.model)


#: models with more weight bytes than this are verified from a file with external data: checked in memory, the
#: proto, its serialized bytes and ONNX's C++ copies held a 1.4 GB GPT-2-medium about five times (9.4 GB)
VERIFY_IN_MEMORY_BYTES = 256 << 20


def verify(model: Model) -> None:
    """Raise ``VerificationError`` if ``model`` is not a valid, consistently annotated ONNX model."""
    try:
        if model.weight_bytes() > VERIFY_IN_MEMORY_BYTES:
            _verify_from_file(model)
        else:
            proto = model.to_proto()
            onnx.checker.check_model(proto)
            onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise VerificationError(f"invalid ONNX: {str(err).strip().splitlines()[0]}") from err
    problems = annotation.check_schema(model.ir)
    if problems:
        raise VerificationError(f"bad annotations: {problems[0]}" + (f" (+{len(problems) - 1} more)"
                                                                      if len(problems) > 1 else ""))


def _verify_from_file(model: Model) -> None:
    """The same checker and shape inference, by path: the weights are written beside the graph tensor by tensor and
    never read back (both only need their types and shapes; small constants stay inline)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bitpass-verify-") as tmp:
        path = Path(tmp) / "model.onnx"
        model.save_external(path)
        onnx.checker.check_model(str(path))
        onnx.shape_inference.infer_shapes_path(str(path), str(Path(tmp) / "inferred.onnx"), check_type=True,
                                               strict_mode=False)


class Progress(PassInstrument):
    """Tells the context's progress callback which pass is running."""

    def run_before_pass(self, pass_: Pass, model: Model, ctx: PassContext) -> None:
        if not pass_.composite:
            ctx.progress(f"running {pass_.spec()}")
