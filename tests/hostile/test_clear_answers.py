"""Inputs that deserve a clear answer: careless, not malicious. Either it works, or one line says what to fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hostile_kit import (
    make_model,
    mlp,
    refused,
    samples,
    save_model,
    save_npz,
    succeeded,
    tensor_info,
    user_files,
    weights,
)
from onnx import helper


def _compile_with(box, *, calib=None, evaluation=None, model=None, extra=()):
    files = user_files(box, calib=calib is None, evaluation=evaluation is None)
    if model is not None:
        save_model(model, box.work / "model.onnx")
    if calib is not None:
        save_npz(box.work / "calib.npz", **calib)
    if evaluation is not None:
        save_npz(box.work / "eval.npz", **evaluation)
    return box.run("compile", files["model"], "-o", "out", "--calib", "calib.npz", "--eval", "eval.npz",
                   "--no-latency", "-q", *extra)


@pytest.mark.parametrize("role", ["calib", "eval"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_data_is_named_with_its_count(box, role, bad):
    data = samples(32, seed=3, labels=None if role == "calib" else 4)
    data["x"][[1, 5, 9], 2] = bad
    result = _compile_with(box, **{"calib" if role == "calib" else "evaluation": data})
    kind = "NaN" if np.isnan(bad) else "infinite"
    refused(box, result, rf"\bx\b.*3 {kind}", status=2)


def test_a_model_fixed_at_batch_one_is_fed_one_sample_at_a_time(box):
    """64 calibration and 24 evaluation samples for a model whose batch is fixed at 1 (latency included)."""
    files = user_files(box)
    save_model(mlp(batch=1), box.work / "model.onnx")
    save_npz(box.work / "calib.npz", **samples(64, seed=1, labels=None))
    result = box.run("compile", files["model"], "-o", "out", "--calib", "calib.npz", "--eval", files["eval"], "-q")
    succeeded(box, result, creates=["out"])
    manifest = json.loads((box.work / "out" / "manifest.json").read_text())
    assert manifest["metrics"]["quality"]["samples"] == 24


def test_a_model_fixed_at_batch_one_compiles_without_latency(box):
    save_model(mlp(batch=1), box.work / "model.onnx")
    result = _compile_with(box, model=mlp(batch=1), calib=samples(64, seed=1, labels=None))
    succeeded(box, result, creates=["out"])


def test_a_fixed_batch_that_does_not_divide_the_samples_is_named(box):
    result = _compile_with(box, model=mlp(batch=8), calib=samples(20, seed=1, labels=None))
    refused(box, result, "fixed at 8.*multiple of 8", status=2)


def test_a_model_input_named_labels_is_an_input(box):
    """The array 'labels' feeds the input of that name; class labels then go under 'bitpass_labels'."""
    model = make_model([helper.make_node("MatMul", ["labels", "w"], ["y"])], [tensor_info("labels", ["N", 8])],
                       [tensor_info("y", ["N", 4])], [weights([8, 4], "w", 21)])
    rng = np.random.default_rng(5)
    calib = {"labels": rng.standard_normal((32, 8)).astype(np.float32)}
    evaluation = {"labels": rng.standard_normal((16, 8)).astype(np.float32), "bitpass_labels": rng.integers(0, 4, 16)}
    result = _compile_with(box, model=model, calib=calib, evaluation=evaluation)
    succeeded(box, result, creates=["out"])
    manifest = json.loads((box.work / "out" / "manifest.json").read_text())
    assert "accuracy" in manifest["metrics"]["quality"]


def test_a_corrupt_npy_header_is_not_blamed_on_pickling(box):
    from hostile_kit import npy_bytes, npz_with_members

    files = user_files(box, calib=False)
    good = npy_bytes(samples(8, labels=None)["x"])
    npz_with_members(box.work / "calib.npz", {"x.npy": good[:20] + b"!!" + good[22:]})
    result = box.run("compile", files["model"], "-o", "out", "--calib", "calib.npz", "-q")
    line = refused(box, result, "corrupt", status=2)
    assert "pickl" not in line.lower()


DATA_MISTAKES = {
    "missing-input": ({"pixels": np.zeros((4, 8), np.float32)}, "missing x"),
    "extra-array": ({**samples(4, labels=None), "notes": np.zeros(4)}, "unexpected notes"),
    "strings": ({"x": np.array([["a"] * 8] * 4)}, "x is <U1"),
    "complex": ({"x": np.zeros((4, 8), np.complex64)}, "complex64"),
    "wrong-width": ({"x": np.zeros((4, 7), np.float32)}, r"shape \(4, 7\)"),
    "wrong-rank": ({"x": np.zeros((4, 8, 1), np.float32)}, r"shape \(4, 8, 1\)"),
    "no-samples": ({"x": np.zeros((0, 8), np.float32)}, "empty"),
    "scalar": ({"x": np.float32(1.0)}, "empty"),
    "labels-only": ({"labels": np.zeros(4, np.int64)}, "missing x"),
    "labels-twice": ({**samples(4), "bitpass_labels": np.zeros(4, np.int64)}, "both"),
    "labels-count": ({**samples(4, labels=None), "labels": np.zeros(3, np.int64)}, "one entry per sample"),
    "labels-negative": ({**samples(4, labels=None), "labels": -np.ones(4, np.int64)}, "negative"),
    "labels-onehot": ({**samples(4, labels=None), "labels": np.eye(4, dtype=np.int64)}, "one class index"),
    "odd-name": ({"x\nTraceback (most recent call last)": np.zeros((4, 8), np.float32)}, "unexpected"),
}


@pytest.mark.parametrize("case", sorted(DATA_MISTAKES))
def test_data_that_does_not_fit_names_what_to_fix(box, case):
    arrays, match = DATA_MISTAKES[case]
    result = _compile_with(box, evaluation=arrays)
    refused(box, result, match, status=2)


def test_good_data_in_unusual_layouts_is_accepted(box):
    """float64, big-endian and Fortran-ordered arrays, integer-valued float labels: all fine."""
    x = samples(24, seed=2, labels=None)["x"]
    evaluation = {"x": np.asfortranarray(x.astype(">f8")), "labels": np.arange(24) % 4 * 1.0}
    result = _compile_with(box, evaluation=evaluation)
    succeeded(box, result, creates=["out"])


@pytest.mark.parametrize("argv, match", [
    (["--pipeline", "fold-constants,calibrate,quantize"], "--calib"),
    (["--pipeline", "fold-constnats"], "did you mean 'fold-constants'"),
    (["--pipeline", "optimize,quantize"], "named pipeline"),
    (["--pipeline", "calibrate(method=entropyy)"], "method"),
    (["--pipeline", "calibrate(methd=entropy)"], "unknown option 'methd'"),
    (["--backend", "onnxruntme"], "did you mean 'onnxruntime'"),
    (["--target", "tpu"], "tpu"),
    (["--budget", "avg-bits=four"], "avg-bits"),
], ids=["needs-calib", "typo-pass", "pipeline-as-pass", "bad-option-value", "typo-option", "typo-backend",
        "unknown-target", "bad-budget"])
def test_request_mistakes_name_what_to_fix(box, argv, match):
    files = user_files(box)
    result = box.run("compile", files["model"], "-o", "out", "--no-latency", "-q", *argv)
    refused(box, result, match, status=2)
