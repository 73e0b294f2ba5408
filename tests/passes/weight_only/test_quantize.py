"""quantize_weights / the quantize-weights pass: a decoder's linear layers become MatMulNBits holding exactly the
codes the cores chose, embeddings GatherBlockQuantized, the input model untouched."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from bitpass.frontend import UsageError, annotation
from bitpass.passes.infra import PassContext
from bitpass.passes.weight_only.apply import QuantizedLayer
from bitpass.passes.weight_only.emit import linear_weight
from bitpass.passes.weight_only.passes import QuantizeWeights
from bitpass.passes.weight_only.quantize import Quantizer, Recipe, quantize_weights


def logits(model, feeds) -> np.ndarray:
    session = ort.InferenceSession(model.to_bytes(), providers=["CPUExecutionProvider"])
    return session.run(["logits"], feeds)[0]


def with_weights(model, layers: dict[str, np.ndarray]):
    """The fp32 model with each named layer's (K, N) weight replaced (what the low-bit model should compute)."""
    import onnx_ir as ir

    copy = model.clone()
    for layer in copy.layers():
        if layer.id in layers:
            layer.weight.const_value = ir.tensor(layers[layer.id], name=layer.weight.name)
    return copy


def test_every_linear_layer_becomes_matmulnbits_computing_its_dequantized_codes(decoder):
    model, _, calibration, feeds = decoder
    quantizer = Quantizer()
    result, outcome = quantizer(model, calibration, Recipe(method="gptq", bits=4, group_size=32, accuracy_level=0))
    linear = [layer.id for layer in model.layers() if layer.op_type == "MatMul"]
    assert set(outcome.layers) == set(linear) and "lm_head" in linear
    ops = {annotation.layer_id(node): node.op_type for node in result.graph if annotation.layer_id(node)}
    assert all(ops[i] == "MatMulNBits" for i in linear)
    assert all(annotation.weight_format(n) == "matmulnbits" for n in result.graph if n.op_type == "MatMulNBits")
    dequantized = {key[0]: layer.dequantize() for key, layer in quantizer._layers.items()}
    np.testing.assert_allclose(logits(result, feeds), logits(with_weights(model, dequantized), feeds), atol=2e-4)


def test_the_input_model_is_untouched_and_its_weights_are_shared_not_copied(decoder):
    model, _, calibration, _ = decoder
    before = model.to_bytes()
    result, _ = quantize_weights(model, calibration, Recipe(method="rtn"))
    assert model.to_bytes() == before
    shared = {id(v.const_value) for v in model.graph.initializers.values()}
    kept = [v for v in result.graph.initializers.values() if v.name in model.graph.initializers]
    assert kept and all(id(v.const_value) in shared for v in kept)  # layer norms, biases: the same tensors


def test_gptq_keeps_each_layers_output_closer_than_round_to_nearest(decoder):
    from bitpass.passes.weight_only.grid import output_error, rtn

    model, _, calibration, _ = decoder
    quantizer = Quantizer()
    _, gptq = quantizer(model, calibration, Recipe(method="gptq", bits=2, group_size=32))
    hessians = {tensor: h for (_, tensor, _), h in quantizer._hessians.items()}
    worse = []
    for layer in model.layers():
        if layer.id in gptq.layers:
            weight = linear_weight(layer)
            h = hessians[layer.node.inputs[0].name]
            rounded = output_error(weight, rtn(weight, 2, 32).dequantize(), h)
            if gptq.layers[layer.id]["output_error"] >= rounded:
                worse.append(layer.id)
    assert not worse


def test_a_fractional_average_mixes_widths_by_group_within_the_budget(decoder):
    model, _, calibration, feeds = decoder
    result, outcome = Quantizer()(model, calibration, Recipe(method="gptq", bits=3, group_size=32, allocation="group"))
    record = outcome.record(Recipe(bits=3, allocation="group"))
    assert record["average_bits"] == pytest.approx(3.0, abs=0.02)
    widths = {w for layer in outcome.layers.values() for w in layer["widths"]}
    assert {"2", "4"} <= widths
    bits = {n.attributes.get_int("bits", 0) for n in result.graph if n.op_type == "MatMulNBits"}
    assert {2, 4} <= bits
    assert np.isfinite(logits(result, feeds)).all()


