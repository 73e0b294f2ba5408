"""Whole-graph format search: the int8 flavour and the plan's repairs are chosen by timing whole artifacts.

Most tests time candidates with a cost-model target (each layer costs what its format costs on an imagined
CPU), so the expected choice is known; the last ones run the real ONNX Runtime probe end to end.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from bitpass.frontend import annotation, from_arrays
from bitpass.passes.calibrate import activation_ranges
from bitpass.passes.format_search import Candidate, _eligibility, search
from bitpass.passes.int8_flavours import S8S8, U8S8, constant_tensors
from bitpass.passes.materialize import QuantizeOptions


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITPASS_CACHE_DIR", str(tmp_path / "cache"))


class Timed:
    def __init__(self, seconds: dict[str, float], batches) -> None:
        self.seconds, self.batches, self.errors = seconds, batches, {}

    def ratio(self, name: str, reference: str, batch: int) -> float | None:
        return self.seconds[reference] / self.seconds[name]


class CostModelTarget:
    """Times a model as the sum of its layers' costs: fp32 1.0, dynamic int8 ``dynamic``, QDQ int8 ``u8`` with
    uint8 activations and ``s8`` with int8 ones; ``slow`` layers cost ``slow_cost`` in any int8 format."""

    def __init__(self, u8=0.3, s8=0.6, dynamic=0.5, slow=(), slow_cost=3.0) -> None:
        self.u8, self.s8, self.dynamic, self.slow, self.slow_cost = u8, s8, dynamic, set(slow), slow_cost
        self.calls = 0

    def cost(self, model_bytes: bytes) -> float:
        proto = onnx.load_model_from_string(model_bytes)
        constant = constant_tensors(proto)
        inits = {t.name: t for t in proto.graph.initializer}
        uint8 = any(n.op_type == "QuantizeLinear" and n.input[0] not in constant
                    and inits.get(n.input[2]) is not None and inits[n.input[2]].data_type == onnx.TensorProto.UINT8
                    for n in proto.graph.node)
        total = 0.0
        for node in proto.graph.node:
            keys = {p.key: p.value for p in node.metadata_props}
            layer = keys.get("bitpass.layer_id")
            if layer is None or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                continue
            fmt = keys.get("bitpass.format.weight")
            if fmt in (None, '"packed"'):  # fp32 kernels
                total += 1.0
            elif layer.strip('"') in self.slow:
                total += self.slow_cost
            elif fmt == '"dynamic"':
                total += self.dynamic
            else:
                total += self.u8 if uint8 else self.s8
        return total

    def graphs(self, models, feeds):
        self.calls += 1
        return Timed({name: self.cost(data) for name, data in models.items()}, list(feeds))


class CostModelLayers:
    """The per-layer table the same imagined CPU gives (what the probe would have measured)."""

    def __init__(self, target: CostModelTarget) -> None:
        self.target = target

    def __call__(self, wanted):
        t = self.target
        table = {}
        for layer_id, variants in wanted.items():
            slow = layer_id in t.slow
            row = {(32, "fp32"): {1: 1.0, 8: 1.0}}
            for bits, name in variants:
                cost = t.slow_cost if slow else {"qdq-u8": t.u8, "qdq-s8": t.s8, "dynamic": t.dynamic}[name]
                row[(bits, name)] = {1: cost, 8: cost}
            table[layer_id] = row
        return table


def _search(model, calib_arrays, target, **kwargs):
    data = from_arrays(calib_arrays, model.inputs)
    return search(model, ranges=activation_ranges(model, data), calibration=data, options=QuantizeOptions(),
                  timer=target, layer_times=CostModelLayers(target), **kwargs)


def _formats(model) -> dict[str, str | None]:
    """Each layer's ``format.weight`` as the model's nodes carry it."""
    return {layer_id: annotation.weight_format(node) for node in model.graph
            if (layer_id := annotation.layer_id(node)) is not None}


def test_the_fastest_exact_flavour_is_chosen_and_recorded(cnn_model, calib_arrays):
    result = _search(cnn_model, calib_arrays, CostModelTarget(u8=0.3, s8=0.6))
    assert result.flavour == U8S8 and result.record["chosen"] == "plan-u8s8"
    first = {c["name"]: c for c in result.record["rounds"][0]["candidates"]}
    assert first["plan-u8s8"]["speedup"]["1"] == pytest.approx(5 / 1.5, abs=1e-3)
    assert first["plan-s8s8"]["speedup"]["1"] == pytest.approx(5 / 3.0, abs=1e-3)
    assert all(c["relative_error"] < 1e-2 for c in first.values())
    slower_u8 = _search(cnn_model, calib_arrays, CostModelTarget(u8=0.9, s8=0.4), use_cache=False)
    assert slower_u8.flavour == S8S8


def test_a_flavour_whose_error_is_far_above_the_best_is_not_eligible():
    """Saturation (U8S8 on AVX2 without VNNI: relative error 0.11 against 0.014) rules a flavour out."""
    exact, saturating = Candidate("a", {}, S8S8, "", error=0.014), Candidate("b", {}, U8S8, "", error=0.11)
    _eligibility([exact, saturating])
    assert exact.eligible and not saturating.eligible and "not eligible" in saturating.why


def test_layers_slow_in_int8_fall_back_when_that_makes_the_model_faster(cnn_model, calib_arrays):
    slow = cnn_model.layers()[0].id
    result = _search(cnn_model, calib_arrays, CostModelTarget(slow={slow}))
    assert result.plan[slow].weight_bits == 32
    assert all(result.plan[layer.id].format == "qdq" for layer in cnn_model.layers()[1:3])
    assert result.record["changed"][slow] == "fp32"
    assert _formats(result.model)[slow] is None


def test_dense_layers_switch_to_dynamic_int8_where_it_is_faster(cnn_model, calib_arrays):
    result = _search(cnn_model, calib_arrays, CostModelTarget(u8=0.6, s8=0.9, dynamic=0.2))
    dense = [layer.id for layer in cnn_model.layers() if layer.op_type in ("Gemm", "MatMul")]
    assert all(result.plan[i].format == "dynamic" for i in dense)
    assert all(_formats(result.model)[i] == "dynamic" for i in dense)


def test_when_int8_never_pays_every_layer_stays_fp32_and_the_record_says_so(cnn_model, calib_arrays):
    result = _search(cnn_model, calib_arrays, CostModelTarget(u8=1.5, s8=2.0, dynamic=1.8))
    assert result.record["chosen"] == "fallback" and "no faster than fp32" in result.record["note"]
    assert all(p.weight_bits == 32 for p in result.plan.values())
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
                   for n in result.model.graph)


def test_an_allocated_plan_falls_back_to_packed_at_its_width(cnn_model, calib_arrays):
    from bitpass.passes.materialize import LayerPlan, annotate

    annotate(cnn_model, {layer.id: LayerPlan(4, 8, "qdq") for layer in cnn_model.layers()})
    result = _search(cnn_model, calib_arrays, CostModelTarget(u8=1.5, s8=2.0, dynamic=1.8), fallback="packed")
    assert {(p.weight_bits, p.format) for p in result.plan.values()} == {(4, "packed")}


def test_the_choice_is_cached_so_the_same_inputs_give_the_same_artifact(cnn_model, calib_arrays):
    target = CostModelTarget()
    first = _search(cnn_model, calib_arrays, target)
    calls = target.calls
    again = _search(cnn_model, calib_arrays, target)
    assert target.calls == calls and again.record["cached"] is True
    assert again.model.to_bytes() == first.model.to_bytes()


def test_the_real_target_times_whole_models_in_a_fresh_process(cnn_model, calib_arrays, tmp_path):
    """End to end with ONNX Runtime: every candidate timed at both batch sizes, the winner's figures recorded,
    and its outputs checked against fp32."""
    from bitpass.backends.onnxruntime.latency import LatencyProbe

    probe = LatencyProbe(cache=tmp_path / "latency.json")
    data = from_arrays(calib_arrays, cnn_model.inputs)
    messages = []
    result = search(cnn_model, ranges=activation_ranges(cnn_model, data), calibration=data,
                    options=QuantizeOptions(), timer=probe,
                    layer_times=lambda wanted: probe(cnn_model, wanted, batches=(1, 8), calibration=data),
                    batches=(1, 8), progress=messages.append)
    timed = [c for r in result.record["rounds"] for c in r.get("candidates", [])]
    assert {"plan-u8s8", "plan-s8s8"} <= {c["name"] for c in timed}
    assert all(set(c["speedup"]) == {"1", "8"} and all(v > 0 for v in c["speedup"].values()) for c in timed)
    assert result.record["chosen"] in {c["name"] for c in timed} | {"fallback"}
    assert any(m.startswith("format search: chose") for m in messages)
    x = calib_arrays["input"][:64]
    import onnxruntime as ort

    got = ort.InferenceSession(result.model.to_bytes(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    ref = ort.InferenceSession(cnn_model.to_bytes(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.98
