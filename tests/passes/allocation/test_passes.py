"""The allocate-bits pass on the project's trained digits CNN."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from bitpass.frontend import annotation, from_arrays
from bitpass.frontend.errors import UsageError
from bitpass.passes.allocation.passes import AllocateBits
from bitpass.passes.infra import PassContext, Target
from bitpass.passes.spec import parse_text


def magnitude_sensitivity(model) -> dict[str, float]:
    """A real (if crude) per-layer score: the mean squared weight, so large-weight layers count more."""
    return {layer.id: float(np.mean(layer.weight_array.astype(np.float64) ** 2)) for layer in model.layers()}


def context(model, **analyses) -> PassContext:
    ctx = PassContext()
    ctx.analyses.put("sensitivity", magnitude_sensitivity(model))
    for name, value in analyses.items():
        ctx.analyses.put(name.replace("_", "-"), value)
    return ctx


def annotated_avg_bits(model) -> float:
    layers = model.layers()
    return sum(layer.params * annotation.weight_bits(layer.node) for layer in layers) / sum(
        layer.params for layer in layers)


@pytest.mark.parametrize("method", ["ilp", "pareto", "baq", "greedy"])
def test_every_layer_is_annotated_and_the_average_meets_the_budget(cnn_model, method):
    ctx = context(cnn_model)
    result = AllocateBits(method=method, budget="avg-bits=4").run(cnn_model, ctx)
    assert result.model is cnn_model and result.modified
    for layer in cnn_model.layers():
        bits = annotation.weight_bits(layer.node)
        assert bits in (2, 4, 8, 32)
        fmt = annotation.weight_format(layer.node)
        # without a latency measurement every quantized width is stored packed: fp32 compute, fp32 activations
        assert fmt == (None if bits == 32 else "packed")
        assert annotation.activation_bits(layer.node) == 32
    assert annotated_avg_bits(cnn_model) <= 4 + 1e-9
    assert annotation.check_schema(cnn_model.ir) == []
    record = ctx.records["allocation"]
    assert record["plan"] == {layer.id: annotation.weight_bits(layer.node) for layer in cnn_model.layers()}
    assert record["totals"]["avg-bits"] == pytest.approx(annotated_avg_bits(cnn_model))
    assert record["solver"] == method and record["seconds"] >= record["solver_seconds"] >= 0
    assert ctx.analyses.require("bits") == record["plan"]
    json.dumps(record)  # goes into the manifest as is


def test_annotations_survive_a_save_and_load(cnn_model, tmp_path):
    from bitpass.frontend import from_onnx

    AllocateBits(budget="avg-bits=4").run(cnn_model, context(cnn_model))
    cnn_model.save(tmp_path / "m.onnx")
    loaded = from_onnx(tmp_path / "m.onnx")
    assert {l.id: annotation.weight_bits(l.node) for l in loaded.layers()} == \
        {l.id: annotation.weight_bits(l.node) for l in cnn_model.layers()}


def test_size_and_bops_budgets_on_the_real_model(cnn_model):
    ctx = context(cnn_model)
    AllocateBits(budget="size=60KB,bops=60M").run(cnn_model, ctx)
    totals = ctx.records["allocation"]["totals"]
    assert totals["size"] <= 60_000 and totals["bops"] <= 60e6


def measured(model, seconds: dict[str, dict[int, float]], batch: int = 1) -> dict:
    """A latency probe's table (``latency-variants``): each layer's fp32 time and, per width, the time of its
    first compute format (the one ``formats=compute`` takes); widths without one run packed, at fp32 speed."""
    from bitpass.passes.allocation.formats import compute_formats

    table = {}
    for layer in model.layers():
        row = {(32, "fp32"): {batch: seconds[layer.id][32]}}
        for bits, value in seconds[layer.id].items():
            for fmt in compute_formats(layer, bits)[:1]:
                row[(bits, fmt)] = {batch: value}
        table[layer.id] = row
    return table


def test_a_measured_table_keeps_a_layer_fp32_when_its_compute_formats_are_slower(cnn_model):
    ids = [layer.id for layer in cnn_model.layers()]
    first = ids[0]  # the first conv: 1 input channel, where an int8 conv does not pay off
    table = {i: {32: 1e-4, 8: 5e-5, 4: 4e-5, 2: 4e-5} for i in ids}
    table[first] = {32: 1e-5, 8: 3e-5, 4: 3e-5}
    ctx = context(cnn_model, latency_variants=measured(cnn_model, table))
    AllocateBits(budget="avg-bits=4.5", formats="compute", widths=[8, 4]).run(cnn_model, ctx)
    assert ctx.records["allocation"]["plan"][first] == 32
    rule = ctx.records["allocation"]["latency_rule"]
    assert rule["applied"] and first in rule["kept_fp32"] and "slower than fp32" in rule["kept_fp32"][first]
    assert annotated_avg_bits(cnn_model) <= 4.5 + 1e-9
    assert "latency" in ctx.records["allocation"]["totals"]


def test_a_width_slower_than_fp32_is_not_offered(cnn_model):
    ids = [layer.id for layer in cnn_model.layers()]
    table = {i: {32: 1e-4, 8: 5e-5, 4: 4e-5, 2: 4e-5} for i in ids}
    # its int8 kernel is slow, and so is 2-bit storage, whose compute is that int8 kernel; its 4-bit
    # blocked-DequantizeLinear kernel is fast
    table[ids[1]] = {32: 1e-4, 8: 2e-4, 4: 5e-5}
    ctx = context(cnn_model, latency_variants=measured(cnn_model, table))
    AllocateBits(budget="avg-bits=6", formats="compute").run(cnn_model, ctx)
    record = ctx.records["allocation"]
    assert record["candidates"][ids[1]] == [32, 4]
    assert record["plan"][ids[1]] != 8


def test_packed_widths_are_never_slower_so_auto_formats_never_drop_a_width(cnn_model):
    """With ``formats=auto`` a width whose compute format is slower runs packed (fp32 speed): nothing is dropped."""
    ids = [layer.id for layer in cnn_model.layers()]
    table = {i: {32: 1e-4, 8: 2e-4, 4: 2e-4, 2: 2e-4} for i in ids}  # every compute format slower than fp32
    ctx = context(cnn_model, latency_variants=measured(cnn_model, table))
    AllocateBits(budget="avg-bits=4").run(cnn_model, ctx)
    record = ctx.records["allocation"]
    assert "latency_rule" not in record and record["latency_measured"] is True
    assert {f["format"] for f in record["formats"].values()} <= {"packed", "fp32"}
    assert annotated_avg_bits(cnn_model) <= 4 + 1e-9


def test_the_latency_rule_yields_when_the_budget_needs_the_slower_width(cnn_model):
    big = max(cnn_model.layers(), key=lambda layer: layer.params).id  # 64k of the ~90k weights
    table = {layer.id: {32: 1e-5, 8: 5e-6, 4: 5e-6, 2: 5e-6} for layer in cnn_model.layers()}
    table[big] = {32: 1e-5, 8: 2e-5, 4: 2e-5, 2: 2e-5}
    ctx = context(cnn_model, latency_variants=measured(cnn_model, table))
    AllocateBits(budget="avg-bits=4", formats="compute").run(cnn_model, ctx)
    rule = ctx.records["allocation"]["latency_rule"]
    assert rule["applied"] is False and "budget needs widths slower than fp32" in rule["why"]
    assert ctx.records["allocation"]["plan"][big] != 32


def test_a_latency_budget_is_met(cnn_model):
    ids = [layer.id for layer in cnn_model.layers()]
    table = {i: {32: 1e-4, 8: 5e-5, 4: 3e-5, 2: 2e-5} for i in ids}
    ctx = context(cnn_model, latency_variants=measured(cnn_model, table))
    AllocateBits(budget="latency=0.3ms", formats="compute").run(cnn_model, ctx)
    totals = ctx.records["allocation"]["totals"]
    assert 0 < totals["latency"] <= 0.3e-3 * (1 + 1e-9)  # summed floats
    with pytest.raises(UsageError, match="latency"):  # nothing measured: a latency budget cannot be checked
        AllocateBits(budget="latency=0.3ms").run(cnn_model, context(cnn_model))


def test_keep_fp32_layers_stay_fp32(cnn_model):
    last = cnn_model.layers()[-1].id
    ctx = context(cnn_model)
    AllocateBits(budget="avg-bits=4", keep_fp32=last).run(cnn_model, ctx)
    assert annotation.weight_bits(cnn_model.layer(last).node) == 32
    assert annotation.activation_bits(cnn_model.layer(last).node) == 32
    with pytest.raises(UsageError, match="keep_fp32 'nope' matches no layer"):
        AllocateBits(keep_fp32="nope").run(cnn_model, context(cnn_model))


def test_widths_follow_the_targets_capabilities(cnn_model):
    from bitpass.backends.base import Capabilities

    caps = Capabilities(ops=frozenset(), weight_bits={"Conv": (4, 8, 32), "Gemm": (2, 4, 8, 32)})
    ctx = context(cnn_model)
    ctx.target = Target(options={"capabilities": caps})
    AllocateBits(budget="avg-bits=4").run(cnn_model, ctx)
    record = ctx.records["allocation"]
    for layer in cnn_model.layers():
        assert record["candidates"][layer.id] == ([32, 8, 4] if layer.op_type == "Conv" else [32, 8, 4, 2])
    assert record["widths"].startswith("target")


def test_sweep_records_the_frontier(cnn_model):
    ctx = context(cnn_model)
    AllocateBits(method="ilp", budget="size=40KB", sweep=True).run(cnn_model, ctx)
    frontier = ctx.records["allocation"]["frontier"]
    assert frontier["dimension"] == "size" and frontier["points"] >= len(frontier["recorded"]) > 2
    costs = [p["cost"] for p in frontier["recorded"]]
    assert costs == sorted(costs)


def test_a_per_bit_sensitivity_table_is_used(cnn_model):
    ctx = PassContext()
    ids = [layer.id for layer in cnn_model.layers()]
    # the last layer is made very sensitive at every width: it must stay at 8 bits or more
    table = {i: {2: 1.0, 4: 0.1, 8: 0.01} for i in ids}
    table[ids[-1]] = {2: 1e6, 4: 1e5, 8: 1.0}
    ctx.analyses.put("sensitivity", table)
    AllocateBits(budget="avg-bits=4").run(cnn_model, ctx)
    assert ctx.records["allocation"]["plan"][ids[-1]] >= 8
    assert ctx.records["allocation"]["sensitivity"] == "analysis:per-bit"


def test_falls_back_to_node_annotations_when_the_analysis_is_gone(cnn_model):
    for layer_id, value in magnitude_sensitivity(cnn_model).items():
        annotation.set_sensitivity(cnn_model.layer(layer_id).node, "fisher", value)
    ctx = PassContext()
    AllocateBits(budget="avg-bits=4", sensitivity="fisher").run(cnn_model, ctx)
    assert ctx.records["allocation"]["sensitivity"] == "annotation:fisher"
    assert annotated_avg_bits(cnn_model) <= 4 + 1e-9
    with pytest.raises(UsageError, match="no sensitivity has been computed.*'hutchinson' sensitivity annotation"):
        AllocateBits(budget="avg-bits=4").run(cnn_model, PassContext())


def test_accuracy_drop_measures_each_plan_on_the_evaluation_data(cnn_model, eval_arrays):
    from bitpass.passes.materialize import materialize, packed_plan

    ctx = context(cnn_model)
    ctx.evaluation = from_arrays(eval_arrays, cnn_model.inputs)
    AllocateBits(budget="accuracy-drop=2").run(cnn_model, ctx)
    record = ctx.records["allocation"]
    search = record["accuracy_search"]
    assert (search["baseline"] - search["accuracy"]) * 100 <= 2 + 1e-9
    assert search["baseline"] == pytest.approx(0.998, abs=0.005)  # the trained CNN's held-out accuracy
    assert annotated_avg_bits(cnn_model) < 8
    assert any("not independent" in note for note in ctx.records["notes"])
    # the reported accuracy is the chosen plan's, packed, measured again here
    packed = materialize(cnn_model, packed_plan(record["plan"]))
    logits = ort.InferenceSession(packed.to_bytes(), providers=["CPUExecutionProvider"]).run(
        None, {"input": eval_arrays["input"]})[0]
    assert float((logits.argmax(1) == eval_arrays["labels"]).mean()) == pytest.approx(search["accuracy"])
    with pytest.raises(UsageError, match="accuracy-drop budget needs"):
        AllocateBits(budget="accuracy-drop=2").run(cnn_model, context(cnn_model))


def test_the_pass_is_written_in_a_pipeline_spec():
    [(name, options)] = parse_text('allocate-bits(method=greedy,budget="avg-bits=4,size=60KB",sweep=true)')
    pass_ = AllocateBits(**options)
    assert name == pass_.name == "allocate-bits"
    assert parse_text(pass_.spec()) == [(name, options)]  # the spec round-trips
    with pytest.raises(UsageError, match="allocate-bits.*unknown budget 'speed'"):
        AllocateBits(budget="speed=3")
    with pytest.raises(UsageError, match="method="):
        AllocateBits(method="annealing")


class FlavourCpu:
    """A target whose one-layer timings (a Quantize and a Dequantize around each layer) make S8S8 look faster,
    while the whole graph runs U8S8 twice as fast (what an AVX-512 VNNI EPYC does to ResNet-18): layers cost fp32
    1.0; alone, qdq-s8 0.5 and qdq-u8 0.8; in a whole graph, uint8 activations 0.3 and int8 ones 0.6."""

    def __init__(self) -> None:
        self.asked: list = []

    def __call__(self, model, wanted, progress=None, batches=(1, 8), **_):
        self.asked.extend(v for variants in wanted.values() for v in variants)
        alone = {"qdq-s8": 0.5, "qdq-u8": 0.8}
        return {lid: {(32, "fp32"): {b: 1.0 for b in batches},
                      **{v: {b: alone.get(v[1], 0.9) for b in batches} for v in variants}}
                for lid, variants in wanted.items()}

    def graphs(self, models, feeds, **_):
        import onnx

        from bitpass.passes.int8_flavours import constant_tensors

        def cost(path) -> float:
            proto = onnx.load(str(path), load_external_data=False)
            constant, inits = constant_tensors(proto), {t.name: t for t in proto.graph.initializer}
            uint8 = any(n.op_type == "QuantizeLinear" and n.input[0] not in constant and n.input[2] in inits
                        and inits[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in proto.graph.node)
            int8 = any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
            layers = [n for n in proto.graph.node if any(p.key == "bitpass.layer_id" for p in n.metadata_props)
                      and n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
            return len(layers) * ((0.3 if uint8 else 0.6) if int8 else 1.0)

        seconds = {name: cost(path) for name, path in models.items()}

        class Timed:
            errors: dict = {}

            def ratio(self, name, reference, batch):
                return seconds[reference] / seconds[name]

        return Timed()


def test_layers_are_timed_in_the_int8_flavour_the_whole_graph_runs_fastest(cnn_model, calib_arrays, tmp_path,
                                                                          monkeypatch):
    from bitpass.passes.calibrate import activation_ranges

    monkeypatch.setenv("BITPASS_CACHE_DIR", str(tmp_path / "cache"))
    data = from_arrays(calib_arrays, cnn_model.inputs)
    cpu = FlavourCpu()
    ctx = PassContext(calibration=data, target=Target("onnxruntime", "cpu", {"latency_probe": cpu}))
    ctx.analyses.put("sensitivity", magnitude_sensitivity(cnn_model))
    ctx.analyses.put("activation-ranges", activation_ranges(cnn_model, data))
    AllocateBits(budget="avg-bits=6", widths=[8, 4]).run(cnn_model, ctx)
    record = ctx.records["allocation"]
    assert record["int8_flavour"] == "qdq-u8"  # the one-layer timings alone would say qdq-s8
    assert record["int8_flavour_why"]["chosen"] == "u8s8"
    assert (8, "qdq-u8") in cpu.asked and (8, "qdq-s8") not in cpu.asked  # the other flavour is never timed
    qdq = [lid for lid, f in record["formats"].items() if f["format"] == "qdq"]
    assert qdq and all(record["formats"][lid]["variant"] == "qdq-u8" for lid in qdq)
