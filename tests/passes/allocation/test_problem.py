"""The problem model on a small hand-built ONNX graph: widths, costs (size, avg-bits, BOPs, latency) and Ω."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.frontend import from_proto
from bitpass.frontend.errors import UsageError
from bitpass.passes.allocation.problem import Problem, fake_quantize, quantization_error, weight_bytes
from bitpass.passes.sensitivity.quant import fake_quantize as per_channel_fake_quantize


def small_model(batch: int | str = 1):
    """Conv 3→8 (3×3, pad 1) on 8×8 → Flatten → Gemm 512→10 (transB) → MatMul 10→4."""
    rng = np.random.default_rng(0)
    conv_w = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    gemm_w = rng.normal(size=(10, 512)).astype(np.float32)
    gemm_b = np.zeros(10, np.float32)
    mm_w = rng.normal(size=(10, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["g"], transB=1, name="fc"),
        helper.make_node("MatMul", ["g", "head.weight"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
        [numpy_helper.from_array(conv_w, "conv.weight"), numpy_helper.from_array(gemm_w, "fc.weight"),
         numpy_helper.from_array(gemm_b, "fc.bias"), numpy_helper.from_array(mm_w, "head.weight")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return from_proto(proto, name="small")


SENSITIVITY = {"conv": 2.0, "fc": 1.0, "head": 0.5}


def test_fake_quantize_per_channel_is_the_sensitivity_helpers_and_blocks_refine_it():
    w = np.random.default_rng(1).normal(size=(16, 128)).astype(np.float32)
    assert np.array_equal(fake_quantize(w, 8, axis=0), per_channel_fake_quantize(w, 8, 0))
    assert np.array_equal(fake_quantize(w, 32), w)
    for bits in (2, 4, 8):
        levels = 2 ** (bits - 1) - 1
        q = fake_quantize(w, bits, axis=0, group_size=32)
        assert q.shape == w.shape and q.dtype == w.dtype
        for row, qrow in zip(w, q):  # every 32-block has its own symmetric grid
            for block, qblock in zip(row.reshape(-1, 32), qrow.reshape(-1, 32)):
                scale = np.abs(block).max() / levels
                assert np.allclose(qblock / scale, np.rint(qblock / scale), atol=1e-3)
        assert quantization_error(w, bits, 0, 32) <= quantization_error(w, bits, 0) + 1e-9
    assert quantization_error(w, 2) > quantization_error(w, 4) > quantization_error(w, 8) > 0


def test_fake_quantize_blocks_follow_the_channel_axis_and_pad_the_last_block():
    w = np.random.default_rng(2).normal(size=(40, 6)).astype(np.float32)  # MatMul (K=40, N=6), channels on 1
    q = fake_quantize(w, 4, axis=1, group_size=32)
    for n in range(6):
        column = w[:, n]
        for block, qblock in ((column[:32], q[:32, n]), (column[32:], q[32:, n])):
            scale = np.abs(block).max() / 7
            assert np.allclose(qblock / scale, np.rint(qblock / scale), atol=1e-3)


def test_weight_bytes_counts_scales_and_blocks():
    assert weight_bytes(1024, 16, 32) == 4096
    assert weight_bytes(1024, 16, 8) == 1024 + 16 * 4  # per-channel fp32 scale
    assert weight_bytes(1024, 16, 4, 32) == 512 + 32 * 4  # 2 blocks per channel
    assert weight_bytes(1024, 16, 2, 32) == 256 + 32 * 4
    assert weight_bytes(1024, 16, 4, 32, zero_point=True) == 512 + 32 * 4 + 16  # 32 four-bit zero points
    assert weight_bytes(1000, 10, 4, 32) == 500 + 10 * 4 * 4  # 100 per channel → 4 blocks (last partial)


def test_problem_from_a_model_has_every_layer_and_width():
    model = small_model()
    problem = Problem.from_model(model, SENSITIVITY)
    assert problem.ids == ["conv", "fc", "head"]
    for layer in problem.layers:
        assert layer.widths == (32, 8, 4, 2)
        assert layer.candidate(32).loss == 0.0
        losses = [layer.candidate(b).loss for b in (8, 4, 2)]
        assert losses == sorted(losses) and losses[0] > 0


def test_widths_come_from_capabilities_a_mapping_or_a_callable():
    from bitpass.backends.base import Capabilities

    model = small_model()
    caps = Capabilities(ops=frozenset(), weight_bits={"Conv": (4, 8, 32), "Gemm": (2, 4, 8, 32)})
    problem = Problem.from_model(model, SENSITIVITY, widths=caps)
    assert problem.layer("conv").widths == (32, 8, 4)
    assert problem.layer("fc").widths == (32, 8, 4, 2)
    assert problem.layer("head").widths == (32,)  # MatMul not in the table: fp32 only
    assert Problem.from_model(model, SENSITIVITY, widths={"Conv": (8,)}).layer("conv").widths == (32, 8)
    assert Problem.from_model(model, SENSITIVITY, widths=lambda op: (4,)).layer("fc").widths == (32, 4)
    assert Problem.from_model(model, SENSITIVITY, keep_fp32={"fc"}).layer("fc").widths == (32,)


def test_costs_of_each_dimension():
    model = small_model()
    latency = {"conv": {32: 3e-6, 8: 2e-6, 4: 2e-6, 2: 2e-6}, "fc": {"32": 5e-6, "8": 2e-6, "4": 1e-6, "2": 1e-6},
               "head": {32: 1e-6, 8: 1e-6, 4: 1e-6, 2: 1e-6}}
    problem = Problem.from_model(model, SENSITIVITY, latency=latency)
    total = 216 + 5120 + 40
    conv, fc, head = (problem.layer(i) for i in ("conv", "fc", "head"))
    # size: conv 216 weights in 8 channels; fc (10, 512) transB → 10 channels of 512; head (10, 4) → 4 of 10
    assert conv.candidate(8).cost["size"] == 216 + 8 * 4
    assert fc.candidate(4).cost["size"] == 2560 + 10 * 16 * 4
    assert head.candidate(2).cost["size"] == 10 + 4 * 1 * 4
    assert problem.base["size"] == 40  # the Gemm bias, kept as stored
    assert problem.cost(problem.highest_plan(), "size") == total * 4 + 40
    # avg-bits adds up to the parameter-weighted mean
    plan = {"conv": 8, "fc": 4, "head": 2}
    assert problem.cost(plan, "avg-bits") == pytest.approx((216 * 8 + 5120 * 4 + 40 * 2) / total)
    # BOPs: MACs per sample × w bits × a bits; conv MACs = 216 weights × 8×8 output positions
    assert conv.candidate(8).cost["bops"] == 216 * 64 * 8 * 8
    assert conv.candidate(32).cost["bops"] == 216 * 64 * 32 * 32
    assert fc.candidate(4).cost["bops"] == 5120 * 4 * 8
    assert head.candidate(2).cost["bops"] == 40 * 2 * 8
    # latency from the table, JSON string keys accepted
    assert problem.cost(plan, "latency") == pytest.approx(2e-6 + 1e-6 + 1e-6)
    assert set(problem.totals(plan)) == {"size", "avg-bits", "bops", "latency", "loss"}


def test_conv_macs_come_from_shape_inference_when_the_ir_has_no_shape():
    model = small_model()
    for node in model.graph:
        for value in node.outputs:
            value.shape = None  # as if the importer had kept no shapes
    problem = Problem.from_model(model, SENSITIVITY)
    assert problem.layer("conv").candidate(8).cost["bops"] == 216 * 64 * 64


def test_bops_of_a_conv_with_an_unknown_output_size_is_a_clear_error():
    from bitpass.passes.allocation.solvers import solve

    model = small_model(batch="N")
    for node in model.graph:
        for value in node.outputs:
            value.shape = None
    model.graph.inputs[0].shape = None  # nothing to infer from
    problem = Problem.from_model(model, SENSITIVITY)
    assert math.isnan(problem.layer("conv").candidate(8).cost["bops"])
    assert problem.known("size") and not problem.known("bops")
    with pytest.raises(UsageError, match="BOPs need the output size.*conv"):
        solve(problem, "bops=1M", "ilp")


def test_loss_is_sensitivity_times_the_quantization_error():
    model = small_model()
    problem = Problem.from_model(model, SENSITIVITY, group_size=32)
    w = model.layer("fc").weight_array
    assert problem.layer("fc").candidate(8).loss == pytest.approx(1.0 * quantization_error(w, 8, 0))
    assert problem.layer("fc").candidate(4).loss == pytest.approx(1.0 * quantization_error(w, 4, 0, 32))
    doubled = Problem.from_model(model, {k: 2 * v for k, v in SENSITIVITY.items()})
    assert doubled.layer("conv").candidate(2).loss == pytest.approx(2 * problem.layer("conv").candidate(2).loss)


def test_a_per_bit_table_is_used_as_is_and_limits_the_widths():
    model = small_model()
    table = {"conv": {"2": 9.0, "4": 3.0, "8": 1.0}, "fc": {2: 5.0, 8: 0.5}, "head": {4: 0.1, 8: 0.01}}
    problem = Problem.from_model(model, table)
    assert problem.layer("conv").candidate(4).loss == 3.0
    assert problem.layer("fc").widths == (32, 8, 2)
    assert problem.layer("head").candidate(32).loss == 0.0


def test_a_layer_without_sensitivity_is_named():
    with pytest.raises(UsageError, match="no sensitivity for layer.*head"):
        Problem.from_model(small_model(), {"conv": 1.0, "fc": 1.0})
