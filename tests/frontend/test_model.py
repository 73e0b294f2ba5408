"""``Model.clone``: an independent graph that shares the weights (no serialization round trip)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bitpass.frontend import annotation, from_onnx
from bitpass.tools import model_families as mf


def test_a_clone_is_equal_independent_in_structure_and_shares_the_weight_tensors(tmp_path):
    built = mf.build("resnet18", "fast")
    model = from_onnx(mf.export(built, mf.EXPORTS["torchscript-17"], tmp_path))
    copy = model.clone()
    assert copy.to_bytes() == model.to_bytes()
    for name, value in copy.graph.initializers.items():
        assert value is not model.graph.initializers[name]
        assert value.const_value is model.graph.initializers[name].const_value  # shared, not copied
    # annotations, nodes and the opset are the copy's own
    layer = copy.layers()[0]
    annotation.set_weight_bits(layer.node, 4)
    assert annotation.weight_bits(model.layers()[0].node) is None
    copy.ir.opset_imports[""] = 21
    assert model.opset == 17
    # a weight is changed by giving its value a new tensor: the original keeps its own
    before = model.layers()[0].weight_array.copy()
    layer.weight.const_value = ir.tensor(np.zeros_like(before), name=layer.weight.name)
    np.testing.assert_array_equal(model.layers()[0].weight_array, before)


def _model_with_weights(tmp_path, sizes=(300_000, 20_000, 7)):
    """A small graph with initializers above and below the streamed threshold, saved with external data."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for i, size in enumerate(sizes):
        inits.append(numpy_helper.from_array(rng.standard_normal(size).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Slice", [f"w{i}", "start", "stop"], [f"w{i}_slice"]))
        nodes.append(helper.make_node("Add", [current, f"w{i}_slice"], [f"a{i}"]))
        current = f"a{i}"
    inits += [numpy_helper.from_array(np.array([0], np.int64), "start"),
              numpy_helper.from_array(np.array([4], np.int64), "stop")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, [4])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "weights.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="weights.onnx.data", size_threshold=1024)
    return path


def test_streamed_bytes_are_the_same_model_deterministic_and_equal_to_what_save_writes(tmp_path):
    """``to_bytes`` and ``save`` write initializers one at a time (no serialized copy of the whole model): the file
    parses to exactly the proto ``to_proto`` builds, and the same model always gives the same bytes."""
    import onnx

    model = from_onnx(_model_with_weights(tmp_path))
    data = model.to_bytes()
    assert onnx.load_model_from_string(data) == model.to_proto()
    assert model.clone().to_bytes() == data
    assert model.save(tmp_path / "saved.onnx") == ["saved.onnx"]
    assert (tmp_path / "saved.onnx").read_bytes() == data
    onnx.checker.check_model(str(tmp_path / "saved.onnx"))
    import hashlib

    assert model.sha256() == hashlib.sha256(data).hexdigest()  # hashed as written: any size, no bytes held


def test_memory_mapped_external_tensors_are_written_inline(tmp_path):
    """A model read lazily by onnx-ir (its weights memory-mapped from the data file) still saves as one
    self-contained file: the data is inlined, not referenced."""
    import onnx

    path = _model_with_weights(tmp_path)
    lazy = ir.load(path)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in lazy.graph.initializers.values())
    from bitpass.frontend.model import write_streamed

    target = tmp_path / "inline.onnx"
    with target.open("wb") as handle:
        write_streamed(lazy, handle)
    proto = onnx.load(str(target), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    from onnx import numpy_helper

    expected = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    assert {t.name for t in proto.graph.initializer} == set(expected)
    for tensor in proto.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), expected[tensor.name])


