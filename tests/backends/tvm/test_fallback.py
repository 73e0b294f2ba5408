"""Operators without a bitpass kernel run through TVM's own Relax ONNX importer, so common models compile
with ``--backend tvm``; what TVM cannot run is asked of TVM and named per node before anything is built."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytest.importorskip("tvm", reason="the TVM backend needs apache-tvm (pip install -e '.[tvm]')")

from bitpass.backends.base import reference_runner  # noqa: E402
from bitpass.backends.tvm import TvmBackend  # noqa: E402
from bitpass.frontend import from_proto, from_torch  # noqa: E402
from bitpass.frontend.errors import UnsupportedOperatorError  # noqa: E402
from bitpass.tools import compile, run  # noqa: E402
from bitpass.tools.bench_tvm import bert_encoder, torchvision_model  # noqa: E402


def _compiled_matches_onnx_runtime(model, feeds, tmp_path):
    artifact = compile(model.clone(), tmp_path / "tvm", backend="tvm", pipeline="optimize", latency=False)
    got = list(run(artifact.path, feeds).values())
    want = reference_runner(model).run(feeds)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(w).max())))
    return artifact


def test_mobilenet_v3_small_compiles_with_hardswish_and_hardsigmoid_from_tvms_importer(tmp_path):
    import torch

    torch.manual_seed(0)
    module = torchvision_model("mobilenet_v3_small", num_classes=10)
    for m in module.modules():  # non-trivial batch-norm statistics, so the outputs are not all near zero
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model = from_torch(module, (torch.zeros(1, 3, 32, 32),))
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)  # batch 3: split onto batch 1
    artifact = _compiled_matches_onnx_runtime(model, {model.inputs[0].name: x}, tmp_path)
    backend = artifact.manifest["records"]["backend"]
    assert backend["ops"]["HardSwish"] == {"tvm importer": 19} and "tvm importer" in backend["ops"]["HardSigmoid"]
    convs = [layer for layer in backend["layers"].values() if layer["kernel"] == "conv2d"]
    assert len(convs) == 52 and backend["ops"]["Conv"] == {"bitpass kernel": 52}
    timing = backend["host_timing"]
    assert timing["batch_1_ms"] > 0 and timing["batch_1_split"]["bitpass kernels calls"] == 54  # 52 convs, 2 Gemms
    split = timing["batch_1_split"]
    assert split["bitpass kernels ms"] > 0 and split["tvm default calls"] > 0


def test_a_bert_class_encoder_compiles_with_where_and_gather_from_tvms_importer(tmp_path):
    import torch

    module = bert_encoder()
    ids, mask = torch.randint(0, 100, (1, 16)), torch.ones(1, 16, dtype=torch.int64)
    model = from_torch(module, (ids, mask))
    rng = np.random.default_rng(0)
    feeds = {model.inputs[0].name: rng.integers(0, 100, (2, 16)), model.inputs[1].name: np.ones((2, 16), np.int64)}
    feeds[model.inputs[1].name][1, 10:] = 0  # padding: the attention mask matters
    artifact = _compiled_matches_onnx_runtime(model, feeds, tmp_path)
    ops = artifact.manifest["records"]["backend"]["ops"]
    assert "tvm importer" in ops["Where"]
    assert ops["MatMul"].get("bitpass kernel", 0) + ops.get("Gemm", {}).get("bitpass kernel", 0) >= 12


def _graph(nodes, inputs, outputs, domains=(("", 21),)):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in domains])
    return from_proto(proto, name="g", kind="onnx")


def test_legalize_names_each_node_tvm_cannot_run_and_why():
    """Celu: TVM's importer has no converter; TopK: it converts, but TVM cannot legalize relax.topk;
    a com.microsoft op: no importer. The checks go on past each failure (shapes from ONNX inference)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [3])
    nodes = [helper.make_node("Celu", ["x"], ["a"], name="celu"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("TopK", ["b", "k"], ["v", "i"], name="topk"),
             helper.make_node("FusedMatMul", ["b", "b2"], ["c"], name="fused", domain="com.microsoft"),
             helper.make_node("Exp", ["v"], ["y"], name="exp")]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]),
                                                helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 8])],
                              [k, onnx.numpy_helper.from_array(np.ones((8, 8), np.float32), "b2")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model = from_proto(proto, name="g", kind="onnx")
    backend = TvmBackend()
    problems = backend.legalize(model, backend.default_target)
    assert len(problems) == 3, problems
    celu, topk, fused = problems
    assert "Celu (node 'celu')" in celu and "importer" in celu
    assert "TopK (node 'topk')" in topk and "relax.topk" in topk
    assert "FusedMatMul (node 'fused')" in fused
    caps = backend.capabilities(backend.default_target)  # the importer's own list: HardSwish yes, Celu no
    assert caps.supports_op("", "HardSwish") and caps.supports_op("", "GatherElements")
    assert not caps.supports_op("", "Celu")


def test_an_unrunnable_model_is_refused_before_anything_is_written(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    model = _graph([helper.make_node("Celu", ["x"], ["y"], name="celu")], [x], [y])
    with pytest.raises(UnsupportedOperatorError, match="Celu"):
        compile(model, tmp_path / "never", backend="tvm", pipeline="optimize", latency=False)
    assert not (tmp_path / "never").exists()


def test_a_symbolic_dimension_beyond_the_batch_is_named():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])
    model = _graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], [x], [y])
    backend = TvmBackend()
    problems = backend.legalize(model, backend.default_target)
    assert len(problems) == 1 and "dimension 1 is symbolic (seq)" in problems[0]


