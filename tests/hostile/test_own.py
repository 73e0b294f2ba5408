"""Cases found while building the corpus: dependencies writing outside, names that break lines, odd paths."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hostile_kit import (
    add_weight_model,
    external_tensor,
    make_model,
    mlp,
    refused,
    samples,
    save_model,
    save_npz,
    succeeded,
    tensor_info,
    user_files,
)
from onnx import helper


@pytest.mark.parametrize("command", [["passes"], ["pipelines"], ["--version"]])
def test_starting_bitpass_writes_nothing_outside(box, command):
    """ONNX Runtime 1.32 writes a device id under ~/.cache/Microsoft and a .ses file in TMPDIR at import
    unless telemetry is off: the real console script, fresh, must leave HOME and TMPDIR as they were."""
    result = box.run(*command, fresh=True)
    succeeded(box, result)
    assert not list(box.home.rglob("*")), [str(p) for p in box.home.rglob("*")]


def test_a_compile_through_the_console_script_writes_nothing_outside(box):
    files = user_files(box)
    result = box.run("compile", files["model"], "-o", "out", "--calib", files["calib"], "--eval", files["eval"],
                     "-q", fresh=True)
    succeeded(box, result, creates=["out"])
    assert not [p for p in box.home.rglob("*") if ".cache/bitpass" not in str(p) and p.name != ".cache"]


@pytest.mark.parametrize("name", ["x\nTraceback (most recent call last):", "x\x1b[2J\x1b[31mred", "x" * 5000,
                                  "ü ñ 中文"], ids=["newline", "ansi", "long", "unicode"])
def test_hostile_input_names_keep_the_error_on_one_line(box, name):
    """The model's input name is echoed in the data error: escaped, shortened, one line."""
    model = make_model([helper.make_node("Relu", [name], ["y"])], [tensor_info(name, ["N", 4])],
                       [tensor_info("y", ["N", 4])])
    save_model(model, box.work / "model.onnx")
    save_npz(box.work / "calib.npz", x=np.zeros((4, 4), np.float32))
    result = box.run("compile", "model.onnx", "-o", "out", "--calib", "calib.npz", "-q")
    line = refused(box, result, "missing", status=(1, 2))
    assert "\x1b" not in line


def test_a_hostile_tensor_name_in_external_data_errors_stays_one_line(box):
    (box.work / "m").mkdir()
    tensor = external_tensor("w\nTraceback (most recent call last):\n" + "y" * 4000, [64], "missing.bin")
    model = add_weight_model(tensor)
    model.graph.node[0].input[1] = tensor.name
    save_model(model, box.work / "m" / "model.onnx")
    result = box.run("compile", "m/model.onnx", "-o", "out", "--pipeline", "optimize", "-q")
    refused(box, result, "missing", status=1)


@pytest.mark.parametrize("output", ["out put", "résultat", "out\nTraceback", "-dash"], ids=["space", "accent",
                                                                                              "newline", "dash"])
def test_odd_output_names_work_or_are_one_line(box, output):
    files = user_files(box)
    result = box.run("compile", files["model"], "-o", output if output != "-dash" else "./-dash",
                     "--pipeline", "optimize", "--no-latency", "-q")
    name = output if output != "-dash" else "-dash"
    succeeded(box, result, creates=[name])
    assert (box.work / name / "manifest.json").is_file()


@pytest.mark.parametrize("what", ["directory", "symlink-loop", "calib-as-model"])
def test_odd_model_paths_are_one_line(box, what):
    files = user_files(box)
    if what == "directory":
        (box.work / "model-dir").mkdir()
        target = "model-dir"
    elif what == "symlink-loop":
        os.symlink("loop-b", box.work / "loop-a")
        os.symlink("loop-a", box.work / "loop-b")
        target = "loop-a"
    else:
        target = files["calib"].name
    result = box.run("compile", target, "-o", "out", "-q")
    refused(box, result, status=(1, 2))


@pytest.mark.parametrize("what", ["model-as-data", "directory", "text"])
def test_odd_data_paths_are_one_line(box, what):
    files = user_files(box)
    if what == "model-as-data":
        data = files["model"].name
    elif what == "directory":
        (box.work / "data-dir").mkdir()
        data = "data-dir"
    else:
        (box.work / "data.npz").write_text("x,y\n1,2\n")
        data = "data.npz"
    result = box.run("compile", files["model"], "-o", "out", "--calib", data, "-q")
    refused(box, result, status=2)


def test_inspect_never_reads_external_data_outside(box):
    (box.work / "m").mkdir()
    save_model(add_weight_model(external_tensor("w", [64], "../../outside/secret.bin")), box.work / "m" / "model.onnx")
    result = box.run("inspect", "m/model.onnx")
    refused(box, result, "outside the model's folder", status=1)


def test_run_on_nan_inputs_runs(box):
    """``bitpass run`` feeds the user's batch as given (non-finite values are checked for calibration and
    evaluation sets only)."""
    files = user_files(box)
    result = box.run("compile", files["model"], "-o", "out", "--pipeline", "optimize", "--no-latency", "-q")
    succeeded(box, result, creates=["out"])
    batch = samples(4, labels=None)
    batch["x"][0, 0] = np.nan
    save_npz(box.work / "x.npz", **batch)
    run = box.run("run", "out", "--input", "x.npz", "-o", "y.npz")
    succeeded(box, run, creates=["y.npz"])


def test_a_model_without_inputs_is_a_clear_answer(box):
    save_model(make_model([helper.make_node("Constant", [], ["y"], value_float=1.0)], [], [tensor_info("y", [])]),
               box.work / "model.onnx")
    result = box.run("compile", "model.onnx", "-o", "out", "--pipeline", "optimize", "--no-latency", "-q")
    if result.status == 0:
        succeeded(box, result, creates=["out"])
    else:
        refused(box, result, status=(1, 2))


def test_calibration_with_a_model_without_inputs_is_one_line(box):
    save_model(make_model([helper.make_node("Constant", [], ["y"], value_float=1.0)], [], [tensor_info("y", [])]),
               box.work / "model.onnx")
    save_npz(box.work / "calib.npz", x=np.zeros((4, 4), np.float32))
    result = box.run("compile", "model.onnx", "-o", "out", "--calib", "calib.npz", "-q")
    refused(box, result, status=2)


def test_the_fixed_batch_of_a_model_is_kept_by_run(box):
    save_model(mlp(batch=2), box.work / "model.onnx")
    result = box.run("compile", "model.onnx", "-o", "out", "--pipeline", "optimize", "--no-latency", "-q")
    succeeded(box, result, creates=["out"])
    save_npz(box.work / "x.npz", **samples(6, labels=None))
    run = box.run("run", "out", "--input", "x.npz", "-o", "y.npz")
    succeeded(box, run, creates=["y.npz"])
    assert np.load(box.work / "y.npz")["y"].shape == (6, 4)