def test_layers_annotated_fp32_or_a_width_keep_it(decoder):
    model, _, calibration, _ = decoder
    work = model.clone()
    head = next(layer for layer in work.layers() if layer.id == "lm_head")
    first = next(layer for layer in work.layers() if layer.id == "transformer.h.0.attn.c_attn")
    annotation.set_weight_bits(head.node, 32)
    annotation.set_weight_bits(first.node, 8)
    result, outcome = Quantizer()(work, calibration, Recipe(method="rtn", bits=4))
    assert "lm_head" in outcome.skipped and "lm_head" not in outcome.layers
    assert next(n for n in result.graph if annotation.layer_id(n) == "lm_head").op_type == "MatMul"
    assert outcome.layers["transformer.h.0.attn.c_attn"]["average_bits"] == 8


def test_embedding_tables_become_gather_block_quantized_lookups(decoder):
    model, _, _, feeds = decoder
    result, outcome = Quantizer()(model, None, Recipe(method="rtn", bits=4, embeddings=8))
    gathers = [n for n in result.graph if n.op_type == "GatherBlockQuantized"]
    assert {annotation.layer_id(n) for n in gathers} == {"transformer.wte", "transformer.wpe"}
    assert outcome.layers["transformer.wte"]["kind"] == "embedding"
    reference = logits(model, feeds)
    got = logits(result, feeds)
    assert np.mean(got.argmax(-1) == reference.argmax(-1)) > 0.9


def test_gptq_without_calibration_data_says_to_give_it(decoder):
    model, _, _, _ = decoder
    with pytest.raises(UsageError, match="--calib"):
        quantize_weights(model, None, Recipe(method="gptq"))


def test_the_pass_memoizes_layers_so_a_repair_rebuild_reuses_them(decoder):
    model, _, calibration, _ = decoder
    quantize = QuantizeWeights(method="gptq", bits=4)
    ctx = PassContext(calibration=calibration)
    first = quantize.run(model, ctx).model
    memo = dict(quantize._quantizer._layers)
    work = model.clone()
    annotation.set_weight_bits(next(layer for layer in work.layers() if layer.id == "lm_head").node, 32)
    second = quantize.run(work, PassContext(calibration=calibration)).model
    assert quantize._quantizer._layers.keys() == memo.keys()  # nothing new was rounded
    assert all(isinstance(v, QuantizedLayer) for v in memo.values())
    assert ctx.records["weight_only"]["weight_bytes"]["after"] < ctx.records["weight_only"]["weight_bytes"]["before"]
    assert sum(n.op_type == "MatMulNBits" for n in second.graph) == sum(n.op_type == "MatMulNBits"
                                                                         for n in first.graph) - 1