def test_operators_of_constants_fold_at_compile_time(tmp_path):
    """Range, ConstantOfShape and Where on shapes (ONNX's reference evaluator) leave no work for the library."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])
    consts = [helper.make_tensor(n, TensorProto.INT64, [], [v]) for n, v in (("zero", 0), ("six", 6), ("one", 1))]
    nodes = [helper.make_node("Range", ["zero", "six", "one"], ["r"], name="range"),
             helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Add", ["x", "rf"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [x], [y], consts)
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), name="g", kind="onnx")
    xs = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
    backend = TvmBackend(batches=(2,))
    backend.emit(model, tmp_path, backend.default_target)  # no passes: the lowering meets Range itself
    np.testing.assert_allclose(backend.load(tmp_path).run({"x": xs})[0], xs + np.arange(6, dtype=np.float32))
    ops = backend.records(tmp_path)["ops"]
    assert ops["Range"] == {"folded": 1} and ops["Cast"] == {"folded": 1} and ops["Add"] == {"bitpass rule": 1}


def test_a_dynamic_reshape_from_the_inputs_shape_folds_for_each_batch(tmp_path):
    """TorchScript's ViT export computes its patch reshape from Shape -> Gather (a scalar) -> Unsqueeze -> Concat:
    for a fixed batch every step is a constant, the scalar included."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 4])
    consts = [helper.make_tensor("zero", TensorProto.INT64, [], [0]),
              helper.make_tensor("axes", TensorProto.INT64, [1], [0]),
              helper.make_tensor("rest", TensorProto.INT64, [2], [4, 3])]
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0, name="gather"),
             helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"], name="unsqueeze"),
             helper.make_node("Concat", ["batch1", "rest"], ["target"], axis=0, name="concat"),
             helper.make_node("Reshape", ["x", "target"], ["r"], name="reshape"),
             helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 1], name="transpose")]
    graph = helper.make_graph(nodes, "g", [x], [y], consts)
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), name="g", kind="onnx")
    assert TvmBackend().legalize(model, TvmBackend().default_target) == []
    xs = np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)
    backend = TvmBackend(batches=(2,))
    backend.emit(model, tmp_path, backend.default_target)
    np.testing.assert_allclose(backend.load(tmp_path).run({"x": xs})[0], xs.transpose(0, 2, 1))
    assert backend.records(tmp_path)["ops"]["Unsqueeze"] == {"folded": 1}


