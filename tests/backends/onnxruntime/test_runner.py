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
    assert [o.tolist() for o in runner.run({"x": x}, ["y"])] == [o.tolist() for o in runner.run({"x": x})]
    assert runner.run({"x": x}, []) == []  # only the outputs asked for (none here, and nothing run for them)


def test_missing_inputs_and_unloadable_models_are_one_line_errors():
    runner = OrtRunner.from_bytes(_model().SerializeToString())
    with pytest.raises(BitpassError, match="missing input 'x'; the model takes x"):
        runner.run({"input": np.ones((1, 4), np.float32)})
    with pytest.raises(BitpassError, match="^ONNX Runtime cannot load the model: "):
        OrtRunner.from_bytes(b"\x08\x01garbage")


def _values_cleared(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with every tensor's values removed (what ``model_skeleton`` leaves out)."""
    from onnx import external_data_helper

    for tensor in external_data_helper._get_all_tensors(proto):
        for name in ("float_data", "int32_data", "string_data", "int64_data", "raw_data", "double_data",
                     "uint64_data"):
            tensor.ClearField(name)
    return proto


def test_the_skeleton_is_the_model_without_its_values_and_reads_none_of_them(tmp_path):
    """``model_skeleton`` (the confinement check's view) parses to the model minus its tensors' values, wherever a
    tensor sits (an initializer inline or external, a Constant in a subgraph); the check needs no weights read
    (``onnx.load`` of a 1.6 GB single-file model peaked at 3.1 GB)."""
    from bitpass.backends.onnxruntime.runner import confined_model_path, model_skeleton

    big = numpy_helper.from_array(np.arange(40_000, dtype=np.float32), "big")
    branch = helper.make_graph([helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        np.full(3, 7, np.int64), "c"))], "then", [], [helper.make_tensor_value_info("c", TensorProto.INT64, [3])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["c"], then_branch=branch, else_branch=branch),
         helper.make_node("Identity", ["big"], ["y"])], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("c", TensorProto.INT64, [3]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [40_000])],
        [big, numpy_helper.from_array(np.ones(5, np.float32), "small")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    inline, external = tmp_path / "inline", tmp_path / "external"
    inline.mkdir(), external.mkdir()
    onnx.save(proto, inline / "model.onnx")
    onnx.save(proto, external / "model.onnx", save_as_external_data=True, location="w.bin", size_threshold=1024)
    for folder in (inline, external):
        skeleton = model_skeleton(folder / "model.onnx")
        expected = _values_cleared(onnx.load(folder / "model.onnx", load_external_data=False))
        assert skeleton.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
        assert confined_model_path(folder) == folder / "model.onnx"
    assert not skeleton.graph.initializer[0].raw_data and skeleton.graph.initializer[0].external_data
    (tmp_path / "outside.bin").write_bytes((external / "w.bin").read_bytes())
    moved = onnx.load(external / "model.onnx", load_external_data=False)
    moved.graph.initializer[0].external_data[0].value = "../outside.bin"
    onnx.save(moved, external / "model.onnx")
    with pytest.raises(BitpassError, match="points outside the model's folder"):
        confined_model_path(external)
    (inline / "model.onnx").write_bytes((inline / "model.onnx").read_bytes()[:-100])  # truncated
    with pytest.raises(BitpassError, match="not a readable ONNX file"):
        confined_model_path(inline)
