"""Measuring an artifact against fp32: cosines at any output scale, labels that must fit the model."""

from __future__ import annotations

import numpy as np
import pytest

from bitpass.backends.measure import accuracy, cosines
from bitpass.frontend.errors import DataError


@pytest.mark.parametrize("scale", [1e-30, 1e-9, 1.0, 1e9])
def test_cosine_does_not_depend_on_the_outputs_scale(scale):
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((8, 50))
    candidate = reference + 0.01 * rng.standard_normal((8, 50))
    expected = cosines(reference, candidate)
    assert np.all(expected > 0.999)
    np.testing.assert_allclose(cosines(scale * reference, scale * candidate), expected, rtol=1e-12)


def test_cosine_of_zero_outputs():
    zero, other = np.zeros((1, 4)), np.ones((1, 4))
    assert cosines(zero, zero)[0] == 1.0 and cosines(zero, other)[0] == 0.0


def test_accuracy_takes_one_class_index_per_sample():
    logits = np.eye(3)[[0, 1, 2, 1]]
    assert accuracy([logits], np.array([0, 1, 2, 2])) == 0.75
    assert accuracy([logits], np.array([[0], [1], [2], [2]])) == 0.75
    assert accuracy([logits], np.array([0.0, 1.0, 2.0, 2.0])) == 0.75


@pytest.mark.parametrize("labels, message", [
    (np.zeros((4, 2), np.int64), "one class index per sample"),
    (np.array([0, 1, 3, 2]), "0..2"),
    (np.array([0, -1, 2, 2]), "0..2"),
    (np.array([0.5, 1, 2, 2]), "integer class indices"),
])
def test_labels_that_cannot_be_classes_are_a_clear_error_not_zero_accuracy(labels, message):
    with pytest.raises(DataError, match=message):
        accuracy([np.eye(3)[[0, 1, 2, 1]]], labels)


class _Sleeper:
    """A runner whose call takes ``seconds`` (a model too slow to time 15 rounds of within a compile)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls = seconds, 0

    def run(self, feeds):
        import time

        self.calls += 1
        if self.seconds:
            time.sleep(self.seconds)
        return []


def test_latency_rounds_stop_at_the_time_budget_once_enough_are_done():
    from bitpass.backends.measure import latency_samples

    slow = {"fp32": _Sleeper(0.12), "artifact": _Sleeper(0.12)}
    samples = latency_samples(slow, {}, rounds=15, budget_seconds=0.5, min_rounds=3)
    assert all(3 <= len(v) <= 4 for v in samples.values())
    assert slow["fp32"].calls <= 1 + 1 + 4  # one warm-up call for a slow model, one to size the rounds, the rounds
    fast = {"fp32": _Sleeper(0.0), "artifact": _Sleeper(0.0)}
    assert all(len(v) == 15 for v in latency_samples(fast, {}, rounds=15, budget_seconds=5.0).values())


class _PerSample(_Sleeper):
    """A runner whose call takes ``seconds`` per sample of its batch (as a model's time grows with the batch)."""

    def run(self, feeds):
        import time

        self.calls += 1
        self.batches = [*getattr(self, "batches", []), len(feeds["x"])]
        time.sleep(self.seconds * len(feeds["x"]))
        return []


def test_the_larger_batch_keeps_one_fp32_call_short():
    from bitpass.backends.measure import LARGE_BATCH_SECONDS, LARGE_BATCHES, large_batch

    assert large_batch(0.001) == 64  # a small model is timed at batch 64
    assert large_batch(0.005) == 16
    assert large_batch(0.015) == 8  # a sentence encoder or ResNet-18 at 224²: batch 64 would take a second a call
    assert large_batch(1.0) == LARGE_BATCHES[-1]  # never below the smallest larger batch
    assert all(large_batch(t) * t <= LARGE_BATCH_SECONDS for t in (0.001, 0.002, 0.004, 0.01))


def test_the_latency_table_times_batch_1_then_the_batch_its_fp32_time_allows():
    from bitpass.backends.measure import large_batch, latency_table
    from bitpass.frontend import Dataset

    data = Dataset({"x": np.zeros((4, 3), np.float32)}, None, "0", "test")
    reference, artifact = _PerSample(0.005), _PerSample(0.0025)
    table = latency_table(reference, artifact, data)
    chosen = large_batch(table["batch_1"]["fp32_ms"] / 1e3)
    assert list(table) == ["batch_1", f"batch_{chosen}"] and chosen < 64  # 64 x 5 ms: over 0.1 s a call
    assert "fp32 call" in table[f"batch_{chosen}"]["batch_chosen"]
    assert set(reference.batches) == {1, chosen}
    assert list(latency_table(reference, artifact, data, batches=(2,))) == ["batch_2"]  # asked for: as asked


def _ort_runner(features: int):
    """A real ONNX Runtime session of y = 2x, z = sum(x) per sample."""
    import onnx
    from onnx import TensorProto, helper

    from bitpass.backends.onnxruntime.runner import OrtRunner

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"]), helper.make_node("ReduceSum", ["x"], ["z"], axes=[1])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", features]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    return OrtRunner.from_bytes(model.SerializeToString())


def test_large_outputs_are_gathered_in_a_file_and_read_back_the_same(monkeypatch):
    """Past SPILL_BYTES an output is joined in an unnamed temporary file and memory-mapped back read-only: the same
    values as joining the batches in memory, and no process memory for a 0.8 GB logits tensor."""
    from bitpass.backends import measure
    from bitpass.frontend import Dataset

    x = np.random.default_rng(0).standard_normal((70, 300)).astype(np.float32)
    data = Dataset({"x": x}, None, "0", "test")
    runner = _ort_runner(300)
    in_memory = measure.predict(runner, data, batch_size=16)
    monkeypatch.setattr(measure, "SPILL_BYTES", 40_000)  # y (84 KB) spills, z (280 B) stays an ordinary array
    spilled = measure.predict(runner, data, batch_size=16)
    assert [a.shape for a in spilled] == [(70, 300), (70, 1)]
    np.testing.assert_array_equal(spilled[0], 2 * x)
    np.testing.assert_array_equal(spilled[1], in_memory[1])
    assert not spilled[0].flags.writeable and spilled[1].flags.writeable
    assert measure.predict(runner, data, batch_size=16, count=1)[0].shape == (70, 300)
    from bitpass.frontend.model import drop_mapped_pages

    drop_mapped_pages(spilled)  # the pages read go; the values stay readable from the file
    np.testing.assert_array_equal(spilled[0][-1], 2 * x[-1])
