"""Silently wrong results: a compile or run that exits 0 must give the right numbers (or refuse clearly).

Each artifact is run with ``bitpass run`` and compared with ONNX Runtime on the original model:
``optimize`` must be exact (fp32 in, fp32 out), int8 pipelines close (per-output cosine).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hostile_kit import (
    artifact,
    has_traceback,
    make_model,
    refused,
    samples,
    save_model,
    save_npz,
    succeeded,
    tensor_info,
    user_files,
    weights,
)
from onnx import TensorProto, helper, numpy_helper

def _rng(seed: int = 7) -> np.random.Generator:
    """Each test draws its own data: results do not depend on which tests ran before."""
    return np.random.default_rng(seed)


def _const(value, name, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype), name)


# --- models with subgraphs ------------------------------------------------------------------------


def scan_model() -> onnx.ModelProto:
    """A running sum over the batch: the Scan body returns its state and an Identity copy of it."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_i"], ["s_out"]), helper.make_node("Identity", ["s_out"], ["y_i"])],
        "body", [tensor_info("s_in", [4]), tensor_info("x_i", [4])], [tensor_info("s_out", [4]), tensor_info("y_i", [4])])
    return make_model([helper.make_node("MatMul", ["x", "w"], ["m"]),
                       helper.make_node("Scan", ["s0", "m"], ["s", "y"], num_scan_inputs=1, body=body)],
                      [tensor_info("x", ["N", 4])], [tensor_info("y", ["N", 4])],
                      [weights([4, 4], "w", 11), _const(np.zeros(4), "s0")])


def if_model() -> onnx.ModelProto:
    """Branches that return an outer value through an Identity, fold outer constants, and hold dead nodes."""
    then = helper.make_graph([helper.make_node("Mul", ["m", "two"], ["t0"]), helper.make_node("Identity", ["t0"], ["t1"]),
                              helper.make_node("Sin", ["m"], ["dead"])], "then", [], [tensor_info("t1", ["N", 4])])
    other = helper.make_graph([helper.make_node("Identity", ["m"], ["e1"])], "else", [], [tensor_info("e1", ["N", 4])])
    return make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("ReduceSum", ["x"], ["sx"], keepdims=0),
                       helper.make_node("Greater", ["sx", "zero"], ["c"]),
                       helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                      [tensor_info("x", ["N", 4])], [tensor_info("y", ["N", 4])],
                      [weights([4, 4], "w", 12), _const(2.0, "two"), _const(0.0, "zero")])


