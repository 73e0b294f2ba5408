"""Joint allocation of bits and structured sparsity (``allocate-joint``) on the project's trained digits CNN."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bitpass.backends.onnxruntime.runner import OrtRunner
from bitpass.frontend import annotation, from_arrays
from bitpass.frontend.errors import UsageError
from bitpass.passes.allocation.joint import AllocateJoint, JointProblem, decode, packed_storage_bytes
from bitpass.passes.infra import PassContext
from bitpass.passes.packing import pack_weight
from bitpass.passes.quantize import Quantize
from bitpass.plugins.registry import default_registry


@pytest.mark.parametrize("shape,axis", [((16, 1, 3, 3), 0), ((64, 1024), 0), ((10, 64), 1), ((33, 7), 0)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_sizes_are_the_bytes_pack_weight_stores(shape, axis, bits):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    node = helper.make_node("Identity", ["w"], ["y"], name="n")
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph)
    pack_weight(proto, proto.graph.node[0], 0, axis, bits, 32)
    stored = sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
    assert packed_storage_bytes(shape, axis, bits, 32) == stored


@pytest.fixture
def prepared(cnn_model, calib_arrays, digits_split):
    """The CNN folded, fused, calibrated, with Fisher sensitivity (real gradients, labelled calibration)."""
    calib = from_arrays({**calib_arrays, "labels": digits_split.calib_y}, cnn_model.inputs)
    ctx = PassContext(calibration=calib)
    model = default_registry().pipeline(
        "fold-constants,eliminate-dead-nodes,fuse,calibrate(method=minmax),sensitivity(method=fisher)").run(
        cnn_model, ctx)
    return model, ctx


def test_the_problem_offers_channels_only_where_prune_channels_can_remove_them(prepared):
    model, ctx = prepared
    joint = JointProblem.from_model(model, ctx.analyses.require("sensitivity"))
    layers = joint.by_id
    assert layers["13"].kept == [10] and "graph output" in layers["13"].why_not_pruned
    assert layers["3"].kept == [32, 24, 16, 8]  # multiples of 8, as prune-channels rounds them
    assert layers["7"].consumers == [("11", 1, 16)]  # through Flatten: 16 features per channel


@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.15, 0.08])
def test_joint_plans_meet_the_budget_and_beat_both_restrictions(prepared, fraction):
    model, ctx = prepared
    joint = JointProblem.from_model(model, ctx.analyses.require("sensitivity"))
    limit = int(fraction * model.weight_bytes())
    result = joint.solve(f"size={limit}")
    assert result.totals["size"] <= limit
    assert result.totals == pytest.approx(joint.exact(result.plan))  # reported = every interaction counted
    for mode in ("bits", "sparsity"):
        try:
            restricted = joint.solve(f"size={limit}", mode)
        except UsageError:
            continue  # e.g. fp32 pruning alone cannot get this small
        assert restricted.totals["size"] <= limit
        assert result.totals["loss"] <= restricted.totals["loss"] * (1 + 1e-9)
        bits = {decode(o)[0] for o in restricted.plan.values()}
        kept_all = all(decode(o)[1] == joint.by_id[lid].channels for lid, o in restricted.plan.items())
        assert (kept_all if mode == "bits" else bits == {32})


def test_the_pass_and_quantize_give_an_artifact_of_the_reported_bytes(prepared, digits_split):
    model, ctx = prepared
    limit = int(0.12 * model.weight_bytes())
    AllocateJoint(budget=f"size={limit}", sweep=True).run(model, ctx)
    record = ctx.records["allocation"]
    json.dumps(record)
    assert record["totals"]["size"] <= limit
    assert {m: len(f) > 0 for m, f in record["frontiers"].items()} == {"joint": True, "bits": True, "sparsity": True}
    kept = {lid: int(p["channels"].split("->")[1]) for lid, p in record["plan"].items()}
    for layer in model.layers():
        assert annotation.weight_bits(layer.node) == record["plan"][layer.id]["bits"]
    quantized = Quantize().run(model, ctx).model
    assert quantized.weight_bytes() == record["totals"]["size"]  # the artifact's real bytes
    out = OrtRunner.from_bytes(quantized.to_bytes()).run({"input": digits_split.eval_x})[0]
    assert out.shape == (len(digits_split.eval_x), 10) and np.isfinite(out).all()
    accuracy = float((out.argmax(1) == digits_split.eval_y).mean())
    print(f"\njoint at {limit} B: {record['plan']}, accuracy {accuracy:.4f}")
    assert accuracy > 0.5
    assert any(k < int(p["channels"].split("->")[0]) for k, p in zip(kept.values(), record["plan"].values())) or \
        all(p["bits"] < 32 for p in record["plan"].values())


def test_restricted_modes_of_the_pass(prepared):
    model, ctx = prepared
    sparse = model.clone()
    AllocateJoint(budget="size=0.5x", mode="sparsity").run(sparse, ctx)
    assert all(p["bits"] == 32 for p in ctx.records["allocation"]["plan"].values())
    assert sparse.weight_bytes() == ctx.records["allocation"]["totals"]["size"] <= 0.5 * model.weight_bytes()
    AllocateJoint(budget="size=0.2x", mode="bits").run(model, ctx)
    assert all(a == b for a, b in (p["channels"].split(" -> ") for p in ctx.records["allocation"]["plan"].values()))
    with pytest.raises(UsageError, match="accuracy"):
        AllocateJoint(budget="accuracy-drop=1")


@pytest.fixture
def ort_target(tmp_path, monkeypatch):
    """The ONNX Runtime backend's real per-layer latency probe, its cache in a temporary folder."""
    from bitpass.backends.onnxruntime.backend import OnnxRuntimeBackend
    from bitpass.passes.infra import Target

    monkeypatch.setenv("BITPASS_CACHE_DIR", str(tmp_path / "cache"))
    return Target("onnxruntime", "cpu", {"latency_probe": OnnxRuntimeBackend().latency_probe("cpu")})


