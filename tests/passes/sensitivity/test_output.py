"""Output KL/MSE in ONNX Runtime on a hand-built ONNX model (no torch module, no labels)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.frontend import UsageError, from_arrays, from_proto
from bitpass.passes.infra import PassContext
from bitpass.passes.sensitivity.output import OutputProbe, divergence, output_sensitivity
from bitpass.passes.sensitivity.passes import Sensitivity
from bitpass.passes.sensitivity.quant import fake_quantize


def _mlp_proto() -> onnx.ModelProto:
    """x[N,8] -> Gemm(W1: exactly 4-bit representable) -> Relu -> MatMul(W2: a Constant node, wide) -> y[N,5]."""
    rng = np.random.default_rng(0)
    ints = rng.integers(-7, 8, size=(16, 8))
    ints[:, 0] = 7
    w1 = (ints * rng.uniform(0.05, 0.2, size=(16, 1))).astype(np.float32)
    w2 = (rng.standard_normal((16, 5)) * np.array([1.0, 1.0, 1.0, 1.0, 20.0])).astype(np.float32)
    w2[0, 4] = 80.0  # one outlier widens the grid of its channel
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight"], ["h"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Constant", [], ["fc2.weight"], value=numpy_helper.from_array(w2, "fc2.weight")),
        helper.make_node("MatMul", ["a", "fc2.weight"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(w1, "fc1.weight")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.fixture
def onnx_mlp():
    model = from_proto(_mlp_proto(), name="mlp")
    x = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
    return model, from_arrays({"x": x}, model.inputs)


def test_representable_layer_scores_zero_and_wide_layer_does_not(onnx_mlp):
    model, data = onnx_mlp
    result = output_sensitivity(model, data, metric="mse", bits=(2, 4, 8), batch_size=16)
    assert set(result.table) == {"fc1", "fc2"}
    assert result.table["fc1"][4] < 1e-9 < result.table["fc1"][2]  # on the 4-bit grid, not on the 2-bit one
    assert result.table["fc2"][4] > 1e-3
    assert result.table["fc2"][2] > result.table["fc2"][4] > result.table["fc2"][8] > 0
    assert result.runs == 1 + 2 * 3  # one session: a reference run, then one run per (layer, bits)
    assert result.samples == 40


def test_probe_matches_a_directly_quantized_model(onnx_mlp):
    model, data = onnx_mlp
    probe = OutputProbe(model.to_proto(), ["fc1.weight", "fc2.weight"], list(data.batches(40)))
    w2 = model.layer("fc2").weight_array
    q = fake_quantize(w2, 4, axis=1)
    a = np.maximum(data.inputs["x"] @ model.layer("fc1").weight_array.T, 0)
    np.testing.assert_allclose(probe.run({"fc2.weight": q})[0], a @ q, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(probe.reference[0], a @ w2, rtol=1e-4, atol=1e-4)


def test_divergence_metrics():
    ref = np.array([[2.0, 0.0, -1.0]])
    assert divergence([ref], [ref], "kl") == pytest.approx(0.0, abs=1e-12)
    p = np.exp(ref) / np.exp(ref).sum()
    q = np.full(3, 1 / 3)
    assert divergence([ref], [np.zeros((1, 3))], "kl") == pytest.approx(float(np.sum(p * np.log(p / q))))
    assert divergence([ref], [ref + 1.0], "mse") == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["output-kl", "output-mse"])
def test_pass_on_an_onnx_only_model(onnx_mlp, method):
    model, data = onnx_mlp
    ctx = PassContext(calibration=data)
    result = Sensitivity(method=method, bits=4).run(model, ctx)
    assert result.model is model
    table = ctx.analyses.require("sensitivity")
    assert set(table) == {"fc1", "fc2"} and set(table["fc2"]) == {2, 4, 8}
    assert ctx.analyses.require("sensitivity:bits") == table
    from bitpass.frontend import annotation
    assert annotation.sensitivity(model.layer("fc2").node, method) == pytest.approx(table["fc2"][4])
    assert ctx.records["sensitivity"]["labels"] == "none needed"


@pytest.mark.parametrize("method", ["hutchinson", "eigenvalue", "fisher", "taylor"])
def test_gradient_methods_on_an_onnx_only_model_name_the_alternatives(onnx_mlp, method):
    model, data = onnx_mlp
    with pytest.raises(UsageError, match="output-kl, output-mse"):
        Sensitivity(method=method).run(model, PassContext(calibration=data))


def test_a_time_budget_measures_on_fewer_samples_and_says_so(onnx_mlp):
    model, data = onnx_mlp
    full = output_sensitivity(model, data, metric="mse", bits=(2, 4, 8), batch_size=8)
    tight = output_sensitivity(model, data, metric="mse", bits=(2, 4, 8), batch_size=8, time_budget=1e-9,
                               min_samples=8)
    assert full.samples == 40 and full.reduced == ""
    assert tight.samples == 8 and "fit the" in tight.reduced
    assert tight.table["fc1"][4] < 1e-9 < tight.table["fc1"][2]  # the same facts, on fewer samples


def test_the_highest_width_can_be_scaled_from_the_next_lower_instead_of_run(onnx_mlp):
    from bitpass.passes.sensitivity.quant import quantization_error

    model, data = onnx_mlp
    measured = output_sensitivity(model, data, metric="mse", bits=(2, 4, 8), batch_size=16)
    scaled = output_sensitivity(model, data, metric="mse", bits=(2, 4, 8), batch_size=16, extrapolate=True)
    assert scaled.extrapolated == {8: 4}
    assert scaled.runs == 1 + 2 * 2  # 8 bits is not run
    w = model.layer("fc2").weight_array
    ratio = quantization_error(w, 8, 1) / quantization_error(w, 4, 1)
    assert scaled.table["fc2"][8] == pytest.approx(scaled.table["fc2"][4] * ratio)
    # quadratic in a small perturbation: the estimate has the measured value's order of magnitude
    assert measured.table["fc2"][8] / 3 < scaled.table["fc2"][8] < 3 * measured.table["fc2"][8]


def test_on_the_real_sentence_encoder_scaled_8_bit_scores_rank_layers_as_measured_ones(family_export):
    from scipy.stats import spearmanr

    from bitpass.frontend import from_onnx

    path, built = family_export("sentence_embedding", eval_labels=False)  # the session's TorchScript export
    model = from_onnx(path)
    data = from_arrays(built.calibration, model.inputs)
    measured = output_sensitivity(model, data, bits=(2, 4, 8), samples=32)
    scaled = output_sensitivity(model, data, bits=(2, 4, 8), samples=32, extrapolate=True)
    ids = sorted(measured.table)
    rho = spearmanr([measured.table[i][8] for i in ids], [scaled.table[i][8] for i in ids]).correlation
    assert rho > 0.9, rho
    assert scaled.runs < measured.runs


def test_a_reporter_gets_one_counted_task_over_the_layers(onnx_mlp):
    from bitpass.passes.progress import MessageReporter

    model, data = onnx_mlp
    lines: list[str] = []
    output_sensitivity(model, data, metric="mse", bits=(2, 4, 8), batch_size=16,
                       progress=MessageReporter(lines.append, interval=0.0))
    assert lines[0] == "sensitivity (output-mse): 2 layers"
    assert lines[-1].startswith("sensitivity (output-mse): done in")


def _residual_proto() -> onnx.ModelProto:
    """x -> MatMul(W1) -> a -> Relu -> r -> MatMul(W2) -> b; y = Add(r, b) (a skip connection) -> MatMul(W3) -> z,
    plus a second output ``s`` = Sigmoid(a) that only W1 reaches."""
    rng = np.random.default_rng(4)
    weights = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"w{i}") for i in (1, 2, 3)]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="m1"),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Sigmoid", ["a"], ["s"]),
        helper.make_node("MatMul", ["r", "w2"], ["b"], name="m2"),
        helper.make_node("Add", ["r", "b"], ["y"]),
        helper.make_node("MatMul", ["y", "w3"], ["z"], name="m3"),
    ]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 8]),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 8])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_the_suffix_of_a_weight_reads_the_skip_connection_from_upstream():
    from bitpass.passes.sensitivity.output import downstream

    graph = _residual_proto().graph
    second = downstream(graph, "w2")
    assert [graph.node[i].name or graph.node[i].op_type for i in second.nodes] == ["m2", "Add", "m3"]
    assert second.cut == ["r"] and second.outputs == ["z"]  # s does not depend on w2
    first = downstream(graph, "w1")
    assert len(first.nodes) == len(graph.node) and first.cut == ["x"] and first.outputs == ["z", "s"]


def test_suffix_runs_give_the_full_runs_scores_while_executing_fewer_nodes():
    model = from_proto(_residual_proto(), name="residual")
    x = np.random.default_rng(5).standard_normal((30, 8)).astype(np.float32)
    data = from_arrays({"x": x}, model.inputs)  # 30 samples in batches of 16: the last batch is smaller
    full = output_sensitivity(model, data, metric="mse", bits=(2, 4, 8), batch_size=16, suffixes=False)
    part = output_sensitivity(model, data, metric="mse", bits=(2, 4, 8), batch_size=16, suffixes=True)
    assert full.suffix_runs == 0 and full.work == 1.0
    assert part.suffix_runs == 2 * 3  # m2 and m3 at each width; m1's suffix is the whole graph
    assert part.work < 0.8  # counted from the nodes each run executed
    for layer, row in full.table.items():
        assert row[2] > 0
        for bits, value in row.items():
            assert part.table[layer][bits] == pytest.approx(value, rel=1e-5)


def test_suffixes_whose_cut_tensors_do_not_fit_the_cache_run_the_whole_model():
    model = from_proto(_residual_proto(), name="residual")
    batches = [{"x": np.ones((4, 8), np.float32)}]
    probe = OutputProbe(model.to_proto(), ["w1", "w2", "w3"], batches, suffixes=True, cache_bytes=4 * 8 * 4)
    assert set(probe.suffixes) == {"w3"}  # room for one (4, 8) float tensor: the smallest suffix's input
    roomy = OutputProbe(model.to_proto(), ["w1", "w2", "w3"], batches, suffixes=True)
    assert set(roomy.suffixes) == {"w2", "w3"}
    w3 = np.zeros((8, 8), np.float32)
    np.testing.assert_allclose(probe.run({"w3": w3})[0], roomy.run({"w3": w3})[0], atol=1e-6)


def test_a_weight_whose_cut_graph_onnx_runtime_refuses_is_measured_on_the_whole_model(tmp_path):
    """The detector's FPN: a Resize whose sizes come from above a weight's cut loses its shape inference in the
    cut graph, which ONNX Runtime refuses; that weight is measured on the whole model, and every layer scores."""
    from bitpass.frontend import from_onnx
    from bitpass.tools import model_families as mf

    built = mf.build("detector", "fast")
    model = from_onnx(mf.export(built, mf.EXPORTS["torchscript-17"], tmp_path / "detector"))
    data = from_arrays(built.calibration, model.inputs)
    result = output_sensitivity(model, data, samples=8, bits=(4, 8))
    assert set(result.table) == {layer.id for layer in model.layers()}
    assert all(np.isfinite(v) for row in result.table.values() for v in row.values())


# --------------------------------------------------------------------------- the per-layer runs on an executor
@pytest.fixture(scope="module")
def tiny_decoder(tiny_gpt2_64):
    """A 2-layer, 64-wide GPT-2 with its KV cache (13 linear layers and the tied lm_head) and token windows."""
    from bitpass.frontend.decoder import complete_lm_inputs

    model, spec = tiny_gpt2_64
    feeds, _ = complete_lm_inputs({"input_ids": np.random.default_rng(0).integers(0, 256, (12, 24))}, spec)
    return model, from_arrays(feeds, model.inputs)


def _same_measurement(got, want):
    assert got.table == want.table, "every score equal to the last bit"
    assert (got.samples, got.shared, got.suffix_runs, got.extrapolated) == \
        (want.samples, want.shared, want.suffix_runs, want.extrapolated)


def test_worker_processes_measure_the_serial_scores_bit_for_bit(tiny_decoder):
    from bitpass.passes.executors import ProcessExecutor

    model, data = tiny_decoder
    serial = output_sensitivity(model, data, bits=(2, 4, 8), batch_size=4, extrapolate=True)
    assert serial.executor == "serial" and serial.reference_runs == 1 and serial.suffix_runs > 0
    with ProcessExecutor(2) as executor:
        parallel = output_sensitivity(model, data, bits=(2, 4, 8), batch_size=4, extrapolate=True,
                                      executor=executor)
        again = output_sensitivity(model, data, metric="mse", bits=(2, 4), batch_size=4, executor=executor)
    _same_measurement(parallel, serial)
    assert parallel.executor == "local:2" and parallel.reference_runs == 2  # one per worker, none repeated
    assert again.table == output_sensitivity(model, data, metric="mse", bits=(2, 4), batch_size=4).table, \
        "a worker's probe of the last measurement is not reused for another"


def test_the_sensitivity_pass_runs_its_layers_on_the_context_executor(onnx_mlp):
    from bitpass.passes.executors import ProcessExecutor

    model, data = onnx_mlp
    serial_ctx = PassContext(calibration=data)
    Sensitivity(method="output-kl", bits=4, time_budget=None).run(model, serial_ctx)
    with ProcessExecutor(2) as executor:
        ctx = PassContext(calibration=data, executor=executor)
        Sensitivity(method="output-kl", bits=4, time_budget=None).run(model, ctx)
    assert ctx.analyses.require("sensitivity") == serial_ctx.analyses.require("sensitivity")
    assert ctx.records["sensitivity"]["executor"] == "local:2"


def test_a_local_ray_cluster_measures_the_serial_scores_bit_for_bit(tiny_decoder):
    pytest.importorskip("ray", reason="Ray is in the test extra; install it to run the scale-out check")
    from bitpass.passes.executors import executor_from_spec

    model, data = tiny_decoder
    serial = output_sensitivity(model, data, bits=(2, 4, 8), batch_size=4, extrapolate=True)
    with executor_from_spec("ray") as executor:  # ray.init() on this machine: the model travels as files
        assert executor.local
        on_ray = output_sensitivity(model, data, bits=(2, 4, 8), batch_size=4, extrapolate=True,
                                    executor=executor)
        executor.local = False  # as for a cluster elsewhere: the model and batches travel in the object store
        remote = output_sensitivity(model, data, bits=(2, 4, 8), batch_size=4, extrapolate=True,
                                    executor=executor)
    _same_measurement(on_ray, serial)
    _same_measurement(remote, serial)