def test_a_dynamic_sequence_axis_is_compiled_at_the_calibration_datas_length(tmp_path):
    """A BERT exported as users export it (dynamic batch and sequence) compiles for TVM at the sequence length of
    --calib; the manifest says so, and evaluation data of another length is refused with what to give."""
    import torch

    from bitpass.frontend.errors import UsageError

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert_encoder()

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    path = tmp_path / "bert.onnx"
    ids, mask = torch.randint(0, 100, (2, 12)), torch.ones(2, 12, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "hidden": {0: "batch", 1: "sequence"}}
    torch.onnx.export(Hidden().eval(), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["hidden"], dynamic_axes=axes, opset_version=17, dynamo=False)
    rng = np.random.default_rng(0)
    calib = {"input_ids": rng.integers(0, 100, (8, 16)), "attention_mask": np.ones((8, 16), np.int64)}
    evaluation = {"input_ids": rng.integers(0, 100, (4, 16)), "attention_mask": np.ones((4, 16), np.int64)}
    artifact = compile(str(path), tmp_path / "tvm", backend="tvm", pipeline="optimize", latency=False,
                       calibration=calib, evaluation=evaluation)
    assert any("sequence=16" in note for note in artifact.manifest["records"]["notes"])
    assert artifact.manifest["metrics"]["quality"]["fidelity"]["cosine"] > 0.999
    other = {"input_ids": rng.integers(0, 100, (4, 24)), "attention_mask": np.ones((4, 24), np.int64)}
    with pytest.raises(UsageError, match="compiled for sequence=16"):
        compile(str(path), tmp_path / "tvm2", backend="tvm", pipeline="optimize", latency=False, calibration=calib,
                evaluation=other)
    assert not (tmp_path / "tvm2").exists()


def test_a_language_model_with_a_dynamic_sequence_compiles_at_one_length_and_is_measured_as_a_plain_model(tmp_path):
    """GPT-2's logits exported with dynamic batch and sequence: TVM fixes the sequence from --calib, so the artifact
    cannot generate token by token; it is measured on whole sequences, and the manifest says why."""
    from bitpass.tools import model_families as mf

    built = mf.build("gpt2_lm", "fast")
    path = mf.export(built, mf.EXPORTS["torchscript-17"], tmp_path / "gpt2")
    artifact = compile(str(path), tmp_path / "tvm", backend="tvm", pipeline="optimize", latency=False,
                       calibration=built.calibration, evaluation=built.evaluation)
    notes = artifact.manifest["records"]["notes"]
    assert any("measured as a plain model" in note for note in notes)
    assert "decoder" not in artifact.manifest


def test_roberta_style_position_ids_compile_cumsum_through_topi_and_keep_int64_scalars(tmp_path):
    """RoBERTa's ``cumsum(mask) * mask + padding_idx``: TVM's importer makes ``relax.cumsum``, which TVM 0.27
    cannot legalize on its own (bitpass registers TOPI's scan), and a 0-d int64 constant that ``relax.const``
    would silently make int32."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 8])
    out = helper.make_tensor_value_info("positions", TensorProto.INT64, ["batch", 8])
    nodes = [
        helper.make_node("Constant", [], ["pad"], value=helper.make_tensor("pad", TensorProto.INT64, [], [1])),
        helper.make_node("Constant", [], ["axis"], value=helper.make_tensor("axis", TensorProto.INT64, [], [1])),
        helper.make_node("Equal", ["ids", "pad"], ["is_pad"]),
        helper.make_node("Not", ["is_pad"], ["real"]),
        helper.make_node("Cast", ["real"], ["mask"], to=TensorProto.INT32),
        helper.make_node("CumSum", ["mask", "axis"], ["counted"]),
        helper.make_node("Mul", ["counted", "mask"], ["masked"]),
        helper.make_node("Cast", ["masked"], ["wide"], to=TensorProto.INT64),
        helper.make_node("Add", ["wide", "pad"], ["positions"]),
    ]
    proto = helper.make_model(helper.make_graph(nodes, "positions", [ids], [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model = from_proto(proto)
    feeds = {"ids": np.array([[5, 6, 7, 1, 1, 8, 9, 1], [1, 2, 3, 4, 5, 6, 7, 8]], np.int64)}
    artifact = _compiled_matches_onnx_runtime(model, feeds, tmp_path)
    assert artifact.manifest["records"]["backend"]["ops"]["CumSum"] == {"tvm importer": 1}
    np.testing.assert_array_equal(run(artifact.path, feeds)["positions"][0], [2, 3, 4, 1, 1, 5, 6, 1])