def loop_model() -> onnx.ModelProto:
    """Three rounds of relu(a @ w + 1), the carried value and the condition passed through Identities."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["a_in", "w"], ["a1"]), helper.make_node("Add", ["a1", "one"], ["a2"]),
         helper.make_node("Relu", ["a2"], ["a3"]), helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["a3"], ["a_out"])], "body",
        [tensor_info("i", [], TensorProto.INT64), tensor_info("cond_in", [], TensorProto.BOOL), tensor_info("a_in", ["N", 4])],
        [tensor_info("cond_out", [], TensorProto.BOOL), tensor_info("a_out", ["N", 4])])
    return make_model([helper.make_node("Loop", ["n", "c0", "x"], ["y"], body=body)], [tensor_info("x", ["N", 4])],
                      [tensor_info("y", ["N", 4])],
                      [weights([4, 4], "w", 13, 0.5), _const(1.0, "one"), _const(3, "n", np.int64),
                       _const(True, "c0", np.bool_)])


def identity_outputs_model() -> onnx.ModelProto:
    """Two graph outputs, the second an Identity of the first: both must survive, under their names."""
    return make_model([helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Identity", ["a"], ["b"])],
                      [tensor_info("x", ["N", 4])], [tensor_info("a", ["N", 4]), tensor_info("b", ["N", 4])],
                      [weights([4, 4], "w", 14)])


def pre_activation_output_model(activation: str) -> onnx.ModelProto:
    """relu(x @ w) and the pre-activation x @ w, both returned: the second keeps its negatives."""
    extra = [_const(-0.5, "lo"), _const(0.5, "hi")] if activation == "Clip" else []
    node = helper.make_node(activation, ["m", "lo", "hi"] if activation == "Clip" else ["m"], ["r"])
    return make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), node], [tensor_info("x", ["N", 8])],
                      [tensor_info("r", ["N", 8]), tensor_info("m", ["N", 8])], [weights([8, 8], "w", 15), *extra])


def prelu_opset6_model(rank: int) -> onnx.ModelProto:
    """PRelu as opset 6 exported it: slope [C] applied per channel (axis 1)."""
    shape = [2, 3, 4, 5, 6][:rank]
    return make_model([helper.make_node("PRelu", ["x", "slope"], ["y"])],
                      [tensor_info("x", shape), tensor_info("slope", [3])],  # IR 3: initializers are inputs too
                      [tensor_info("y", shape)], [_const([0.1, -2.0, 3.0], "slope")], opset=6, ir_version=3)


def _reference(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _compiled_outputs(box, model, feeds, pipeline, calib=None):
    save_model(model, box.work / "model.onnx")
    save_npz(box.work / "x.npz", **feeds)
    argv = ["compile", "model.onnx", "-o", "out", "--pipeline", pipeline, "--no-latency", "-q"]
    if calib is not None:
        save_npz(box.work / "calib.npz", **calib)
        argv += ["--calib", "calib.npz"]
    result = box.run(*argv)
    succeeded(box, result, creates=["out"])
    run = box.run("run", "out", "--input", "x.npz", "-o", "y.npz")
    succeeded(box, run, creates=["y.npz"])
    with np.load(box.work / "y.npz") as outputs:
        return {name: outputs[name] for name in outputs.files}


def _cosine(a, b) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


SUBGRAPH_MODELS = {"scan": scan_model, "if": if_model, "loop": loop_model, "identity-outputs": identity_outputs_model}


@pytest.mark.parametrize("name", sorted(SUBGRAPH_MODELS))
def test_optimize_keeps_subgraph_models_exact(box, name):
    model = SUBGRAPH_MODELS[name]()
    feeds = {"x": _rng().standard_normal((6, 4)).astype(np.float32)}
    got = _compiled_outputs(box, model, feeds, "optimize")
    expected = _reference(model, feeds)
    names = [o.name for o in model.graph.output]
    assert sorted(got) == sorted(names), f"outputs renamed or lost: {sorted(got)} vs {names}"
    for output, want in zip(names, expected):
        np.testing.assert_allclose(got[output], want, rtol=1e-5, atol=1e-5, err_msg=output)


@pytest.mark.parametrize("name", ["scan", "if", "loop"])
def test_the_default_int8_pipeline_keeps_subgraph_models_close(box, name):
    """Calibrated on the very batch it is checked on: the Scan sums over the batch axis, so its ranges
    depend on the batch; this checks the transformation, not generalisation."""
    model = SUBGRAPH_MODELS[name]()
    feeds = {"x": _rng().standard_normal((16, 4)).astype(np.float32)}
    got = _compiled_outputs(box, model, feeds, "default", feeds)
    for output, want in zip([o.name for o in model.graph.output], _reference(model, feeds)):
        assert _cosine(got[output], want) > 0.99, f"{output}: cosine {_cosine(got[output], want):.4f}"


@pytest.mark.parametrize("activation", ["Relu", "Clip"])
def test_a_pre_activation_output_keeps_its_negatives_under_int8(box, activation):
    model = pre_activation_output_model(activation)
    rng = _rng()
    feeds = {"x": rng.standard_normal((16, 8)).astype(np.float32)}
    calib = {"x": rng.standard_normal((64, 8)).astype(np.float32)}
    got = _compiled_outputs(box, model, feeds, "default", calib)
    expected = dict(zip(["r", "m"], _reference(model, feeds)))
    assert got["m"].min() < -1.0, "the pre-activation output came back clipped"
    for output in ("r", "m"):
        assert _cosine(got[output], expected[output]) > 0.99, output


@pytest.mark.parametrize("rank", [3, 4, 5])
def test_opset6_prelu_stays_per_channel(box, rank):
    model = prelu_opset6_model(rank)
    shape = [2, 3, 4, 5, 6][:rank]
    x = _rng().standard_normal(shape).astype(np.float32)
    slope = np.array([0.1, -2.0, 3.0], np.float32).reshape([3] + [1] * (rank - 2))
    got = _compiled_outputs(box, model, {"x": x}, "optimize")
    np.testing.assert_allclose(got["y"], np.where(x >= 0, x, x * slope), rtol=1e-6, atol=1e-6)


# --- run ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["allow_pickle", "file", "compress", "args"])
def test_run_keeps_outputs_whose_names_np_savez_treats_as_keywords(box, output):
    model = make_model([helper.make_node("Neg", ["x"], [output])], [tensor_info("x", ["N", 4])],
                       [tensor_info(output, ["N", 4])])
    feeds = {"x": _rng().standard_normal((3, 4)).astype(np.float32)}
    got = _compiled_outputs(box, model, feeds, "optimize")
    assert list(got) == [output]
    np.testing.assert_array_equal(got[output], -feeds["x"])


def test_labels_out_of_range_for_the_model_are_refused(box):
    files = user_files(box, evaluation=False)
    save_npz(box.work / "eval.npz", **{**samples(24, seed=2, labels=None), "labels": np.full(24, 999)})
    result = box.run("compile", files["model"], "-o", "out", "--calib", files["calib"], "--eval", "eval.npz",
                     "--no-latency", "-q")
    refused(box, result, "labels", status=2)


def test_tiny_outputs_are_measured_as_faithful(box):
    """Outputs around 1e-7: the cosine of an exact fp32 artifact is 1, not ~0 (norms floored at 1e-12)."""
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor_info("x", ["N", 8])],
                       [tensor_info("y", ["N", 4])], [weights([8, 4], "w", 16, scale=1e-7)])
    save_model(model, box.work / "model.onnx")
    save_npz(box.work / "eval.npz", **samples(16, labels=None))
    result = box.run("compile", "model.onnx", "-o", "out", "--pipeline", "optimize", "--eval", "eval.npz",
                     "--no-latency", "-q")
    succeeded(box, result, creates=["out"])
    manifest = json.loads((box.work / "out" / "manifest.json").read_text())
    assert manifest["metrics"]["quality"]["fidelity"]["cosine"] > 0.9999


# --- verify trusts the files, not the manifest -------------------------------------------------------------


def _rehash(folder, manifest):
    for name in list(manifest.get("files", {})):
        if (folder / name).is_file():
            data = (folder / name).read_bytes()
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _swap_in_other_weights(folder, manifest):
    model = onnx.load(folder / "model.onnx")
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT and len(tensor.dims) == 2:
            array = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(-array, tensor.name))
            break
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    _rehash(folder, manifest)


TAMPERING = {
    "empty-layers": lambda folder, m: m.update(layers=[]),
    "drop-a-files-entry": lambda folder, m: m["files"].pop("model.onnx"),
    "drop-all-files-entries": lambda folder, m: m.update(files={}),
    "better-metrics": lambda folder, m: m["metrics"]["size"].update(weight_ratio=0.01),
    "other-pipeline": lambda folder, m: m.update(pipeline="fold-constants"),
    "edited-report": lambda folder, m: (folder / "report.html").write_text("<html>all good</html>"),
    "extra-file": lambda folder, m: (folder / "model.onnx.data").write_bytes(b"\0" * 64),
    "weights-swapped-and-rehashed": _swap_in_other_weights,
}


#: a rewrite with every hash recomputed is only caught by re-measuring (--eval)
VERIFY_CASES = [(how, with_eval) for how in sorted(TAMPERING) for with_eval in (False, True)
                if with_eval or how != "weights-swapped-and-rehashed"]


@pytest.mark.parametrize("how, with_eval", VERIFY_CASES,
                         ids=[f"{how}-{'eval' if e else 'files'}" for how, e in VERIFY_CASES])
def test_verify_fails_on_any_edit(box, how, with_eval):
    folder = artifact(box, pipeline="default")
    manifest = json.loads((folder / "manifest.json").read_text())
    TAMPERING[how](folder, manifest)
    if how not in ("edited-report", "extra-file", "weights-swapped-and-rehashed"):
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    argv = ["verify", "art", *(["--eval", "eval.npz"] if with_eval else [])]
    result = box.run(*argv)
    assert result.status == 1, f"verify passed a tampered artifact ({how}):\n{result.describe()}"
    assert not has_traceback(result.stderr), result.describe()


def test_verify_passes_an_untouched_artifact(box):
    artifact(box, pipeline="default")
    result = box.run("verify", "art", "--eval", "eval.npz")
    succeeded(box, result)
