"""Bad input: one line naming the cause, exit 2 (usage) or 1 (failure), and no output directory left behind."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bitpass.tools.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_clean_failure(code: int, err: str, out: Path, expected_code: int, pattern: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("bitpass: error:")]
    assert code == expected_code, err
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a partial artifact was left behind"


def test_missing_model(capsys, tmp_path):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", str(tmp_path / "missing.onnx"), "-o", str(out))
    assert_clean_failure(code, err, out, 1, "no such model file")


def test_truncated_model(capsys, tmp_path, digits_files):
    data = (digits_files / "model.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", str(tmp_path / "cut.onnx"), "-o", str(out), "--calib",
                        str(digits_files / "calib.npz"))
    assert_clean_failure(code, err, out, 1, "cut.onnx")


def test_not_onnx(capsys, tmp_path):
    (tmp_path / "notes.onnx").write_text("hello, I am a text file\n")
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", str(tmp_path / "notes.onnx"), "-o", str(out))
    assert_clean_failure(code, err, out, 1, "not an ONNX file|not a valid ONNX")


def test_pickle_given_as_model_is_never_unpickled(capsys, tmp_path):
    marker = tmp_path / "was_unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "model.onnx").write_bytes(pickle.dumps(Payload()))
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", str(tmp_path / "model.onnx"), "-o", str(out))
    assert_clean_failure(code, err, out, 1, "PyTorch checkpoint")
    assert not marker.exists()


def test_external_data_outside_the_folder(capsys, tmp_path):
    (tmp_path / "secret").write_bytes(b"\0" * 16)
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], vals=[0.0] * 4)
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=str(tmp_path / "secret"))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model_dir / "model.onnx")
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", str(model_dir / "model.onnx"), "-o", str(out), "--pipeline", "optimize")
    assert_clean_failure(code, err, out, 1, "outside the model's folder")


def test_unsupported_operator_is_named_with_its_node(capsys, tmp_path):
    graph = helper.make_graph([helper.make_node("FancyOp", ["x"], ["y"], name="mystery_node", domain="com.example")],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    onnx.save(model, tmp_path / "custom.onnx")
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", str(tmp_path / "custom.onnx"), "-o", str(out), "--pipeline", "optimize")
    assert_clean_failure(code, err, out, 1, r"com\.example\.FancyOp.*mystery_node")


@pytest.mark.parametrize("arrays, pattern", [
    ({"pixels": np.zeros((4, 1, 8, 8), np.float32)}, "missing input.*unexpected pixels"),
    ({"input": np.zeros((4, 1, 9, 9), np.float32)}, "shape"),
    ({"input": np.zeros((0, 1, 8, 8), np.float32)}, "empty"),
])
def test_calibration_data_that_does_not_fit(capsys, tmp_path, digits_files, arrays, pattern):
    np.savez(tmp_path / "calib.npz", **arrays)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", str(digits_files / "model.onnx"), "-o", str(out),
                        "--calib", str(tmp_path / "calib.npz"))
    assert_clean_failure(code, err, out, 2, pattern)


def test_default_pipeline_without_calibration_says_what_to_add(capsys, tmp_path, digits_files):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", str(digits_files / "model.onnx"), "-o", str(out))
    assert_clean_failure(code, err, out, 2, r"calibrate.*--calib")


@pytest.mark.parametrize("spec, pattern", [
    ("fold-constants,fuse,quantise", "unknown pass 'quantise'; did you mean 'quantize'"),
    ("calibrate(method=median),quantize", "calibrate"),
    ("calibrate(colour=blue),quantize", "unknown option 'colour'"),
    ("fold-constants,,fuse", "empty item"),
    ("fold-constants(", "unbalanced"),
])
def test_bad_pipeline_specs(capsys, tmp_path, digits_files, spec, pattern):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", str(digits_files / "model.onnx"), "-o", str(out),
                        "--calib", str(digits_files / "calib.npz"), "--pipeline", spec)
    assert_clean_failure(code, err, out, 2, pattern)


def test_plugin_that_fails_to_import(capsys, tmp_path, digits_files):
    plugin = tmp_path / "broken_plugin.py"
    plugin.write_text("import not_a_real_module_anywhere\n")
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", str(digits_files / "model.onnx"), "-o", str(out),
                        "--plugin", str(plugin), "--pipeline", "fold-constants,broken-plugin")
    assert_clean_failure(code, err, out, 1, "broken_plugin.py' failed to import")
    assert "not_a_real_module_anywhere" in err


def test_plugin_pass_that_raises_inside_run_is_named(capsys, tmp_path, digits_files):
    plugin = tmp_path / "explosive.py"
    plugin.write_text(
        "from bitpass.passes.infra import Pass\n"
        "class Explode(Pass):\n"
        "    '''Always fails.'''\n"
        "    name = 'explode'\n"
        "    def run(self, model, ctx):\n"
        "        raise RuntimeError('kaboom from the plugin')\n")
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", str(digits_files / "model.onnx"), "-o", str(out),
                        "--plugin", str(plugin), "--pipeline", "fold-constants,explode")
    assert_clean_failure(code, err, out, 1, r"pass 'explode' failed: kaboom from the plugin.*fold-constants")


def test_existing_output_is_not_overwritten_without_force(capsys, tmp_path, digits_files):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_cli(capsys, "compile", str(digits_files / "model.onnx"), "-o", str(out), "--pipeline", "optimize")
    assert code == 2 and "already exists" in err
    assert (out / "keep.txt").read_text() == "precious"


def test_console_script_exit_status(tmp_path):
    script = Path(sys.executable).with_name("bitpass")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "bitpass.tools"]
    result = subprocess.run([*command, "compile", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("bitpass: error:")]
    assert len(errors) == 1 and "no such model file" in errors[0]
    assert result.stderr.strip().splitlines()[-1] == errors[0]


def test_an_unknown_executor_says_what_to_write(capsys, tmp_path, digits_files):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", str(digits_files / "model.onnx"), "-o", str(out), "--calib",
                        str(digits_files / "calib.npz"), "--executor", "threads:4")
    assert_clean_failure(code, err, out, 2, "local:N|serial, local")
