"""The channel-pruning core (``channels.py``): count, trace, group, plan and apply, each usable alone."""

from __future__ import annotations

import numpy as np
import pytest

from bitpass.passes.infra import PassContext
from bitpass.passes.pipeline import Pipeline
from bitpass.passes.pruning import channels
from bitpass.passes.pruning.common import output_axis
from bitpass.plugins.registry import default_registry


@pytest.fixture
def folded(cnn_model, calib):
    """The CNN with BatchNorm folded: conv 0 (16) -> conv 3 (32) -> pool -> conv 7 (64) -> flatten -> 11 -> 13."""
    return Pipeline(default_registry().pipeline("fold-constants,fuse").passes).run(cnn_model,
                                                                                    PassContext(calibration=calib))


@pytest.mark.parametrize("channels_, ratio, round_to, min_channels, removed", [
    (32, 0.3, 8, 1, 8),     # keep 22 -> rounded to 24
    (32, 0.3, 1, 1, 10),    # keep round(0.7 * 32) = 22
    (20, 0.3, 8, 1, 6),     # 20 is not a multiple of 8: no rounding
    (8, 0.9, 8, 3, 5),      # at least min_channels stay
    (64, 0.0, 8, 1, 0),
    (16, 0.5, 16, 1, 8),    # no more channels than round_to: no rounding
])
def test_count_removes_the_ratio_with_kept_channels_on_round_to_multiples(channels_, ratio, round_to, min_channels,
                                                                          removed):
    assert channels.count(channels_, ratio, round_to=round_to, min_channels=min_channels) == removed


def test_trace_follows_channels_to_the_consumers_and_refuses_with_reasons(folded):
    regions, refused = channels.trace(folded.layers())
    assert set(regions) == {"0", "3", "7", "11"}
    assert "graph output" in refused["13"]
    consumers = {node.name for node, index, _, _ in regions["7"].slices if index == 1} - {folded.layer("7").node.name}
    assert consumers == {folded.layer("11").node.name}  # through Flatten, in blocks of 4x4 features
    assert [point.blk for node, index, _, point in regions["7"].slices if node is folded.layer("11").node] == [16]
    assert sorted(channels.group(regions, refused)) == [["0"], ["11"], ["3"], ["7"]]  # no residual ties


def test_prune_layer_removes_the_lowest_l1_channels_exactly(folded, evaluation, outputs):
    dense = folded.clone()
    weight = folded.layer("3").weight_array
    lowest = sorted(np.argsort(np.abs(weight).sum(axis=(1, 2, 3)), kind="stable")[:8].tolist())
    removed = channels.prune_layer(folded, "3", 24)
    assert removed == lowest
    assert folded.layer("3").weight_shape[output_axis(folded.layer("3"))] == 24
    assert folded.layer("7").weight_shape[1] == 24  # the consumer lost the same input channels
    # removing them computes what zeroing them computes (ReLU(0) = 0 feeds the next conv)
    from bitpass.passes.pruning.common import set_constant

    zeroed = dense.clone()
    layer = zeroed.layer("3")
    w, b = layer.weight_array.copy(), layer.node.inputs[2].const_value.numpy().copy()
    w[lowest], b[lowest] = 0, 0
    set_constant(layer.weight, w)
    set_constant(layer.node.inputs[2], b)
    np.testing.assert_allclose(outputs(folded, evaluation), outputs(zeroed, evaluation), rtol=1e-4, atol=1e-4)
    assert channels.prune_layer(folded, "13", 5) is None  # its channels are the graph output: cannot


def test_plan_gives_every_member_of_a_group_the_same_channels_and_apply_reports_what_it_did(folded):
    folded.torch_module = object()  # stands for the torch module the model came from
    regions, refused = channels.trace([folded.layer("7"), folded.layer("11")])
    groups = channels.group(regions, refused)
    notes: dict = {}
    removed = channels.plan(folded, regions, groups, lambda c: c // 4, "bn", notes=notes)
    assert {lid: len(r) for lid, r in removed.items()} == {"7": 16, "11": 16}
    assert sorted(notes["bn_fallback_l2"]) == ["11", "7"]  # no BatchNorm left after folding: l2 instead
    report = channels.apply(folded, regions, removed)
    assert folded.torch_module is None and "detached" in report["torch_module"]
    assert folded.layer("7").weight_shape[0] == 48 and folded.layer("11").weight_shape == (48, 768)
