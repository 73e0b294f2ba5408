"""What a backend is: capabilities per target, legalization, emission, and a runner."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bitpass.frontend import Model


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run on one target.

    ``weight_bits`` maps a quantizable op type to the weight widths it supports
    (32 means floating point); bit allocation offers a layer only these widths.
    """

    ops: frozenset[tuple[str, str]]  # (domain, op_type); "" is the default ONNX domain
    weight_bits: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    activation_bits: tuple[int, ...] = (8, 32)
    #: the backend reads the bits annotations and emits its own low-bit kernels, so the
    #: ``quantize`` pass (which writes ONNX Runtime's formats) leaves the graph alone
    lowers_bits: bool = False

    def supports_op(self, domain: str, op_type: str) -> bool:
        return (domain if domain != "ai.onnx" else "", op_type) in self.ops

    def widths_for(self, op_type: str) -> tuple[int, ...]:
        return self.weight_bits.get(op_type, (32,))


class Runner(abc.ABC):
    """Runs an emitted artifact: feeds by input name, outputs in graph order."""

    input_names: list[str]
    output_names: list[str]

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...

    def run_first(self, feeds: Mapping[str, np.ndarray], count: int) -> list[np.ndarray]:
        """The first ``count`` outputs of ``run``; a runtime that can compute only those overrides it (ONNX Runtime:
        a language model's KV-cache outputs are then never made)."""
        return self.run(feeds)[:count]


class Backend(abc.ABC):
    """A code generator for one runtime, with named targets."""

    name: ClassVar[str]
    #: whether artifacts are compiled for fixed input shapes besides the batch (symbolic dimensions then take
    #: the calibration data's sizes: ``frontend.shapes.fix_dims``)
    static_shapes: ClassVar[bool] = False
    #: target name -> one-line description
    targets: ClassVar[Mapping[str, str]]
    default_target: ClassVar[str]

    @abc.abstractmethod
    def capabilities(self, target: str) -> Capabilities: ...

    def legalize(self, model: Model, target: str) -> list[str]:
        """Problems that stop ``model`` from running on ``target`` (empty when none); checked before emitting."""
        caps = self.capabilities(target)
        problems = []
        for node in model.graph.all_nodes():
            if not caps.supports_op(node.domain, node.op_type):
                domain = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
                problems.append(f"operator {domain}{node.op_type} (node {node.name!r}) is not supported by "
                                f"{self.name} on target {target!r}")
        return problems

    def runs_on_host(self, target: str) -> bool:
        """Whether an artifact for ``target`` runs on this machine (else it is not measured at compile time)."""
        return True

    def emulated_runner(self, directory: Path, manifest: Mapping[str, Any]) -> Runner:
        """A runner for an artifact of a foreign target, run under emulation (``bitpass verify --emulate``)."""
        from bitpass.frontend.errors import UsageError

        raise UsageError(f"backend {self.name!r} cannot emulate target {manifest.get('target')!r}")

    def host_twin(self, model: Model, directory: Path) -> Runner:
        """The same plan built for this machine: what an emulated run is compared with."""
        self.emit(model, directory, self.default_target)
        return self.load(directory, {})

    def latency_probe(self, target: str) -> Any:
        """A per-layer latency measurer for bit allocation, or None when the backend has none:
        ``probe(model, {layer_id: [(bits, format), ...]}, progress, batches=(1, 64))`` returns
        ``{layer_id: {(bits, format): {batch: seconds per call}}}`` (untimed layers left out)."""
        return None

    def stored_weight_bytes(self, model: Model, directory: Path) -> int:
        """Bytes of every constant as the emitted artifact in ``directory`` stores them. The default is the
        graph's own constants (a backend that runs the ONNX graph stores what it holds); a backend that
        lowers bits itself counts its kernels' packed weights instead."""
        return model.weight_bytes()

    def records(self, directory: Path) -> dict[str, Any]:
        """What the backend tells the manifest about an artifact it emitted in ``directory`` (its
        ``records["backend"]``): e.g. how each layer was lowered. Empty by default."""
        return {}

    @abc.abstractmethod
    def emit(self, model: Model, directory: Path, target: str) -> list[str]:
        """Write the deployable files into ``directory``; return their names. A backend whose emit takes
        minutes may accept a keyword ``progress`` (a ``bitpass.passes.progress.Reporter``): the compile passes
        it when the signature has it."""

    @abc.abstractmethod
    def load(self, directory: Path, manifest: Mapping[str, Any], *, for_timing: bool = False) -> Runner:
        """A runner for an artifact this backend emitted (``for_timing``: set up to be timed beside others)."""

    def check_target(self, target: str) -> None:
        from bitpass.frontend.errors import UsageError

        if target not in self.targets:
            raise UsageError(f"backend {self.name!r} has no target {target!r}; targets: {', '.join(self.targets)}")


def reference_runner(model: Model, *, threads: int | None = None, for_timing: bool = False) -> Runner:
    """An ONNX Runtime runner for an fp32 model in memory (the reference every artifact is measured against).

    Loaded by path from a temporary file with the weights as external data: serialized in memory, a BERT-base
    model held 870 MB more (its proto and its bytes) while the session was made, the compile's peak."""
    import tempfile

    from bitpass.backends.onnxruntime.runner import OrtRunner

    with tempfile.TemporaryDirectory(prefix="bitpass-reference-") as tmp:
        path = Path(tmp) / "reference.onnx"
        model.save_external(path)
        return OrtRunner.from_path(path, threads=threads, for_timing=for_timing)

