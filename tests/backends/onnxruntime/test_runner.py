"""``OrtRunner``: sessions built by the one factory (``bitpass.passes.execution``), fed by input name."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.backends.onnxruntime.runner import OrtRunner
from bitpass.frontend.errors import BitpassError


def _model() -> onnx.ModelProto:
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_a_runner_from_a_path_reads_external_data_beside_the_model(tmp_path):
    onnx.save(_model(), tmp_path / "model.onnx", save_as_external_data=True, location="model.data",
              size_threshold=0)
    runner = OrtRunner.from_path(tmp_path / "model.onnx", threads=1)
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(runner.run({"x": x})[0], x @ np.arange(12, dtype=np.float32).reshape(4, 3))
    assert runner.input_names == ["x"] and runner.output_names == ["y"]


def test_missing_inputs_and_unloadable_models_are_one_line_errors():
    runner = OrtRunner.from_bytes(_model().SerializeToString())
    with pytest.raises(BitpassError, match="missing input 'x'; the model takes x"):
        runner.run({"input": np.ones((1, 4), np.float32)})
    with pytest.raises(BitpassError, match="^ONNX Runtime cannot load the model: "):
        OrtRunner.from_bytes(b"\x08\x01garbage")
