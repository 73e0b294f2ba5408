"""The ONNX Runtime backend: legalize, write model.onnx + session.json, load a runner."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bitpass.backends.base import Backend, Capabilities, Runner
from bitpass.backends.onnxruntime.runner import DEFAULT_SESSION, OrtRunner
from bitpass.frontend import Model


@functools.cache
def _cpu_kernels() -> frozenset[tuple[str, str]]:
    """(domain, op_type) pairs the installed ONNX Runtime has CPU kernels for."""
    from onnxruntime.capi import _pybind_state

    ops = {(k.domain or "", k.op_name) for k in _pybind_state.get_all_opkernel_def()
           if k.provider == "CPUExecutionProvider"}
    # Functions and ops ORT expands before kernel lookup (no kernel of their own).
    ops |= {("", op) for op in ("Constant", "Identity", "LayerNormalization", "Gelu", "Celu",
                                "MeanVarianceNormalization", "Shrink", "GreaterOrEqual", "LessOrEqual",
                                "Softsign", "HardSwish", "Mish", "Range", "RMSNormalization")}
    return frozenset(ops)


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU: QDQ int8, MatMulNBits low-bit weights, fp32 elsewhere."""

    name = "onnxruntime"
    targets = {"cpu": "ONNX Runtime CPU execution provider (x86-64 or aarch64)"}
    default_target = "cpu"

    def capabilities(self, target: str) -> Capabilities:
        self.check_target(target)
        # NOTES.md: MatMulNBits takes 2/4/8 bits on MatMul (Gemm after rewriting to MatMul+Add);
        # QDQ int8 everywhere ORT quantizes; blocked int4 DequantizeLinear -> Conv at opset 21.
        return Capabilities(
            ops=_cpu_kernels(),
            # every width runs everywhere in the packed format (unpacked at load, fp32 speed); the
            # compute formats (QDQ, MatMulNBits, blocked DQ) are offered where measured faster
            weight_bits={"Conv": (2, 4, 8, 32), "ConvTranspose": (2, 4, 8, 32), "Gemm": (2, 4, 8, 32),
                         "MatMul": (2, 4, 8, 32), "Gather": (2, 4, 8, 32)},
            activation_bits=(8, 32),
        )

    def latency_probe(self, target: str, *, threads: int = 0):
        """The target's timer (``latency.LatencyProbe``): called as ``(model, variants, progress, batches=(1, 64),
        calibration=None) -> {layer: {(bits, variant): {batch: seconds}}}``, one-layer models timed in a fresh
        process; ``.graphs(models, feeds)`` times whole candidate artifacts against each other."""
        from bitpass.backends.onnxruntime import latency

        self.check_target(target)
        return latency.LatencyProbe(threads=threads)

    def emit(self, model: Model, directory: Path, target: str) -> list[str]:
        self.check_target(target)
        (directory / "model.onnx").write_bytes(model.to_bytes())
        (directory / "session.json").write_text(json.dumps(DEFAULT_SESSION, indent=2, sort_keys=True) + "\n")
        return ["model.onnx", "session.json"]

    def load(self, directory: Path, manifest: Mapping[str, Any] | None = None, *,
             threads: int | None = None, for_timing: bool = False) -> Runner:
        return OrtRunner.from_directory(directory, threads=threads, for_timing=for_timing)
