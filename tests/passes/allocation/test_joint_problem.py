"""The joint problem of bits and kept channels (``joint_problem.py``) on the project's trained digits CNN."""

from __future__ import annotations

import pytest

from bitpass.frontend import from_arrays
from bitpass.frontend.errors import UsageError
from bitpass.passes.allocation.budget import parse_budget
from bitpass.passes.allocation.joint_problem import JointProblem, decode
from bitpass.passes.infra import PassContext
from bitpass.passes.pruning import channels
from bitpass.plugins.registry import default_registry


@pytest.fixture(scope="module")
def prepared(_cnn_proto, trained_cnn, digits_split):
    """The CNN folded, fused, with Fisher sensitivity (real gradients, labelled calibration); shared read-only."""
    from bitpass.frontend import from_proto

    model = from_proto(_cnn_proto, name="digits_cnn", kind="torch")
    model.torch_module = trained_cnn
    calib = from_arrays({"input": digits_split.calib_x, "labels": digits_split.calib_y}, model.inputs)
    ctx = PassContext(calibration=calib)
    model = default_registry().pipeline("fold-constants,eliminate-dead-nodes,fuse,sensitivity(method=fisher)").run(
        model, ctx)
    return model, JointProblem.from_model(model, ctx.analyses.require("sensitivity"))


def test_the_problem_offers_channels_only_where_they_can_be_removed_alone(prepared):
    _, joint = prepared
    layers = joint.by_id
    assert layers["13"].kept == [10] and "graph output" in layers["13"].why_not_pruned
    # the counts channels.count keeps at 1, 0.75, 0.5 and 0.25 with round_to=8: multiples of 8
    assert layers["3"].kept == [32 - channels.count(32, 1 - k, round_to=8) for k in (1, 0.75, 0.5, 0.25)] == \
        [32, 24, 16, 8]
    assert layers["7"].consumers == [("11", 1, 16)]  # through Flatten: 16 features per channel


@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.15, 0.08])
def test_joint_plans_meet_the_budget_and_beat_both_restrictions(prepared, fraction):
    model, joint = prepared
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


def test_local_moves_fill_what_the_bounded_ilp_left(prepared):
    """The ILP bounds each consumer's cost with all its inputs kept; the exact-cost local search then
    spends what that bound wasted, never leaving the budget and never raising the loss."""
    model, joint = prepared
    limit = int(0.1 * model.weight_bytes())
    budget = parse_budget(f"size={limit}")
    # the smallest option everywhere (fewest bits, then fewest channels): far below the budget
    start = {layer.id: min(c.bits for c in layer.candidates) for layer in joint.problem().layers}
    plan, moves = joint.improve(start, budget)
    assert moves > 0
    assert joint.exact(plan)["size"] <= limit
    assert joint.exact(plan)["loss"] < joint.exact(start)["loss"]
