"""The latency probe: every timed layer gets fp32 and compute-format figures at its real input shapes,
measured once (in a fresh process) and cached under a key that does not depend on tensor names."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bitpass.backends.onnxruntime.latency import FP32, LatencyProbe, layer_inputs, measure
from bitpass.frontend import from_arrays, from_proto
from bitpass.passes.allocation.formats import variants_to_measure


def test_probe_times_every_layer_and_caches_the_figures(cnn_model, calib_arrays, tmp_path):
    widths = {layer.id: (32, 8, 4) for layer in cnn_model.layers()}
    wanted = variants_to_measure(cnn_model.layers(), widths)
    cache = tmp_path / "latency.json"
    calibration = from_arrays(calib_arrays, cnn_model.inputs)
    first = measure(cnn_model, wanted, batches=(1, 4), cache=cache, calibration=calibration)
    assert set(first) == {layer.id for layer in cnn_model.layers()} and not first.failures
    for layer_id, row in first.items():
        assert FP32 in row and all(row[FP32][b] > 0 for b in (1, 4))
        assert set(row) == {FP32, *wanted[layer_id]}, layer_id  # every compute variant could be built and run
    stored = json.loads(cache.read_text())
    assert len(stored) == sum(len(row) for row in first.values()) * 2
    again = measure(cnn_model, wanted, batches=(1, 4), cache=cache, calibration=calibration)
    assert again == first  # from the cache, not re-measured


def test_both_int8_flavours_dynamic_int8_and_three_matmulnbits_blocks_are_candidates(mlp_model):
    gemm = next(layer for layer in mlp_model.layers() if layer.op_type in ("Gemm", "MatMul"))
    wanted = variants_to_measure([gemm], {gemm.id: (32, 8, 4)})[gemm.id]
    assert {(8, "qdq-u8"), (8, "qdq-s8"), (8, "dynamic")} <= set(wanted)
    assert {(4, "matmulnbits-b32"), (4, "matmulnbits-b64"), (4, "matmulnbits-b128")} <= set(wanted)


def renamed(model):
    """The same model with every initializer and inner tensor renamed (what a re-export looks like)."""
    proto = model.to_proto()
    names = {t.name: f"renamed_{i}" for i, t in enumerate(proto.graph.initializer)}
    inner = {o for n in proto.graph.node for o in n.output} - {o.name for o in proto.graph.output}
    names.update({name: f"inner_{i}" for i, name in enumerate(sorted(inner))})
    for t in proto.graph.initializer:
        t.name = names[t.name]
    for n in proto.graph.node:
        n.input[:] = [names.get(i, i) for i in n.input]
        n.output[:] = [names.get(o, o) for o in n.output]
    del proto.graph.value_info[:]
    return from_proto(proto, name="renamed")


def test_a_re_export_with_other_names_is_not_timed_again(mlp_model, calib_arrays, tmp_path):
    cache = tmp_path / "latency.json"
    calibration = from_arrays(calib_arrays, mlp_model.inputs)
    wanted = {layer.id: [(8, "qdq-u8")] for layer in mlp_model.layers()}
    measure(mlp_model, wanted, batches=(1,), cache=cache, calibration=calibration)
    entries = len(json.loads(cache.read_text()))
    messages = []
    other = renamed(mlp_model)
    table = measure(other, {layer.id: [(8, "qdq-u8")] for layer in other.layers()}, batches=(1,), cache=cache,
                    calibration=from_arrays(calib_arrays, other.inputs), progress=messages.append)
    assert len(json.loads(cache.read_text())) == entries and not any("timing" in m for m in messages)
    assert len(table) == len(mlp_model.layers())


def dynamic_transformer_block():
    """x[N, S, 8] -> MatMul(w[8, 16]) -> Relu -> MatMul(v[16, 8]) -> y[N, S, 8], batch and sequence symbolic:
    static shape inference knows no size but the last, so only calibration data can give the real shapes."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "v"], ["y"], name="down")]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 8])],
                              [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w"),
                               numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "v")])
    return from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10),
                      name="block")


def test_layers_are_timed_at_their_real_shapes_from_the_calibration_run(tmp_path):
    model = dynamic_transformer_block()
    data = from_arrays({"x": np.random.default_rng(1).standard_normal((5, 12, 8)).astype(np.float32)}, model.inputs)
    inputs, failures = layer_inputs(model, model.layers(), data, (1, 4))
    assert not failures
    assert {lid: {b: a.shape for b, a in per.items()} for lid, per in inputs.items()} == {
        layer.id: {1: (1, 12, 8 if i == 0 else 16), 4: (4, 12, 8 if i == 0 else 16)}
        for i, layer in enumerate(model.layers())}
    table = measure(model, {layer.id: [(8, "qdq-u8"), (8, "dynamic")] for layer in model.layers()},
                    batches=(1, 4), cache=tmp_path / "c.json", calibration=data)
    assert set(table) == {layer.id for layer in model.layers()}
    assert all(set(row) == {FP32, (8, "qdq-u8"), (8, "dynamic")} for row in table.values())


