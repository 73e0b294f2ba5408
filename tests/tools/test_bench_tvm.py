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
