"""The one ONNX Runtime session factory: options, sources, whole-dataset outputs and inner tensors."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.frontend import from_arrays, from_proto
from bitpass.frontend.errors import BitpassError
from bitpass.passes import execution


def two_layer() -> onnx.ModelProto:
    """x[N,4] -> MatMul(w1) -> h -> Relu -> r -> MatMul(w2) -> y[N,2]."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                              [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w1"),
                               numpy_helper.from_array(rng.standard_normal((3, 2)).astype(np.float32), "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


X = np.random.default_rng(1).standard_normal((10, 4)).astype(np.float32)


def reference(x: np.ndarray) -> dict[str, np.ndarray]:
    init = {t.name: numpy_helper.to_array(t) for t in two_layer().graph.initializer}
    h = x @ init["w1"]
    return {"h": h, "r": np.maximum(h, 0), "y": np.maximum(h, 0) @ init["w2"]}


def test_session_options_come_from_a_session_config():
    options = execution.session_options({"graph_optimization_level": "ORT_DISABLE_ALL"}, threads=1,
                                        for_timing=True)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert options.intra_op_num_threads == 1 and options.log_severity_level == 4
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    default = execution.session_options()
    assert default.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert default.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL and default.intra_op_num_threads == 0


def test_every_kind_of_source_gives_the_same_session(tmp_path):
    proto = two_layer()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    sources = [proto, proto.SerializeToString(), from_proto(proto, name="two"), path, str(path)]
    for source in sources:
        session = execution.create_session(source)
        np.testing.assert_allclose(session.run(None, {"x": X})[0], reference(X)["y"], rtol=1e-5, atol=1e-6)


def test_a_path_is_loaded_by_path_so_external_data_beside_it_is_found(tmp_path):
    proto = two_layer()
    onnx.save(proto, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    session = execution.create_session(tmp_path / "m.onnx")
    np.testing.assert_allclose(session.run(None, {"x": X})[0], reference(X)["y"], rtol=1e-5, atol=1e-6)


def test_a_model_onnx_runtime_rejects_is_one_line_naming_the_purpose():
    with pytest.raises(BitpassError) as err:
        execution.create_session(b"not a model", purpose="time the layer")
    assert str(err.value).startswith("ONNX Runtime cannot time the layer: ") and "\n" not in str(err.value)


def test_predict_runs_a_whole_dataset_in_batches():
    data = from_arrays({"x": X}, from_proto(two_layer(), name="two").inputs)
    got = execution.predict(two_layer(), data, batch_size=3)  # 3 + 3 + 3 + 1 samples
    np.testing.assert_allclose(got, reference(X)["y"], rtol=1e-5, atol=1e-6)


def test_intermediates_exposes_inner_tensors_and_serves_inputs_from_the_batch():
    data = from_arrays({"x": X}, from_proto(two_layer(), name="two").inputs)
    batches = list(execution.intermediates(two_layer(), data, ["h", "r", "x"], batch_size=4))
    assert [len(b["x"]) for b in batches] == [4, 4, 2]
    want = reference(X)
    for name in ("h", "r"):
        np.testing.assert_allclose(np.concatenate([b[name] for b in batches]), want[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), X)
    model = from_proto(two_layer(), name="two")
    exposed = execution.expose_model(model, ["h", "y"])
    assert [o.name for o in exposed.graph.outputs] == ["y", "h"]  # an existing output is not repeated
    assert [o.name for o in model.graph.outputs] == ["y"]  # the model given is not changed


def test_models_past_the_protobuf_limit_are_loaded_by_path_from_a_temporary_folder(tmp_path, monkeypatch):
    """Past 2 GiB (lowered to 16 bytes here) a Model, a ModelProto and a Model's inner tensors all run: saved with
    external data into a temporary folder that is gone once the session is made; the results are the same."""
    import tempfile

    from bitpass.frontend import model as model_module

    monkeypatch.setattr(model_module, "SINGLE_PROTO_MAX_WEIGHT_BYTES", 16)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = from_proto(two_layer(), name="two")
    assert not model.fits_one_proto()
    for source in (model, two_layer()):
        session = execution.create_session(source)
        np.testing.assert_allclose(session.run(None, {"x": X})[0], reference(X)["y"], rtol=1e-5, atol=1e-6)
    data = from_arrays({"x": X}, model.inputs)
    batches = list(execution.intermediates(model, data, ["h", "w1", "x"], batch_size=4))
    np.testing.assert_allclose(np.concatenate([b["h"] for b in batches]), reference(X)["h"], rtol=1e-5, atol=1e-6)
    assert [o.name for o in model.graph.outputs] == ["y"]  # the model given is not changed
    assert list(tmp_path.iterdir()) == []


def test_quiet_keeps_prints_and_warnings_off_the_console(capsys, caplog):
    with execution.quiet():
        print("advice nobody asked for")
        logging.getLogger("onnxruntime.quantization").warning("please pre-process")
    assert capsys.readouterr().out == "" and "pre-process" not in caplog.text
    logging.getLogger("bitpass.test").warning("after")
    assert "after" in caplog.text