def test_a_latency_budget_is_met_by_removing_channels(prepared, ort_target):
    """Packed bits run at fp32 speed, so only removed channels buy latency: each layer is timed with each
    kept count (really pruned, one-node models), and the plan's summed layer time meets the budget."""
    model, ctx = prepared
    ctx.target = ort_target
    AllocateJoint(budget="latency=0.7x,size=0.2x", latency_batch=64).run(model, ctx)
    record = ctx.records["allocation"]
    timing = record["latency"]
    assert timing["batch"] == 64 and not timing["not_timed"]
    assert set(timing["seconds"]["3"]) == {"32", "24", "16", "8"}  # every kept count offered, measured
    assert record["totals"]["latency"] <= 0.7 * timing["fp32_seconds"] * (1 + 1e-9)
    assert record["totals"]["size"] <= 0.2 * 358_200
    plan = record["plan"].values()
    assert any(p["channels"].split(" -> ")[0] != p["channels"].split(" -> ")[1] for p in plan)
    assert any(p["bits"] < 32 for p in plan)  # the size budget is met with bits as well
    with pytest.raises(UsageError, match="cannot be met"):  # bits alone cannot buy time
        AllocateJoint(budget="latency=0.7x", mode="bits", latency_batch=64).run(model.clone(), ctx)


def test_a_latency_budget_needs_a_latency_probe(prepared):
    model, ctx = prepared
    with pytest.raises(UsageError, match="latency probe"):
        AllocateJoint(budget="latency=0.7x").run(model, ctx)


def test_local_moves_fill_what_the_bounded_ilp_left(prepared):
    """The ILP bounds each consumer's cost with all its inputs kept; the exact-cost local search then
    spends what that bound wasted, never leaving the budget and never raising the loss."""
    model, ctx = prepared
    joint = JointProblem.from_model(model, ctx.analyses.require("sensitivity"))
    limit = int(0.1 * model.weight_bytes())
    from bitpass.passes.allocation.budget import parse_budget

    budget = parse_budget(f"size={limit}")
    # the smallest option everywhere (fewest bits, then fewest channels): far below the budget
    start = {layer.id: min(c.bits for c in layer.candidates) for layer in joint.problem().layers}
    plan, moves = joint.improve(start, budget)
    assert moves > 0
    assert joint.exact(plan)["size"] <= limit
    assert joint.exact(plan)["loss"] < joint.exact(start)["loss"]


def test_the_final_choice_is_the_measured_closest_to_fp32(prepared):
    """With calibration data, joint is picked among {bits-only, sparsity-only, joint} by measured output error."""
    model, ctx = prepared
    limit = int(0.12 * model.weight_bytes())
    AllocateJoint(budget=f"size={limit}").run(model, ctx)
    measured = ctx.records["allocation"]["measured_choice"]
    assert [m["plan"] for m in measured][-1] == "joint" and all(m["size"] <= limit for m in measured)
    chosen = {lid: p["bits"] for lid, p in ctx.records["allocation"]["plan"].items()}
    best = min(measured, key=lambda m: m["output_mse"])
    assert all(best["output_mse"] <= m["output_mse"] for m in measured)
    assert chosen == {layer.id: annotation.weight_bits(layer.node) for layer in model.layers()}
