"""bitpass's TVM kernels, scheduled by the rules for the host's features, against numpy."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="the TVM backend needs apache-tvm (pip install -e '.[tvm]')")
from tvm import te  # noqa: E402

from bitpass.backends.tvm import kernels, schedules, targets  # noqa: E402

SPEC = targets.get(targets.host_target())
LANES = schedules.vector_lanes(SPEC.features)
rng = np.random.default_rng(0)


def _build(tensors, kind: str, nb: int):
    func = te.create_prim_func(tensors).with_attr({"bitpass.kernel": kind, "bitpass.nb": nb})
    target = SPEC.tvm_target()
    mod = schedules.apply_rules(tvm.IRModule({"main": func}), target)
    assert mod["main"].attrs["tirx.is_scheduled"], "the rule did not schedule the kernel"
    return tvm.compile(mod, target=target)["main"]


def _run(func, *arrays, out_shape):
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32), dev)
    func(*[tvm.runtime.tensor(a, dev) for a in arrays], out)
    return out.numpy()


@pytest.mark.parametrize(("m", "k", "n", "act"), [(1, 256, 64, "none"), (5, 64, 48, "relu"), (4, 32, 10, "none")])
def test_dense_fp32_matches_numpy(m, k, n, act):
    nb = kernels.out_block(n, LANES)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (n,)))
    tx, tw, tb = te.placeholder((m, k), "float32"), te.placeholder((n // nb, k, nb), "float32"), \
        te.placeholder((n,), "float32")
    func = _build([tx, tw, tb, kernels.dense(tx, tw, tb, act=act)], "dense", nb)
    want = x @ w + b
    want = np.maximum(want, 0) if act == "relu" else want
    np.testing.assert_allclose(_run(func, x, kernels.pack_dense(w, nb), b, out_shape=(m, n)), want,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("m", "k", "n"), [(1, 256, 64), (3, 128, 32)])
def test_dense_int8_is_integer_arithmetic_with_requantization(m, k, n):
    nb = kernels.out_block(n, LANES)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (n,)))
    codes, scale = kernels.quantize_int8(w, nb)
    tx, tc, ts, tb = te.placeholder((m, k), "float32"), te.placeholder(codes.shape, "int8"), \
        te.placeholder((n,), "float32"), te.placeholder((n,), "float32")
    func = _build([tx, tc, ts, tb, kernels.dense_int8(tx, tc, ts, tb)], "dense_int8", nb)
    got = _run(func, x, codes, scale, b, out_shape=(m, n))
    # numpy: the same per-row int8 activations, int32 accumulation, fp32 requantization
    sx = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-12) / 127
    xq = np.round(x / sx).astype(np.int32)
    wq = codes.transpose(1, 0, 2).reshape(k, n).astype(np.int32)
    want = (xq @ wq).astype(np.float32) * sx * scale + b
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # and close to fp32 (quantization error only)
    assert np.abs(got - (x @ w + b)).max() < 0.05 * np.abs(x @ w).max()


@pytest.mark.parametrize(("m", "k", "n"), [(1, 256, 64), (2, 64, 32), (3, 128, 48), (8, 64, 64)])
def test_dense_int4_dequantizes_packed_weights_on_load(m, k, n):
    nb = kernels.int4_out_block(n, LANES)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (n,)))
    q = kernels.quantize_int4(w, nb, 32)
    assert q.codes.dtype == np.uint8 and q.codes.size == k * n // 2
    tx, tc, ts, tb = te.placeholder((m, k), "float32"), te.placeholder(q.codes.shape, "uint8"), \
        te.placeholder(q.scales.shape, "float16"), te.placeholder((n,), "float32")
    func = _build([tx, tc, ts, tb, kernels.dense_int4(tx, tc, ts, tb, block_size=32)], "dense_int4", nb)
    got = _run(func, x, q.codes, q.scales, b, out_shape=(m, n))
    np.testing.assert_allclose(got, x @ kernels.dequantize_int4(q) + b, rtol=1e-4, atol=1e-4)
    assert np.abs(kernels.dequantize_int4(q) - w).max() <= np.abs(w).max() / 7 / 2 * 1.01


def _conv_ref(x, w, b, stride, pad, groups):
    n, c, h, wd = x.shape
    oc, icg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, oc, oh, ow), np.float64)
    ocg = oc // groups
    for o in range(oc):
        g = o // ocg
        for y in range(oh):
            for xx in range(ow):
                patch = xp[:, g * icg:(g + 1) * icg, y * stride:y * stride + kh, xx * stride:xx * stride + kw]
                out[:, o, y, xx] = (patch * w[o]).sum(axis=(1, 2, 3))
    return out + b[None, :, None, None]


@pytest.mark.parametrize(("c", "oc", "hw", "stride", "pad", "groups"),
                         [(3, 16, 8, 1, 1, 1), (8, 32, 9, 2, 1, 1), (16, 16, 8, 1, 1, 16)])
def test_conv2d_matches_numpy_including_depthwise(c, oc, hw, stride, pad, groups):
    ob = kernels.out_block(oc // groups if groups > 1 else oc, LANES)
    x = rng.standard_normal((2, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((oc, c // groups, 3, 3)).astype(np.float32)
    b = rng.standard_normal(oc).astype(np.float32)
    tx, tw, tb = te.placeholder(x.shape, "float32"), te.placeholder((oc // ob, c // groups, 3, 3, ob), "float32"), \
        te.placeholder((oc,), "float32")
    out = kernels.conv2d(tx, tw, tb, strides=(stride, stride), pads=(pad,) * 4, dilations=(1, 1), groups=groups,
                         act="relu")
    func = _build([tx, tw, tb, out], "conv2d", ob)
    want = np.maximum(_conv_ref(x, w, b, stride, pad, groups), 0)
    np.testing.assert_allclose(_run(func, x, kernels.pack_conv(w, ob), b, out_shape=want.shape), want,
                               rtol=1e-4, atol=1e-4)


def test_targets_registry_and_host_detection():
    assert {"x86-64-avx2", "x86-64-avx512", "aarch64-neon", "aarch64-dotprod"} <= set(targets.TARGETS)
    for spec in targets.TARGETS.values():
        target = spec.tvm_target()
        assert str(target.attrs["mtriple"]) == spec.triple
        assert schedules.features_of(target) >= spec.features - {"fma"}
    assert targets.get("aarch64-neon").cross_compiler == "aarch64-linux-gnu-gcc"
    assert targets._cpuinfo_flags("flags\t: fpu avx2 fma avx512f\n") >= {"avx2", "avx512f"}
    assert targets.host_target() in targets.TARGETS