def test_a_gemm_layer_with_transposed_weight_and_bias_stays_exact():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bitpass.frontend import from_proto
    from bitpass.passes.weight_only.grid import rtn

    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((24, 64)).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="fc", transB=1, beta=0.5)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 24])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    layer = model.layers()[0]
    assert linear_weight(layer).shape == (64, 24)
    result, _ = quantize_weights(model, None, Recipe(method="rtn", bits=8, accuracy_level=0))
    x = rng.standard_normal((5, 64)).astype(np.float32)
    got = ort.InferenceSession(result.to_bytes(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = x @ rtn(w.T.copy(), 8, 32).dequantize() + 0.5 * b
    np.testing.assert_allclose(got, want, atol=1e-4)
    onnx.checker.check_model(result.to_proto())


def test_worker_processes_round_the_same_codes_and_write_the_same_model(decoder):
    from bitpass.passes.executors import ProcessExecutor

    model, _, calibration, _ = decoder
    recipe = Recipe(method="gptq", bits=3, group_size=32)  # mixed 2/4/8 by group
    serial, serial_record = quantize_weights(model, calibration, recipe)
    parallel, parallel_record = quantize_weights(model, calibration, recipe, executor=ProcessExecutor(2))
    assert parallel.to_bytes() == serial.to_bytes(), "the artifact does not depend on where layers were rounded"
    assert parallel_record == serial_record


def test_a_local_ray_cluster_rounds_the_same_codes_and_writes_the_same_model(decoder):
    pytest.importorskip("ray", reason="Ray is in the test extra; install it to run the scale-out check")
    from bitpass.passes.executors import executor_from_spec

    model, _, calibration, _ = decoder
    recipe = Recipe(method="gptq", bits=3, group_size=32)
    serial, serial_record = quantize_weights(model, calibration, recipe)
    with executor_from_spec("ray") as executor:  # ray.init() on this machine
        assert executor.workers >= 1 and executor.spec == "ray"
        on_ray, ray_record = quantize_weights(model, calibration, recipe, executor=executor)
    assert on_ray.to_bytes() == serial.to_bytes()
    assert ray_record == serial_record


def test_two_level_mixes_the_two_widths_around_the_average_within_the_bytes_budget_and_matches_torch(decoder):
    from bitpass.passes.weight_only.apply import apply_to_torch
    from bitpass.tools import decoders

    model, _, calibration, feeds = decoder
    quantizer = Quantizer()
    recipe = Recipe(method="gptq", bits=3, group_size=32, allocation="two-level", steps=2, score="error",
                    accuracy_level=0)
    result, outcome = quantizer(model, calibration, recipe)
    record = outcome.record(recipe)
    assert record["allocation"] == "two-level" and record["two_level"] == {"widths": [2, 4], "steps": 2,
                                                                           "score": "error"}
    assert {w for layer in outcome.layers.values() if layer["kind"] == "linear" for w in layer["widths"]} == {"2", "4"}
    low = sum(Quantizer()(model, calibration, Recipe(method="rtn", bits=b, group_size=32))[1].layers[i]["bytes"]
              for b in (2, 4) for i in outcome.layers) / 2  # the bytes of every layer at 3 bits, interpolated
    assert sum(layer["bytes"] for layer in outcome.layers.values()) <= low
    assert {n.attributes.get_int("bits", 0) for n in result.graph if n.op_type == "MatMulNBits"} == {2, 4}
    # the artifact computes in ONNX Runtime what the torch module computes with the chosen codes' weights
    lm = decoders.tiny_gpt2(width=64)
    chosen = {key[0]: layer for key, layer in quantizer._layers.items() if key[0] in outcome.layers}
    assert len(chosen) == len(outcome.layers)
    apply_to_torch(lm, chosen)
    import torch

    with torch.no_grad():
        want = lm(input_ids=torch.from_numpy(feeds["input_ids"])).logits.numpy()
    np.testing.assert_allclose(logits(result, feeds), want, atol=5e-4)


def test_two_level_spends_the_wide_codes_where_the_chosen_score_says(decoder):
    """The knapsack follows its score: by layer-local errors and by the model's output KL it may pick
    differently, but either way it stays at the budget and every layer is a mixture of the two widths."""
    model, _, calibration, _ = decoder
    by_error = Quantizer()(model, calibration, Recipe(bits=3, allocation="two-level", steps=2, score="error"))[1]
    by_kl = Quantizer()(model, calibration, Recipe(bits=3, allocation="two-level", steps=2, score="output-kl",
                                                   score_samples=4))[1]
    for outcome in (by_error, by_kl):
        bits = [layer["average_bits"] for layer in outcome.layers.values() if layer["kind"] == "linear"]
        assert all(2 <= b <= 4 for b in bits) and len(set(bits)) > 1
    assert by_kl.record(Recipe(bits=3, allocation="two-level", score="output-kl"))["two_level"]["score"] == \
        "output-kl"


def test_two_level_needs_gptq_and_an_average_between_two_widths_matmulnbits_runs():
    with pytest.raises(UsageError, match="two-level"):
        Recipe(method="rtn", bits=3, allocation="two-level")
    with pytest.raises(UsageError, match="allocation"):
        Recipe(bits=3, allocation="three-level")
    assert Recipe(bits=3, allocation="two-level").two_widths == (2, 4)
    assert Recipe(bits=6, allocation="two-level").two_widths == (4, 8)
    assert QuantizeWeights(bits=3.5, allocation="group").recipe().allocation == "group"
    # the pass's default where it applies (GPTQ on integer grids), group elsewhere
    assert (QuantizeWeights(bits=3.5).recipe().allocation, QuantizeWeights(bits=3.5).recipe().score) == \
        ("two-level", "output-kl")
    assert QuantizeWeights(bits=3.5, method="rtn").recipe().allocation == "group"


def test_two_level_on_worker_processes_writes_the_serial_model(decoder):
    from bitpass.passes.executors import ProcessExecutor

    model, _, calibration, _ = decoder
    recipe = Recipe(bits=3, group_size=32, allocation="two-level", steps=2, score="output-kl", score_samples=4)
    serial, serial_record = quantize_weights(model, calibration, recipe)
    parallel, parallel_record = quantize_weights(model, calibration, recipe, executor=ProcessExecutor(2))
    assert parallel.to_bytes() == serial.to_bytes() and parallel_record == serial_record
