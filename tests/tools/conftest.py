"""Fixtures of the tools tests: a latency probe for an imagined CPU, so that what bitpass chooses is known."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto


class ImaginedCpu:
    """The ONNX Runtime target's latency probe on an imagined CPU (the format search tests' cost model), so the
    search's choice is known: a model costs the sum of its layers, fp32 1.0, int8 QDQ 0.3 (uint8 activations) or
    0.6, dynamic int8 0.2, and ``slow`` layers 5.0 in any int8 format. Whole models (``graphs``) and single
    layers (``__call__``) cost alike."""

    def __init__(self, slow: set[str]) -> None:
        self.slow = slow

    def _cost(self, layer: str, fmt: str | None, uint8: bool) -> float:
        if fmt in (None, "packed"):
            return 1.0
        if layer in self.slow:
            return 5.0
        return 0.2 if fmt == "dynamic" else 0.3 if uint8 else 0.6

    def _model_cost(self, path) -> float:
        from bitpass.passes.int8_flavours import constant_tensors

        proto = onnx.load(str(path), load_external_data=False)
        constant, inits = constant_tensors(proto), {t.name: t for t in proto.graph.initializer}
        uint8 = any(n.op_type == "QuantizeLinear" and n.input[0] not in constant and n.input[2] in inits
                    and inits[n.input[2]].data_type == TensorProto.UINT8 for n in proto.graph.node)
        total = 0.0
        for node in proto.graph.node:
            notes = {p.key: p.value for p in node.metadata_props}
            if "bitpass.layer_id" in notes and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                fmt = notes.get("bitpass.format.weight")
                total += self._cost(notes["bitpass.layer_id"].strip('"'), fmt.strip('"') if fmt else None, uint8)
        return total

    def graphs(self, models, feeds, **longer):
        seconds = {name: self._model_cost(path) for name, path in models.items()}

        class Timed:
            errors: dict[str, str] = {}

            def ratio(self, name, reference, batch):
                return seconds[reference] / seconds[name]

        return Timed()

    def __call__(self, model, wanted, progress=None, batches=(1, 8), **_):
        table = {}
        for layer_id, variants in wanted.items():
            row = {(32, "fp32"): {b: 1.0 for b in batches}}
            for bits, name in variants:
                fmt = "dynamic" if name == "dynamic" else "qdq"
                row[(bits, name)] = {b: self._cost(layer_id, fmt, name != "qdq-s8") for b in batches}
            table[layer_id] = row
        return table



@pytest.fixture
def imagined_cpu(monkeypatch, tmp_path):
    """Makes the ONNX Runtime backend's latency probe an ``ImaginedCpu(slow)`` (and the compile caches this test's
    own): ``imagined_cpu(slow={...})`` returns it."""
    from bitpass.backends.onnxruntime.backend import OnnxRuntimeBackend

    monkeypatch.setenv("BITPASS_CACHE_DIR", str(tmp_path / "cache"))

    def install(slow=frozenset()) -> ImaginedCpu:
        cpu = ImaginedCpu(set(slow))
        monkeypatch.setattr(OnnxRuntimeBackend, "latency_probe", lambda self, target, **_: cpu)
        return cpu

    return install
