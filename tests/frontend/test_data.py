"""Data files: validated against the model's inputs; pickles refused; a content hash for the manifest."""

from __future__ import annotations

import numpy as np
import pytest

from bitpass.frontend import DataError, TensorSpec, load_npz

SPECS = [TensorSpec("input", ("batch", 1, 8, 8), np.dtype("float32"))]


def test_valid_file_loads_with_labels_and_a_stable_hash(tmp_path):
    x = np.zeros((5, 1, 8, 8), np.float32)
    np.savez(tmp_path / "d.npz", input=x, labels=np.arange(5))
    first = load_npz(tmp_path / "d.npz", SPECS)
    second = load_npz(tmp_path / "d.npz", SPECS)
    assert len(first) == 5 and first.labels is not None
    assert first.sha256 == second.sha256
    assert [b["input"].shape[0] for b in first.batches(2)] == [2, 2, 1]


@pytest.mark.parametrize("arrays, message", [
    ({"image": np.zeros((2, 1, 8, 8), np.float32)}, "missing input.*unexpected image"),
    ({"input": np.zeros((2, 1, 7, 8), np.float32)}, "expects input"),
    ({"input": np.zeros((2, 8, 8), np.float32)}, "expects input"),
    ({"input": np.zeros((0, 1, 8, 8), np.float32)}, "empty"),
    ({"input": np.zeros((2, 1, 8, 8), np.float32), "labels": np.zeros(3)}, "one entry per sample"),
])
def test_mismatched_data_is_refused(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_npz(tmp_path / "d.npz", SPECS)


def test_object_arrays_are_refused_not_unpickled(tmp_path):
    np.savez(tmp_path / "d.npz", input=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="pickled"):
        load_npz(tmp_path / "d.npz", SPECS)


def test_not_an_npz(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable"):
        load_npz(tmp_path / "d.npz", SPECS)


def test_float64_is_cast_to_the_input_dtype(tmp_path):
    np.savez(tmp_path / "d.npz", input=np.ones((2, 1, 8, 8)))
    assert load_npz(tmp_path / "d.npz", SPECS).inputs["input"].dtype == np.float32
