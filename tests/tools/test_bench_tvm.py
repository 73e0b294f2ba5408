"""The per-conv comparison in ``bench_tvm --only kernels``: ORT's side must run what it claims to run; the
``profile`` section's per-kind split of ORT's own profile; the clocks rounds are timed by."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bitpass.tools import bench_tvm
from bitpass.tools.bench_tvm import conv_model_fp32, conv_model_u8s8, print_convs, profile_ort, rotation, tvm_op_kind


def _session(model: bytes, optimized: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def test_u8s8_conv_runs_as_qlinearconv_and_matches_the_fp32_conv(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 10, 10)).astype(np.float32)
    w = (rng.standard_normal((32, 16, 3, 3)) / 12).astype(np.float32)
    want = _session(conv_model_fp32(x, w, 2, 1)).run(None, {"x": x})[0]
    assert want.shape == (1, 32, 5, 5) and want.min() >= 0  # Conv + ReLU
    optimized = tmp_path / "optimized.onnx"
    got = _session(conv_model_u8s8(x, w, 2, 1, float(want.max())), str(optimized)).run(None, {"x": x})[0]
    ops = {node.op_type for node in onnx.load(optimized).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops, ops
    # 8-bit input, weights and output: off by quantization error only
    assert np.abs(got - want).max() < 0.05 * want.max()


def test_conv_table_prints_gmacs_and_ratios_per_variant(capsys):
    seconds = {"TVM fp32": 2e-3, "ORT fp32": 1e-3, "TVM int8": 1e-3, "ORT U8S8": 2e-3}
    print_convs([("64->64 56x56 k3 s1", seconds, 2_000_000_000)], threads=2)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("64->64"))
    values = [float(v) for v in row.split()[4:]]
    assert values == [1000.0, 2000.0, 2000.0, 1000.0, 0.5, 2.0]


def test_profile_puts_ort_qlinearconv_time_under_conv_and_vm_functions_by_name():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 20, 20)).astype(np.float32)
    w = (rng.standard_normal((32, 16, 3, 3)) / 12).astype(np.float32)
    kinds = profile_ort(conv_model_u8s8(x, w, 1, 1, 4.0), {"x": x}, threads=1, calls=3)
    assert kinds["conv"] > 0 and kinds["quantize"] > 0 and kinds["pool"] == 0 and kinds["dense"] == 0
    assert kinds["whole"] >= kinds["conv"]
    assert [tvm_op_kind(n) for n in ("bitpass_conv2d_int83", "max_pool2d1", "bitpass_dense", "mean")] == \
        ["conv", "pool", "dense", "other"]


def test_each_round_starts_with_another_variant():
    """Timed alternately, the variant that runs right after another runtime's changes from round to round."""
    names = ["ORT fp32", "ORT U8S8", "TVM fp32", "TVM int8"]
    orders = [rotation(names, i) for i in range(4)]
    assert [order[0] for order in orders] == names
    assert all(sorted(order) == sorted(names) for order in orders)
    assert rotation(names, 5) == orders[1]


def test_the_thread_clock_leaves_out_time_the_calling_thread_does_not_run(monkeypatch):
    """``--clock thread``: a call that waits (as a call does while other processes hold the core) costs the
    thread's CPU time only; wall time counts the wait. Only at one thread: other threads' work would not count."""
    monkeypatch.setattr(bench_tvm, "_clock", bench_tvm._clock)
    wait = {"wait": lambda: time.sleep(0.005)}
    bench_tvm.use_clock("wall", threads=2)
    assert min(bench_tvm._samples(wait, rounds=2, min_seconds=0.01)["wait"]) >= 0.005
    bench_tvm.use_clock("thread", threads=1)
    assert max(bench_tvm._samples(wait, rounds=2, min_seconds=0.01)["wait"]) < 0.002
    with pytest.raises(ValueError, match="--threads 1"):
        bench_tvm.use_clock("thread", threads=2)


def test_layers_pair_each_conv_of_a_call_by_weight_size_and_order(tmp_path):
    """``--only layers``: ORT's profile gives each conv of a call its own key (weight elements, how many convs
    of that size ran before it in the call) and a label from its shapes; one time per call and key. (ORT's NCHWc
    convs on AVX-512 pad channels to blocks of 16: whole blocks here, as in ResNet.)"""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    shapes = ((16, 4, 3, 3), (16, 16, 1, 1), (16, 16, 1, 1))
    ws = [rng.standard_normal(shape).astype(np.float32) / 10 for shape in shapes]
    names = ["x", "a", "b", "y"]
    nodes = [helper.make_node("Conv", [names[i], f"w{i}"], [names[i + 1]], pads=[1] * 4 if i == 0 else [0] * 4)
             for i in range(3)]
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()
    session = bench_tvm._ort_profiled(model, 1, tmp_path)
    seconds, labels = bench_tvm.ort_conv_seconds(session, {"x": rng.standard_normal((1, 4, 6, 6), np.float32)}, 3)
    assert sorted(seconds) == [(256, 0), (256, 1), (576, 0)]
    assert all(len(v) == 3 and min(v) > 0 for v in seconds.values())
    assert labels[(576, 0)] == "4->16 6x6->6x6 k3" and labels[(256, 1)] == "16->16 6x6->6x6 k1"


def test_a_round_on_a_shared_machine_is_left_out():
    """A round counts only where ORT's convs sped up at least ``min_speedup`` times from 1 to 2 threads."""
    def round_(two: float) -> dict:
        return {("ORT", 1): {(64, 0): [2.0, 2.0]}, ("ORT", 2): {(64, 0): [two, two]}}

    assert bench_tvm.quiet_round(round_(1.1), (1, 2), 1.6)
    assert not bench_tvm.quiet_round(round_(1.9), (1, 2), 1.6)
    assert bench_tvm.quiet_round(round_(1.9), (1,), 1.6)


def test_toggle_flips_a_schedule_flag_while_building_and_restores_it():
    from bitpass.backends.tvm import schedules

    before = schedules.ONE_LAUNCH
    with bench_tvm._flipped("schedules.ONE_LAUNCH"):
        assert schedules.ONE_LAUNCH is not before
    assert schedules.ONE_LAUNCH is before
    for wrong in ("schedules.ROW_BANDS", "schedules.NO_SUCH_FLAG", "no_such_module.FLAG", "ONE_LAUNCH"):
        with pytest.raises(ValueError, match="give MODULE.FLAG"), bench_tvm._flipped(wrong):
            pass


@pytest.mark.parametrize("section", ["layers", "models"])
def test_a_wrong_toggle_is_one_line_and_a_non_zero_exit_before_any_build(section, capsys, monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "1")  # main sets it where unset; the test leaves the environment as it was
    assert bench_tvm.main(["--only", section, "--toggle", "schedules.NO_SUCH_FLAG"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench_tvm: --toggle schedules.NO_SUCH_FLAG") and "\n" not in err


def test_fp32_nchw_is_the_blocked_layouts_toggle_and_takes_no_other():
    with pytest.raises(SystemExit):
        bench_tvm.main(["--only", "models", "--fp32-nchw", "--toggle", "schedules.ROW_BANDED"])
