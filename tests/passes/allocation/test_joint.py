"""The ``allocate-joint`` pass on the project's trained digits CNN: the plan it reports is the graph it leaves."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from bitpass.frontend import annotation, from_arrays
from bitpass.frontend.errors import UsageError
from bitpass.passes.allocation.joint import AllocateJoint, apply_plan
from bitpass.passes.allocation.joint_problem import JointProblem, decode
from bitpass.passes.infra import PassContext
from bitpass.passes.materialize import QuantizeOptions, materialize
from bitpass.passes.pipeline import Pipeline
from bitpass.passes.pruning.common import output_axis
from bitpass.passes.quantize import Quantize
from bitpass.plugins.registry import default_registry


@pytest.fixture
def prepared(cnn_model, calib_arrays, digits_split):
    """The CNN folded, fused, calibrated, with Fisher sensitivity (real gradients, labelled calibration)."""
    calib = from_arrays({**calib_arrays, "labels": digits_split.calib_y}, cnn_model.inputs)
    ctx = PassContext(calibration=calib)
    model = default_registry().pipeline(
        "fold-constants,eliminate-dead-nodes,fuse,calibrate(method=minmax),sensitivity(method=fisher)").run(
        cnn_model, ctx)
    return model, ctx


def _outputs(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.to_bytes(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _kept_channels(model) -> dict[str, int]:
    return {layer.id: layer.weight_shape[output_axis(layer)] for layer in model.layers()}


@pytest.mark.parametrize("fraction", [0.5, 0.12, 0.08])
def test_applying_any_candidate_plan_leaves_the_channels_bits_and_bytes_it_reports(prepared, fraction):
    """Whichever plan wins (it depends on measured errors, so on the CPU), applying it removes exactly the
    planned channels, annotates the planned widths, and quantizes to exactly the reported bytes."""
    model, ctx = prepared
    joint = JointProblem.from_model(model, ctx.analyses.require("sensitivity"))
    candidates = joint.candidates(f"size={int(fraction * model.weight_bytes())}")
    assert candidates[-1][0] == "joint"
    assert ("sparsity" in dict(candidates)) == (fraction >= 0.5)  # fp32 weights alone cannot get to 12 %
    for name, allocation in candidates:
        plan = {lid: decode(option) for lid, option in allocation.plan.items()}
        copy = model.clone()
        removed = apply_plan(copy, joint, plan)
        assert _kept_channels(copy) == {lid: kept for lid, (_, kept) in plan.items()}
        assert set(removed) == {lid for lid, (_, kept) in plan.items() if kept < joint.by_id[lid].channels}
        assert all(len(removed[lid]) == joint.by_id[lid].channels - plan[lid][1] for lid in removed)
        assert bool(removed) or name != "sparsity"  # sparsity-only plans meet a budget by removing channels
        for layer in copy.layers():
            bits = plan[layer.id][0]
            assert annotation.weight_bits(layer.node) == bits
            assert annotation.weight_format(layer.node) == (None if bits == 32 else "packed")
        quantized = materialize(copy, options=QuantizeOptions(preprocess=False))
        assert quantized.weight_bytes() == allocation.totals["size"] == joint.exact(allocation.plan)["size"]


def test_the_pass_and_quantize_give_an_artifact_of_the_reported_plan_and_bytes(prepared, digits_split):
    model, ctx = prepared
    fp32_accuracy = float((_outputs(model, digits_split.eval_x).argmax(1) == digits_split.eval_y).mean())
    limit = int(0.12 * model.weight_bytes())
    model = Pipeline([AllocateJoint(budget=f"size={limit}", sweep=True)]).run(model, ctx)
    record = ctx.records["allocation"]
    json.dumps(record)  # goes into the manifest as is
    assert record["totals"]["size"] <= limit
    assert {m: len(f) > 0 for m, f in record["frontiers"].items()} == {"joint": True, "bits": True, "sparsity": True}
    planned = {lid: int(p["channels"].split("->")[1]) for lid, p in record["plan"].items()}
    assert _kept_channels(model) == planned
    for layer in model.layers():
        assert annotation.weight_bits(layer.node) == record["plan"][layer.id]["bits"]
    assert ctx.analyses.require("bits") == {lid: p["bits"] for lid, p in record["plan"].items()}
    quantized = Pipeline([Quantize()]).run(model, ctx)
    assert quantized.weight_bytes() == record["totals"]["size"]  # the artifact's real bytes
    out = _outputs(quantized, digits_split.eval_x)
    accuracy = float((out.argmax(1) == digits_split.eval_y).mean())
    print(f"\njoint at {limit} B: {record['plan']}, accuracy {accuracy:.4f} (fp32 {fp32_accuracy:.4f})")
    assert accuracy >= fp32_accuracy - 0.03  # 12 % of the weight bytes, within 3 points of fp32 on held-out data


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
    # 0.9x, not less: what channel removal can buy is measured, and on a loaded machine it was once only 0.84x
    AllocateJoint(budget="latency=0.9x,size=0.2x", latency_batch=64).run(model, ctx)
    record = ctx.records["allocation"]
    timing = record["latency"]
    assert timing["batch"] == 64 and not timing["not_timed"]
    assert set(timing["seconds"]["3"]) == {"32", "24", "16", "8"}  # every kept count offered, measured
    assert record["totals"]["latency"] <= 0.9 * timing["fp32_seconds"] * (1 + 1e-9)
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


def test_the_final_choice_is_the_candidate_whose_outputs_are_measured_closest_to_fp32(prepared):
    """With calibration data, the pass picks among {bits-only, sparsity-only, joint} by output error on the
    calibration samples: recomputed here independently (ONNX Runtime on each candidate's packed model)."""
    model, ctx = prepared
    limit = int(0.12 * model.weight_bytes())
    joint = JointProblem.from_model(model, ctx.analyses.require("sensitivity"))
    x = ctx.calibration.head(AllocateJoint().config.samples).inputs["input"]
    reference = _outputs(model, x).astype(np.float64)
    errors = {}
    plans = {}
    for name, allocation in joint.candidates(f"size={limit}"):
        plans[name] = {lid: decode(option) for lid, option in allocation.plan.items()}
        copy = model.clone()
        apply_plan(copy, joint, plans[name])
        packed = materialize(copy, options=QuantizeOptions(preprocess=False))
        errors[name] = float(np.mean((_outputs(packed, x).astype(np.float64) - reference) ** 2))
    best = min(errors, key=lambda name: (errors[name], name != "joint"))  # a tie goes to the joint plan

    AllocateJoint(budget=f"size={limit}").run(model, ctx)
    record = ctx.records["allocation"]
    assert [m["plan"] for m in record["measured_choice"]] == list(errors)
    assert [m["output_mse"] for m in record["measured_choice"]] == pytest.approx(list(errors.values()), rel=1e-6)
    chosen = {lid: (p["bits"], int(p["channels"].split("->")[1])) for lid, p in record["plan"].items()}
    assert chosen == plans[best]
