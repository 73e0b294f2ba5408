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
