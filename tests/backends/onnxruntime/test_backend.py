"""The ONNX Runtime backend legalizes by asking the runtime (one-node sessions, cached), not by a hand list."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from bitpass.backends.onnxruntime.backend import OnnxRuntimeBackend, operator_support
from bitpass.frontend import from_proto, from_torch
from bitpass.tools import model_families as mf


def _one_node(op_type: str, inputs: list[int], opset: int, domain: str = "", **attrs) -> onnx.ModelProto:
    values = [helper.make_tensor_value_info(f"x{i}", t, [2]) for i, t in enumerate(inputs)]
    node = helper.make_node(op_type, [v.name for v in values], ["y"], domain=domain or None, name="n", **attrs)
    graph = helper.make_graph([node], "g", values, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports)


def test_castlike_and_hardswish_run_because_the_runtime_says_so():
    backend = OnnxRuntimeBackend()
    assert backend.legalize(from_proto(_one_node("CastLike", [TensorProto.FLOAT, TensorProto.FLOAT], 19)), "cpu") == []
    assert backend.legalize(from_proto(_one_node("HardSwish", [TensorProto.FLOAT], 17)), "cpu") == []


def test_an_operator_the_runtime_lacks_is_refused_with_the_runtimes_reason():
    backend = OnnxRuntimeBackend()
    problems = backend.legalize(from_proto(_one_node("Frobnicate", [TensorProto.FLOAT], 17, domain="acme")), "cpu")
    assert len(problems) == 1
    assert problems[0].startswith("operator acme.Frobnicate (node 'n') is not supported by onnxruntime")
    assert "Frobnicate" in problems[0].split(": ", 1)[1]


def test_a_kernel_missing_for_the_input_type_is_refused():
    # Relu has no CPU kernel for int64: the probe uses the model's own input types
    problems = OnnxRuntimeBackend().legalize(from_proto(_one_node("Relu", [TensorProto.INT64], 17)), "cpu")
    assert problems and "Relu" in problems[0]


def test_each_distinct_operator_is_probed_once():
    backend = OnnxRuntimeBackend()
    model = from_proto(_one_node("Softsign", [TensorProto.FLOAT], 17))
    backend.legalize(model, "cpu")
    misses = operator_support.cache_info().misses
    backend.legalize(model, "cpu")
    assert operator_support.cache_info().misses == misses


def test_a_torchvision_resnet18_module_exported_by_bitpass_is_legal():
    built = mf.build("resnet18", "fast")
    model = from_torch(built.module, built.example_inputs)
    assert OnnxRuntimeBackend().legalize(model, "cpu") == []


@pytest.mark.parametrize("name", ["sentence_embedding", "mobilenet_v3_small"])
def test_families_with_attention_and_function_operators_are_legal(name, tmp_path):
    built = mf.build(name, "fast")
    path = mf.export(built, mf.EXPORTS[f"dynamo-{mf.DYNAMO_NEWEST}"], tmp_path)
    from bitpass.frontend import from_onnx

    assert OnnxRuntimeBackend().legalize(from_onnx(path), "cpu") == []


def test_compiling_a_resnet18_module_is_not_refused(tmp_path):
    from bitpass.tools import compile

    built = mf.build("resnet18", "fast")
    with torch.no_grad():
        artifact = compile(built.module, tmp_path / "out", example_inputs=built.example_inputs,
                           pipeline="optimize", latency=False)
    assert artifact.manifest["backend"] == "onnxruntime"


@pytest.fixture(scope="module")
def _gpt2_vocab_300():
    """A tiny GPT-2 with a 300-token vocabulary (its tables are the only tensors with a 300 in their shape),
    exported once for the module: each test takes a ``clone`` (the export takes seconds)."""
    from bitpass.frontend.decoder import export_decoder
    from bitpass.tools import decoders

    return export_decoder(decoders.tiny_gpt2(vocab=300, width=32))


@pytest.fixture
def gpt2_vocab_300(_gpt2_vocab_300):
    model, spec = _gpt2_vocab_300
    return model.clone(), spec


def test_a_tied_embedding_table_is_written_once_and_the_outputs_do_not_change(tmp_path, gpt2_vocab_300):
    """GPT-2's lm_head shares the token embedding; the import folds the lm_head's transpose into its own
    initializer (a quantizable layer). An fp32 artifact stores the table once: the Gather reads the transposed
    copy, with the same layer id, and every output is bit-identical."""
    import numpy as np
    import onnxruntime as ort

    model, spec = gpt2_vocab_300
    vocab_tables = [v for v in model.graph.initializers.values() if 300 in v.const_value.shape.numpy()]
    assert len(vocab_tables) == 2  # the embedding and the folded lm_head
    files = OnnxRuntimeBackend().emit(model, tmp_path, "cpu")
    written = onnx.load(str(tmp_path / files[0]))
    assert [t.name for t in written.graph.initializer if 300 in t.dims] == [vocab_tables[1].name]
    feeds = spec.feeds(np.arange(7).reshape(1, 7))
    expected = ort.InferenceSession(model.to_bytes(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(tmp_path / files[0]), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))
    from bitpass.frontend import from_onnx

    assert {layer.id for layer in from_onnx(tmp_path / files[0]).layers()} == {layer.id for layer in model.layers()}
    assert len(model.graph.initializers) == len(written.graph.initializer) + 1  # the model itself is untouched


def test_an_artifact_past_the_external_data_size_keeps_its_weights_beside_model_onnx(tmp_path, monkeypatch,
                                                                                     gpt2_vocab_300):
    """Past ``EXTERNAL_DATA_BYTES`` the weights go to ``model.onnx.data`` (ONNX Runtime maps them instead of parsing
    them into its heap): the artifact loads through the confinement check, gives the single file's outputs
    bit for bit, and is written byte-identically twice."""
    import numpy as np

    from bitpass.backends.onnxruntime import backend as ort_backend

    model, spec = gpt2_vocab_300
    (tmp_path / "single").mkdir()
    assert OnnxRuntimeBackend().emit(model, tmp_path / "single", "cpu") == ["model.onnx", "session.json"]
    monkeypatch.setattr(ort_backend, "EXTERNAL_DATA_BYTES", 1024)
    runs = []
    for name in ("external", "again"):
        (tmp_path / name).mkdir()
        assert OnnxRuntimeBackend().emit(model, tmp_path / name, "cpu") == ["model.onnx", "model.onnx.data",
                                                                           "session.json"]
        runs.append({f: (tmp_path / name / f).read_bytes() for f in ("model.onnx", "model.onnx.data")})
    assert runs[0] == runs[1]
    assert len(runs[0]["model.onnx"]) + len(runs[0]["model.onnx.data"]) \
        >= (tmp_path / "single" / "model.onnx").stat().st_size > len(runs[0]["model.onnx"])
    feeds = spec.feeds(np.arange(7).reshape(1, 7))
    outputs = [OnnxRuntimeBackend().load(tmp_path / name).run(feeds) for name in ("single", "external")]
    assert all(np.array_equal(a, b) for a, b in zip(*outputs))
