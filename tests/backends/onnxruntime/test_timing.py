"""The fresh-process timer: alternating rounds, seconds per call per round, as a mean or a median of the calls."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.backends.onnxruntime.timing import Group, time_groups


def _matmul(n: int) -> bytes:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_rounds_can_count_the_median_call_so_a_preempted_call_does_not_move_them():
    """A 16x16 MatMul takes microseconds: each of the 5 rounds reports one call's seconds, not a round's."""
    feeds = {1: {"x": np.ones((1, 16), np.float32)}}
    by_median, by_mean = Group({"a": _matmul(16), "b": _matmul(16)}, feeds), Group({"a": _matmul(16)}, feeds)
    time_groups([by_median], rounds=5, min_seconds=0.005, per_round="median", fresh_process=False)
    time_groups([by_mean], rounds=5, min_seconds=0.005, fresh_process=False)
    for group in (by_median, by_mean):
        rounds = group.samples["a"][1]
        assert len(rounds) == 5 and all(0 < s < 0.005 for s in rounds)
    assert 0.2 < by_median.ratio("b", "a", 1) < 5  # the same model against itself


def test_a_statistic_other_than_mean_or_median_is_refused():
    with pytest.raises(ValueError, match="per_round"):
        time_groups([], per_round="min")