def test_a_large_weight_a_pass_replaced_with_an_unnamed_tensor_keeps_its_initializer_name(tmp_path):
    """A pass gives a value a new tensor (``ir.tensor(array)``, unnamed: BatchNorm folding does): the streamed
    bytes name that initializer after its value, as ``to_proto`` does, so ONNX Runtime finds it (it was written
    nameless, and ORT refused the model: "Node input ... is not a graph input, initializer")."""
    import onnx
    import onnxruntime as ort

    model = from_onnx(_model_with_weights(tmp_path))
    value = max(model.ir.graph.initializers.values(), key=lambda v: v.const_value.nbytes)
    assert value.const_value.nbytes >= 1 << 16  # streamed on its own
    value.const_value = ir.tensor(value.const_value.numpy() * 2)
    assert value.const_value.name is None
    data = model.to_bytes()
    assert onnx.load_model_from_string(data) == model.to_proto()
    ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def test_save_external_names_a_large_weight_a_pass_replaced_with_an_unnamed_or_stale_named_tensor(tmp_path):
    """The over-2-GiB path (``save_external``) names each initializer after its value, as ``write_streamed`` does:
    a pass's new tensor may be unnamed (``ir.tensor(array)``) or carry an old name, and ONNX Runtime must still find
    the weight (and the external data must hold the new values, not the old ones)."""
    import onnxruntime as ort

    model = from_onnx(_model_with_weights(tmp_path))
    values = sorted(model.ir.graph.initializers.values(), key=lambda v: -v.const_value.nbytes)[:2]
    expected = {}
    for value, name in zip(values, (None, "stale")):
        expected[value.name] = value.const_value.numpy() * 2
        value.const_value = ir.tensor(expected[value.name], name=name)
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "saved.onnx"
    model.save_external(path)
    assert (tmp_path / "out" / "saved.onnx.data").is_file()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": np.zeros(4, np.float32)})[0]
    want = sum(array[:4] for array in expected.values()) + model.ir.graph.initializers["w2"].const_value.numpy()[:4]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    loaded = ir.load(path)
    for name, array in expected.items():
        np.testing.assert_array_equal(loaded.graph.initializers[name].const_value.numpy(), array)


def test_paged_out_weights_leave_memory_and_the_model_saves_and_runs_the_same(tmp_path):
    """``PagedWeights.page_out`` moves the large initializers of several models (a tensor they share once) into a
    scratch file read back through a memory map: the models serialize to the same bytes (an imported tensor's own
    ``TensorProto`` fields kept), the onnx checker and ONNX Runtime take them, and small tensors stay in memory. The
    file is removed once mapped, so nothing is left behind however the compile ends."""
    import onnx

    from bitpass.frontend.model import PagedTensor, PagedWeights
    from bitpass.passes import execution

    model = from_onnx(_model_with_weights(tmp_path))
    made = model.clone()
    made.graph.initializers["w1"].const_value = ir.tensor(np.arange(20_000, dtype=np.float32), name="w1")  # a pass's
    before = [m.to_bytes() for m in (model, made)]
    shared = model.graph.initializers["w0"].const_value
    pages = PagedWeights(tmp_path)
    moved = pages.page_out(model, made)
    assert moved == 4 * (300_000 + 20_000 + 20_000)  # w0 once for both; w1 of each; the 7-float and int64 ones stay
    assert pages._maps[0].size() >= moved and list(tmp_path.glob("paged-*")) == []  # mapped, its file gone
    paged = made.graph.initializers["w0"].const_value
    assert isinstance(paged, PagedTensor) and paged is model.graph.initializers["w0"].const_value
    assert not paged.numpy().flags.writeable and not paged.numpy().flags.owndata
    assert not isinstance(model.graph.initializers["w2"].const_value, PagedTensor)
    np.testing.assert_array_equal(paged.numpy(), shared.numpy())
    assert [m.to_bytes() for m in (model, made)] == before
    pages.drop_pages()
    onnx.checker.check_model(model.to_proto(), full_check=True)
    session = execution.create_session(made)
    x = np.ones(4, np.float32)
    expected = x + sum(made.graph.initializers[f"w{i}"].const_value.numpy()[:4] for i in range(3))
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-6)
    assert pages.page_out(model) == 0  # nothing left to move: no file
    assert not (tmp_path / "paged-1.bin").exists()
