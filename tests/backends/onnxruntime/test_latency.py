"""The latency probe: every timed layer gets fp32 and compute-format figures, measured once and cached."""

from __future__ import annotations

import json

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from bitpass.backends.onnxruntime.latency import FP32, measure
from bitpass.frontend import from_proto
from bitpass.passes.allocation.formats import variants_to_measure


def test_probe_times_every_layer_and_caches_the_figures(cnn_model, tmp_path):
    widths = {layer.id: (32, 8, 4) for layer in cnn_model.layers()}
    wanted = variants_to_measure(cnn_model.layers(), widths)
    cache = tmp_path / "latency.json"
    first = measure(cnn_model, wanted, batches=(1, 4), cache=cache)
    assert set(first) == {layer.id for layer in cnn_model.layers()}
    for layer_id, row in first.items():
        assert FP32 in row and all(row[FP32][b] > 0 for b in (1, 4))
        assert set(row) == {FP32, *wanted[layer_id]}, layer_id  # every compute format could be built and run
    stored = json.loads(cache.read_text())
    assert len(stored) == sum(len(row) for row in first.values()) * 2
    again = measure(cnn_model, wanted, batches=(1, 4), cache=cache)
    assert again == first  # from the cache, not re-measured


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
    wanted = {layer_id: [(8, "qdq")] for layer_id in ops}
    table = measure(model, wanted, batches=(1,), cache=tmp_path / "c.json")
    assert set(table) == {lid for lid, op in ops.items() if op == "MatMul"}
    assert set(next(iter(table.values()))) == {FP32, (8, "qdq")}
