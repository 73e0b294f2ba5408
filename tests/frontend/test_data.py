"""Data files: validated against the model's inputs; pickles refused; a content hash for the manifest."""

from __future__ import annotations

import numpy as np
import pytest

from bitpass.frontend import DataError, TensorSpec, from_arrays, load_npz

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


# --- read before inflating -------------------------------------------------------------------------------

FLAT = [TensorSpec("x", ("n", 4), np.dtype("float32"))]


def _save(path, **arrays):
    with path.open("wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path


def test_the_byte_cap_is_checked_from_the_headers(tmp_path, monkeypatch):
    path = _save(tmp_path / "d.npz", x=np.zeros((4096, 4), np.float32))  # 64 KiB inflated
    monkeypatch.setenv("BITPASS_MAX_DATA_BYTES", "16K")
    with pytest.raises(DataError, match=r"inflates to 64.1 KiB, over the cap of 16.0 KiB \(BITPASS_MAX_DATA_BYTES\)"):
        load_npz(path, FLAT)
    monkeypatch.setenv("BITPASS_MAX_DATA_BYTES", "1M")
    assert len(load_npz(path, FLAT)) == 4096


def test_the_sample_cap_applies_to_calibration_and_evaluation_not_run_inputs(tmp_path, monkeypatch):
    path = _save(tmp_path / "d.npz", x=np.zeros((64, 4), np.float32))
    monkeypatch.setenv("BITPASS_MAX_SAMPLES", "10")
    for role in ("calibration", "evaluation"):
        with pytest.raises(DataError, match="64 samples, over the cap of 10.*BITPASS_MAX_SAMPLES"):
            load_npz(path, FLAT, role=role)
    assert len(load_npz(path, FLAT, role="input")) == 64


def test_a_header_that_disagrees_with_its_bytes_is_corrupt_not_pickled(tmp_path):
    import io
    import zipfile

    buffer = io.BytesIO()
    np.save(buffer, np.zeros((4, 4), np.float32))
    data = buffer.getvalue().replace(b"(4, 4)", b"(9, 4)")
    with zipfile.ZipFile(tmp_path / "d.npz", "w") as archive:
        archive.writestr("x.npy", data)
    with pytest.raises(DataError, match=r"declares shape \(9, 4\).*the file is corrupt") as err:
        load_npz(tmp_path / "d.npz", FLAT)
    assert "pickl" not in str(err.value)


def test_non_finite_values_are_named_with_their_count(tmp_path):
    x = np.zeros((8, 4), np.float32)
    x[1, 1] = x[2, 2] = np.nan
    x[3, 3] = np.inf
    path = _save(tmp_path / "d.npz", x=x)
    with pytest.raises(DataError, match="x holds 2 NaN and 1 infinite values \\(of 32\\)"):
        load_npz(path, FLAT, role="calibration")


def test_a_fixed_batch_is_kept_whatever_batch_size_is_asked():
    specs = [TensorSpec("x", (2, 4), np.dtype("float32"))]
    data = from_arrays({"x": np.zeros((6, 4), np.float32)}, specs)
    assert data.fixed_batch == 2
    assert [len(b["x"]) for b in data.batches(64)] == [2, 2, 2]
    assert len(data.head(5)) == 4
    with pytest.raises(DataError, match="fixed at 2: give a multiple of 2"):
        from_arrays({"x": np.zeros((5, 4), np.float32)}, specs)


def test_batch_of_gives_exactly_the_size_asked_repeating_samples_when_there_are_fewer():
    x = np.arange(3 * 64, dtype=np.float32).reshape(3, 1, 8, 8)
    data = from_arrays({"input": x}, SPECS)
    five = data.batch_of(5)["input"]
    assert five.shape == (5, 1, 8, 8) and five.flags.c_contiguous
    np.testing.assert_array_equal(five, x[[0, 1, 2, 0, 1]])
    np.testing.assert_array_equal(data.batch_of(2)["input"], x[:2])


def test_an_input_named_labels_is_an_input_and_labels_go_under_bitpass_labels():
    specs = [TensorSpec("labels", ("n", 4), np.dtype("float32"))]
    data = from_arrays({"labels": np.ones((3, 4)), "bitpass_labels": np.array([0, 1, 2])}, specs)
    assert data.inputs["labels"].shape == (3, 4)
    assert data.labels.tolist() == [0, 1, 2]


@pytest.mark.parametrize("labels, message", [
    (np.zeros((3, 2), np.int64), "one class index per sample"),
    (np.array([0.5, 1, 2]), "fractional"),
    (np.array([-1, 0, 1]), "negative"),
    (np.array(["a", "b", "c"]), "integer class indices"),
    (np.int64(3), "one entry per sample"),
])
def test_labels_must_be_class_indices(labels, message):
    with pytest.raises(DataError, match=message):
        from_arrays({"x": np.zeros((3, 4), np.float32), "labels": labels}, FLAT)


def test_one_hot_width_one_and_whole_float_labels_are_accepted():
    data = from_arrays({"x": np.zeros((3, 4), np.float32), "labels": np.array([[0.0], [2.0], [1.0]])}, FLAT)
    assert data.labels.tolist() == [0, 2, 1] and data.labels.dtype == np.int64
