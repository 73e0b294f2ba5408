"""The Python API as a user calls it: named parameters, typos answered with the nearest name, data given the
way a torch user has it (an array or a tuple, without knowing the exported input names)."""

from __future__ import annotations

import inspect

import pytest
import torch

from bitpass.frontend.errors import UsageError
from bitpass.tools import compile


def test_every_parameter_is_named_typed_and_documented():
    signature = inspect.signature(compile)
    documented = compile.__doc__ or ""
    for name, parameter in signature.parameters.items():
        if parameter.kind == parameter.VAR_KEYWORD:
            continue
        assert parameter.annotation is not inspect.Parameter.empty, name
        assert f"{name}:" in documented, f"compile's docstring does not explain {name!r}"


@pytest.mark.parametrize("typo, nearest", [("calib", "calibration"), ("evalution", "evaluation"),
                                           ("budgets", "budget"), ("pipline", "pipeline")])
def test_a_misspelt_parameter_names_the_nearest_one(tmp_path, typo, nearest):
    with pytest.raises(UsageError, match=f"unknown parameter '{typo}' \\(did you mean '{nearest}'\\?\\)"):
        compile("model.onnx", tmp_path / "out", **{typo: 1})
    assert not (tmp_path / "out").exists()


def test_a_torch_module_takes_arrays_without_knowing_its_input_names(trained_cnn, digits_split, tmp_path):
    """torch.onnx names a module's input after forward()'s argument; users pass arrays in forward() order."""
    artifact = compile(trained_cnn, tmp_path / "a", example_inputs=(torch.zeros(1, 1, 8, 8),), pipeline="optimize",
                       evaluation=digits_split.eval_x[:50], latency=False, progress=False)
    assert artifact.metrics["quality"]["samples"] == 50
    artifact = compile(trained_cnn, tmp_path / "b", example_inputs=(torch.zeros(1, 1, 8, 8),), pipeline="optimize",
                       evaluation=(digits_split.eval_x[:20],), latency=False, progress=False)
    assert artifact.metrics["quality"]["samples"] == 20


def test_the_wrong_number_of_arrays_is_a_clear_error(trained_cnn, digits_split, tmp_path):
    x = digits_split.eval_x[:5]
    with pytest.raises(UsageError, match="holds 2 arrays, but the model takes 1 inputs"):
        compile(trained_cnn, tmp_path / "c", example_inputs=(torch.zeros(1, 1, 8, 8),), pipeline="optimize",
                evaluation=(x, x), latency=False, progress=False)


def test_budget_parameter_switches_to_mixed_precision(digits_files, tmp_path):
    artifact = compile(digits_files / "model.onnx", tmp_path / "m", calibration=digits_files / "calib.npz",
                       budget="avg-bits=8", sensitivity="output-mse", latency=False, progress=False)
    assert artifact.manifest["pipeline_name"] == "mixed"
    assert "avg-bits=8" in artifact.manifest["pipeline"]


def test_a_compile_with_compute_formats_checks_it_is_not_slower_than_fp32_by_the_searchs_rule(digits_files, tmp_path,
                                                                                             imagined_cpu):
    """Allocation chose int8 compute from one-layer timings: the finished artifact is timed against fp32 by the
    format search's rule (fp32 must be faster with confidence), recorded, and kept: on this imagined CPU int8 is
    3x faster, so nothing is recompiled packed."""
    imagined_cpu()
    artifact = compile(digits_files / "model.onnx", tmp_path / "out", calibration=digits_files / "calib.npz",
                       evaluation=digits_files / "eval.npz", budget="avg-bits=6", progress=False)
    records = artifact.manifest["records"]
    assert any(f["format"] not in ("packed", "fp32") for f in records["allocation"]["formats"].values())
    check = records["speed_check"]
    assert check["slower"] is None and check["fp32_against_artifact"]["faster"] is False
    assert set(check["fp32_against_artifact"]["median"]) == {"1", "8"}
    assert not any("used packed" in note for note in records.get("notes", []))
