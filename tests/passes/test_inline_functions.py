"""``inline-functions``: function operators ONNX Runtime would expand (HardSwish in torchvision's MobileNetV3)
are expanded before calibration, so the graph bitpass calibrates is the graph ORT quantizes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bitpass.frontend import from_onnx, from_proto
from bitpass.passes import execution
from bitpass.passes.inline_functions import inline_functions, runtime_has_kernel


@pytest.fixture(scope="module")
def mobilenet(family_export):
    return family_export("mobilenet_v3_small")


def test_the_runtime_is_asked_which_function_operators_it_runs_itself():
    assert not runtime_has_kernel("", "HardSwish", 14)  # ORT expands it
    assert runtime_has_kernel("", "HardSigmoid", 6)
    assert runtime_has_kernel("", "LayerNormalization", 17)


def test_hardswish_is_expanded_with_names_of_its_call_site_and_the_same_outputs(mobilenet):
    path, built = mobilenet
    model = from_onnx(path)
    calls = [n.name for n in model.graph if n.op_type == "HardSwish"]
    assert calls
    x = {"input": built.evaluation["input"][:4]}
    before = execution.create_session(model).run(None, x)[0]
    done = inline_functions(model)
    assert done["operators"] == {"HardSwish": len(calls)}
    assert not [n for n in model.graph if n.op_type == "HardSwish"]
    assert "bitpass.expand" not in model.ir.opset_imports and not model.ir.functions
    names = {n.name for n in model.graph}
    assert all(f"{call}/HardSigmoid" in names and f"{call}/Mul" in names for call in calls)
    np.testing.assert_array_equal(execution.create_session(model).run(None, x)[0], before)
    assert inline_functions(model) == {}  # nothing left: a second run changes nothing


def test_model_local_functions_are_inlined_too():
    body = helper.make_function("custom", "Scale2", ["x"], ["y"],
                                [helper.make_node("Add", ["x", "x"], ["y"])], [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("Scale2", ["a"], ["b"], domain="custom", name="call")], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
    proto = helper.make_model(graph, functions=[body],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])
    model = from_proto(proto)
    assert inline_functions(model)["local_functions"] == {"custom::Scale2": 1}
    assert [n.op_type for n in model.graph] == ["Add"]
    onnx.checker.check_model(model.to_proto())


def test_default_int8_on_mobilenet_v3_calibrates_the_expanded_hardswish(mobilenet, tmp_path):
    from bitpass.tools import compile

    path, _ = mobilenet
    # random-init logits are near ties, so top-1 agreement is noise there: the gate compares by cosine
    artifact = compile(str(path), tmp_path / "out", calibration=path.parent / "calib.npz",
                       evaluation=path.parent / "eval.npz", latency=False, tolerance="cosine=0.99")
    records = artifact.manifest["records"]
    assert records["inline_functions"]["operators"]["HardSwish"] > 0
    assert "uncalibrated" not in records["quantization"]["int8_scope"]["kept_float"]
    assert artifact.metrics["quality"]["fidelity"]["cosine"] > 0.99