def repeated_block():
    """x[N, S, 8] -> MatMul(w[8, 8]) -> Relu -> MatMul(v[8, 8]) -> y: two layers equal but for their weights' values
    (as a transformer's Q, K, V and O projections are)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="first"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "v"], ["y"], name="second")]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 8])],
                              [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
                               numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "v")])
    return from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10),
                      name="repeated")


def test_layers_of_one_signature_are_timed_once_and_share_the_figures(tmp_path):
    model = repeated_block()
    data = from_arrays({"x": np.random.default_rng(1).standard_normal((5, 12, 8)).astype(np.float32)}, model.inputs)
    first, second = model.layers()
    wanted = {first.id: [(8, "qdq-u8")], second.id: [(8, "qdq-u8"), (8, "dynamic")]}
    messages = []
    table = measure(model, wanted, batches=(1, 4), cache=tmp_path / "c.json", calibration=data,
                    progress=messages.append)
    assert any("2 layer(s) as 2 distinct" in m for m in messages), messages  # one group per batch, not per layer
    assert table.work["groups_timed"] == 2 and table.work["models_built"] == 3 * 2
    assert set(table.work["seconds"]) == {"layer_inputs", "build", "timing"}
    stored = json.loads((tmp_path / "c.json").read_text())
    assert len(stored) == 3 * 2  # fp32, qdq-u8 and dynamic at two batches: each timed once for both layers
    assert table[first.id] == {v: table[second.id][v] for v in (FP32, (8, "qdq-u8"))}
    assert set(table[second.id]) == {FP32, (8, "qdq-u8"), (8, "dynamic")}
    assert set(table[first.id]) == {FP32, (8, "qdq-u8")}  # a layer gets the variants it asked for


def test_without_calibration_a_layer_of_unknown_shape_is_recorded_not_fatal(tmp_path):
    model = dynamic_transformer_block()
    messages = []
    table = measure(model, {layer.id: [(8, "qdq-u8")] for layer in model.layers()}, batches=(1,),
                    cache=tmp_path / "c.json", progress=messages.append)
    assert not table and set(table.failures) == {layer.id for layer in model.layers()}
    assert all("not static" in why for why in table.failures.values())
    assert any(m.startswith("warning: layer") for m in messages)


def embedding_model():
    """ids[N,4] -> Gather(table[16,8]) -> MatMul(w[8,3]) -> y[N,4,3]: an embedding layer and a dense one."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
             helper.make_node("MatMul", ["emb", "w"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 3])],
                              [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "table"),
                               numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w")])
    return from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10),
                      name="emb")


def test_untimed_layers_are_left_out(tmp_path):
    """An embedding lookup's input is an index tensor, not an activation: it is not timed, the MatMul is."""
    model = embedding_model()
    ops = {layer.id: layer.op_type for layer in model.layers()}
    assert sorted(ops.values()) == ["Gather", "MatMul"]
    wanted = {layer_id: [(8, "qdq-s8")] for layer_id in ops}
    data = from_arrays({"ids": np.random.default_rng(0).integers(0, 16, (3, 4))}, model.inputs)
    table = measure(model, wanted, batches=(1,), cache=tmp_path / "c.json", calibration=data)
    assert set(table) == {lid for lid, op in ops.items() if op == "MatMul"}
    assert set(next(iter(table.values()))) == {FP32, (8, "qdq-s8")}


def test_whole_models_are_timed_against_each_other(cnn_model, calib_arrays, tmp_path):
    probe = LatencyProbe(cache=tmp_path / "c.json")
    x = calib_arrays["input"][:2]
    group = probe.graphs({"a": cnn_model.to_bytes(), "b": cnn_model.to_bytes(), "broken": b"not a model"},
                         {2: {"input": x}}, rounds=3)
    assert set(group.samples) == {"a", "b"} and "broken" in group.errors
    assert len(group.samples["a"][2]) >= 3 and 0.2 < group.ratio("b", "a", 2) < 5
    assert probe.cpu().flags  # what cached timings are keyed by


def test_cached_whole_model_timings_are_reused_for_the_same_models_and_feeds(cnn_model, calib_arrays, tmp_path):
    probe = LatencyProbe(cache=tmp_path / "c.json")
    x = calib_arrays["input"][:2]
    model = tmp_path / "m.onnx"
    model.write_bytes(cnn_model.to_bytes())
    first = probe.graphs({"a": model, "b": cnn_model.to_bytes()}, {2: {"input": x}}, rounds=3, cached=True)
    again = probe.graphs({"a": model, "b": cnn_model.to_bytes()}, {2: {"input": x}}, rounds=3, cached=True)
    assert again.samples == first.samples and (tmp_path / "graphs.json").is_file()  # not timed again
    other = probe.graphs({"a": model, "b": cnn_model.to_bytes()}, {2: {"input": x + 1}}, rounds=3, cached=True)
    fresh = probe.graphs({"a": model, "b": cnn_model.to_bytes()}, {2: {"input": x}}, rounds=3)
    assert other.samples != first.samples and fresh.samples != first.samples  # other feeds, or not cached: timed


def test_a_layer_past_the_protobuf_limit_is_timed_in_every_form(tmp_path, monkeypatch):
    """A one-layer model over protobuf's 2 GiB (a large vocabulary's lm_head; the limit is lowered to 64 bytes
    here) is cut out, materialized and timed like any other: saved with external data and loaded by path, its
    figures the same kinds as below the limit."""
    from bitpass.frontend import model as model_module

    model = repeated_block()
    data = from_arrays({"x": np.random.default_rng(1).standard_normal((5, 12, 8)).astype(np.float32)}, model.inputs)
    first, _ = model.layers()
    wanted = {first.id: [(8, "qdq-u8"), (8, "dynamic"), (4, "matmulnbits-b32")]}
    monkeypatch.setattr(model_module, "SINGLE_PROTO_MAX_WEIGHT_BYTES", 64)
    table = measure(model, wanted, batches=(1,), cache=tmp_path / "c.json", calibration=data)
    assert not table.failures
    assert set(table[first.id]) == {FP32, *wanted[first.id]}
