"""bitpass's TVM kernels, scheduled by the rules for the host's features, against numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="the TVM backend needs apache-tvm (pip install -e '.[tvm]')")
from tvm import te  # noqa: E402

from bitpass.backends.tvm import kernels, schedules, targets  # noqa: E402
from bitpass.backends.tvm.kernel_attrs import KernelAttrs  # noqa: E402

SPEC = targets.get(targets.host_target())
LANES = schedules.vector_lanes(SPEC.features)
rng = np.random.default_rng(0)
#: the host's target and a plain x86-64 one (the portable TE schedules, which aarch64 gets)
HOST = SPEC.tvm_dict()
PORTABLE = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64", "num-cores": 1}


class Path:
    """One kernel path: a target, the features its rules see and the kernel scheme (lanes, int8 codes)."""

    def __init__(self, name: str, target: dict, features: frozenset[str], intrinsic: str | None) -> None:
        self.name, self.target, self.features, self.intrinsic = name, target, features, intrinsic
        self.scheme = kernels.scheme_for(features)
        self.lanes = self.scheme.lanes
        self.levels = self.scheme.int8_levels


#: AVX-512 VNNI micro-kernels (vpdpbusd), AVX2 micro-kernels (vpmaddubsw), portable TE schedules; a path
#: whose features this CPU lacks is skipped
PATHS = [Path("vnni", targets.get("x86-64-avx512").tvm_dict(), targets.get("x86-64-avx512").features, "vpdpbusd"),
         Path("avx2", targets.get("x86-64-avx2").tvm_dict(), targets.get("x86-64-avx2").features, "pmadd"),
         Path("portable", PORTABLE, frozenset(), None)]


@pytest.fixture(params=PATHS, ids=[p.name for p in PATHS])
def path(request) -> Path:
    if not request.param.features <= targets.host_features():
        pytest.skip(f"this CPU lacks {sorted(request.param.features - targets.host_features())}")
    return request.param


def _build(tensors, kind: str, nb: int, target: dict | None = None, *, intrinsic: str | None = None, **attrs):
    """Schedule with the rules for ``target`` and compile; ``intrinsic``: the hand-written micro-kernel
    (its LLVM intrinsic's name) must have replaced the TE compute, where the path has one."""
    func = KernelAttrs(kind, nb, **attrs).tag(te.create_prim_func(tensors))
    target = tvm.target.Target(target or HOST)
    mod = schedules.apply_rules(tvm.IRModule({"main": func}), target)
    assert mod["main"].attrs["tirx.is_scheduled"], "the rule did not schedule the kernel"
    if intrinsic is not None:
        assert intrinsic in mod.script(), f"the {intrinsic} micro-kernel was not used"
    return tvm.compile(mod, target=target)["main"]


def _run(func, *arrays, out_shape):
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32), dev)
    func(*[tvm.runtime.tensor(a, dev) for a in arrays], out)
    return out.numpy()


@pytest.mark.parametrize(("m", "k", "n", "act"), [(1, 256, 64, "none"), (5, 64, 48, "relu"), (4, 32, 10, "none"),
                                                 (64, 128, 96, "relu"), (1, 512, 1000, "none")])
def test_dense_fp32_matches_numpy(m, k, n, act, path):
    nb = kernels.out_block(n, path.lanes)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (n,)))
    tx, tw, tb = te.placeholder((m, k), "float32"), te.placeholder((n // nb, k, nb), "float32"), \
        te.placeholder((n,), "float32")
    func = _build([tx, tw, tb, kernels.dense(tx, tw, tb, act=act)], "dense", nb, path.target, act=act)
    want = x @ w + b
    want = np.maximum(want, 0) if act == "relu" else want
    np.testing.assert_allclose(_run(func, x, kernels.pack_dense(w, nb), b, out_shape=(m, n)), want,
                               rtol=1e-4, atol=1e-4)


def _int8_reference(x: np.ndarray, codes: np.ndarray, sw: np.ndarray, b: np.ndarray, levels: int) -> np.ndarray:
    """numpy: activations per row in ±levels, integer product with the weight codes, fp32 requantization."""
    amax = np.maximum(np.abs(x).max(axis=1, keepdims=True), np.float32(1e-12))
    xq = np.round(x * (np.float32(levels) / amax)).astype(np.int64)
    acc = xq @ kernels.int8_codes(codes, x.shape[1], levels).astype(np.int64)
    return acc * (amax / np.float32(levels)).astype(np.float64) * sw + b


@pytest.mark.parametrize(("m", "k", "n", "act"),
                         [(1, 256, 64, "none"), (1, 1024, 64, "relu"), (64, 1024, 64, "none"), (64, 64, 192, "relu"),
                          (64, 256, 64, "none"), (64, 1024, 256, "relu"), (3, 128, 32, "none"), (5, 60, 48, "relu"),
                          (64, 36, 10, "none"), (16, 200, 16, "relu")])
def test_dense_int8_is_integer_arithmetic_with_requantization(m, k, n, act, path):
    """M = 1 and 64; both AVX2 loop orders (row tiles first for small weights at M = 64, output blocks first
    for M = 1 or large weights), K not a multiple of 8 (zero-padded), N below a vector (portable schedule)."""
    nb = kernels.out_block(n, path.lanes)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (n,)))
    codes, sw = kernels.quantize_int8(w, nb, path.levels)
    assert codes.dtype == np.uint8 and codes.nbytes == kernels.dense_int8_depth(k) * n
    np.testing.assert_array_equal(kernels.int8_codes(codes, k, path.levels),
                                  np.clip(np.rint(w / sw), -path.levels, path.levels))  # lossless packing
    tx, tc, ts, tb = te.placeholder((m, k), "float32"), te.placeholder(codes.shape, "uint8"), \
        te.placeholder((n,), "float32"), te.placeholder((n,), "float32")
    hand = path.intrinsic if nb % path.lanes == 0 else None
    func = _build([tx, tc, ts, tb, kernels.dense_int8(tx, tc, ts, tb, act=act, levels=path.levels)], "dense_int8", nb,
                  path.target, intrinsic=hand, act=act, levels=path.levels)
    got = _run(func, x, codes, sw, b, out_shape=(m, n))
    want = _int8_reference(x, codes, sw, b, path.levels)
    want = np.maximum(want, 0) if act == "relu" else want
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # and close to fp32 (quantization error only)
    exact = x @ w + b
    exact = np.maximum(exact, 0) if act == "relu" else exact
    assert np.abs(got - exact).max() < 0.05 * np.abs(x @ w).max()


def _int4_reference(x: np.ndarray, q: kernels.Int4Weight) -> np.ndarray:
    """numpy: int8 activations per block, Σ code·x_q per block in integers, scaled per block in fp32."""
    bs = q.block_size
    xq, sx = kernels.quantize_rows_blockwise(x, bs)
    codes = kernels.int4_codes(q).astype(np.int64)
    blocks, nkb, nb = q.scales.shape
    sw = q.scales.astype(np.float32).transpose(1, 0, 2).reshape(nkb, blocks * nb)
    out = np.zeros((x.shape[0], blocks * nb))
    for b in range(nkb):
        part = xq[:, b * bs:(b + 1) * bs].astype(np.int64) @ codes[b * bs:(b + 1) * bs]
        out += part * (sx[:, b:b + 1] * sw[b])
    return out


@pytest.mark.parametrize(("m", "k", "n", "bs", "act"),
                         [(1, 256, 64, 32, "none"), (2, 64, 32, 32, "relu"), (3, 128, 48, 64, "none"),
                          (8, 64, 64, 32, "relu"), (1, 512, 256, 128, "none"), (2, 64, 12, 32, "none"),
                          (64, 256, 128, 32, "relu"), (64, 128, 64, 128, "none")])
def test_dense_int4_is_integer_arithmetic_on_int8_activations(m, k, n, bs, act, path):
    nb = kernels.int4_out_block(n, path.lanes)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (n,)))
    q = kernels.quantize_int4(w, nb, bs)
    assert q.codes.dtype == np.uint8 and q.codes.size == k * n // 2
    blocks, nkb, _ = q.scales.shape
    sw = np.repeat(q.scales.astype(np.float64).transpose(1, 0, 2).reshape(nkb, n), bs, axis=0)
    np.testing.assert_array_equal(kernels.int4_codes(q), np.clip(np.rint(w / sw), -7, 7))  # the packing is lossless
    assert np.abs(kernels.dequantize_int4(q) - w).max() <= np.abs(w).max() / 7 / 2 * 1.01
    tx, tc, ts, tb = te.placeholder((m, k), "float32"), te.placeholder(q.codes.shape, "uint8"), \
        te.placeholder(q.scales.shape, "float16"), te.placeholder((n,), "float32")
    hand = path.intrinsic if nb % path.lanes == 0 else None
    func = _build([tx, tc, ts, tb, kernels.dense_int4(tx, tc, ts, tb, block_size=bs, act=act)], "dense_int4", nb,
                  path.target, intrinsic=hand, act=act)
    got = _run(func, x, q.codes, q.scales, b, out_shape=(m, n))
    want = _int4_reference(x, q) + b
    want = np.maximum(want, 0) if act == "relu" else want
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # and close to the fp32 product with the dequantized weight (activation quantization error only)
    exact = x @ kernels.dequantize_int4(q)
    assert np.abs(_int4_reference(x, q) - exact).max() < 0.02 * np.abs(exact).max()


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


@pytest.mark.parametrize(("n", "c", "oc", "hw", "stride", "pad", "groups", "residual"),
                         [(1, 3, 16, 8, 1, 1, 1, False), (2, 8, 32, 9, 2, 1, 1, False),
                          (2, 16, 16, 8, 1, 1, 16, False), (1, 32, 32, 14, 1, 1, 1, True),
                          (1, 64, 64, 7, 1, 1, 1, True), (3, 24, 24, 10, 2, 1, 24, False),
                          (64, 16, 32, 6, 1, 1, 1, True), (8, 24, 24, 10, 2, 1, 24, False)])
def test_conv2d_matches_numpy_including_depthwise_and_residual(n, c, oc, hw, stride, pad, groups, residual, path):
    ob = kernels.out_block(oc // groups if groups > 1 else oc, path.lanes)
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((oc, c // groups, 3, 3)).astype(np.float32)
    b = rng.standard_normal(oc).astype(np.float32)
    want = _conv_ref(x, w, b, stride, pad, groups)
    r = rng.standard_normal(want.shape).astype(np.float32) if residual else None
    tx, tw, tb = te.placeholder(x.shape, "float32"), te.placeholder((oc // ob, c // groups, 3, 3, ob), "float32"), \
        te.placeholder((oc,), "float32")
    tr = [te.placeholder(want.shape, "float32")] if residual else []
    geometry = {"strides": (stride, stride), "pads": (pad,) * 4, "dilations": (1, 1), "groups": groups}
    out = kernels.conv2d(tx, tw, tb, *tr, **geometry, act="relu")
    func = _build([tx, tw, tb, *tr, out], "conv2d", ob, path.target, act="relu", residual=residual, **geometry)
    want = np.maximum(want + (r if residual else 0), 0)
    arrays = [x, kernels.pack_conv(w, ob), b, *([r] if residual else [])]
    np.testing.assert_allclose(_run(func, *arrays, out_shape=want.shape), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("n", "c", "oc", "hw", "stride", "residual"), [(1, 64, 128, 14, 2, True), (9, 20, 32, 9, 2, False)])
def test_pointwise_fp32_conv_takes_each_column_tile_through_every_output_block(n, c, oc, hw, stride, residual, path):
    """1×1 fp32 convolutions (ResNet's strided shortcuts) loop over output blocks inside a column tile
    (``schedules.POINTWISE_BLOCKS_INNER``, parallel over tiles); the outputs are the reference's."""
    ob = kernels.out_block(oc, path.lanes)
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((oc, c, 1, 1)).astype(np.float32)
    b = rng.standard_normal(oc).astype(np.float32)
    want = _conv_ref(x, w, b, stride, 0, 1)
    r = rng.standard_normal(want.shape).astype(np.float32) if residual else None
    geometry = {"strides": (stride, stride), "pads": (0,) * 4, "dilations": (1, 1), "groups": 1}
    tx, tw, tb = te.placeholder(x.shape, "float32"), te.placeholder((oc // ob, c, 1, 1, ob), "float32"), \
        te.placeholder((oc,), "float32")
    tr = [te.placeholder(want.shape, "float32")] if residual else []
    out = kernels.conv2d(tx, tw, tb, *tr, **geometry, act="relu")
    func = _build([tx, tw, tb, *tr, out], "conv2d", ob, path.target, act="relu", residual=residual, **geometry)
    want = np.maximum(want + (r if residual else 0), 0)
    got = _run(func, x, kernels.pack_conv(w, ob), b, *([r] if residual else []), out_shape=want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _nchwc(a: np.ndarray, block: int) -> np.ndarray:
    """NCHW -> blocked NCHW{block}c [N, C/block, H, W, block]."""
    n, c, h, w = a.shape
    return np.ascontiguousarray(a.reshape(n, c // block, block, h, w).transpose(0, 1, 3, 4, 2))


@pytest.mark.parametrize(("n", "c", "oc", "k", "stride", "hw", "blocks", "pool"),
                         [(2, 32, 32, 3, 1, 9, (16, 16, 16), (0, 0, 0)), (1, 32, 64, 1, 2, 14, (16, 16, 0), (0, 0, 0)),
                          (1, 32, 32, 3, 1, 7, (16, 0, 16), (0, 0, 0)), (1, 32, 32, 3, 1, 7, (0, 16, 0), (0, 0, 0)),
                          (8, 3, 32, 7, 2, 30, (0, 16, 0), (3, 2, 1))])
def test_fp32_conv_reads_and_writes_blocked_activations(n, c, oc, k, stride, hw, blocks, pool):
    """The fp32 conv with its input, output and residual each NCHW or blocked NCHW16c (``block_in`` /
    ``block_out`` / ``block_res``; blocked weights in reduction order, ``pack_conv(block=)``), a fused max pooling
    writing blocked too (ResNet's stem from batch 8): the NCHW reference's values, in the asked layout. Host
    target (the lowering blocks only on AVX-512; the TE kernel is the same on every path)."""
    block_in, block_out, block_res = blocks
    ob = kernels.out_block(oc, LANES)
    pad = k // 2
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((oc, c, k, k)).astype(np.float32)
    b = rng.standard_normal(oc).astype(np.float32)
    want = _conv_ref(x, w, b, stride, pad, 1)
    r = None if pool[0] else rng.standard_normal(want.shape).astype(np.float32)
    want = np.maximum(want + (0 if r is None else r), 0)
    if pool[0]:
        want = _max_pool_reference(want, *pool)
    xs = _nchwc(x, block_in) if block_in else x
    rs = [] if r is None else [_nchwc(r, block_res) if block_res else r]
    wp = kernels.pack_conv(w, ob, block_in)
    tx, tw = te.placeholder(xs.shape, "float32"), te.placeholder(wp.shape, "float32")
    tb = te.placeholder((oc,), "float32")
    tr = [te.placeholder(a.shape, "float32") for a in rs]
    geometry = {"strides": (stride, stride), "pads": (pad,) * 4, "dilations": (1, 1), "groups": 1}
    out = kernels.conv2d(tx, tw, tb, *tr, **geometry, act="relu", pool=pool, block_in=block_in, block_out=block_out,
                         block_res=block_res)
    func = _build([tx, tw, tb, *tr, out], "conv2d", ob, act="relu", residual=bool(rs), pool=pool, block_in=block_in,
                  block_out=block_out, **geometry)
    want = (_nchwc(want, block_out) if block_out else want).astype(np.float32)
    np.testing.assert_allclose(_run(func, xs, wp, b, *rs, out_shape=want.shape), want, rtol=1e-4, atol=1e-4)


def _bordered(a: np.ndarray, halo: int) -> np.ndarray:
    """A blocked tensor [N, C/16, H, W, 16] with ``halo`` pixels of zeros around each plane."""
    return np.pad(a, ((0, 0), (0, 0), (halo, halo), (halo, halo), (0, 0))) if halo else a


@pytest.mark.parametrize(("n", "c", "oc", "k", "stride", "hw", "halos", "residual"),
                         [(1, 32, 64, 3, 1, 9, (1, 1, 1), True), (2, 32, 32, 3, 1, 7, (1, 1, 0), True),
                          (1, 64, 32, 3, 2, 14, (1, 0, 0), False), (1, 32, 64, 1, 2, 14, (1, 1, 1), True),
                          (1, 16, 32, 3, 1, 8, (2, 1, 0), False), (1, 32, 32, 1, 1, 6, (0, 1, 0), False)])
def test_a_blocked_fp32_conv_reads_and_writes_activations_with_a_zero_border(n, c, oc, k, stride, hw, halos,
                                                                             residual):
    """Blocked NCHW16c activations carrying a border of zeros (``halo_in`` / ``halo_out`` / ``halo_res``): the
    input's border is the conv's padding, read in place; the output's border is written as zeros (the output
    buffer starts as NaN); the residual is read inside its border. The reference's values, on AVX-512 from the
    hand-written kernel (``blocked.conv2d``) that replaces the TE function there."""
    if LANES != 16:
        pytest.skip("blocked activations are kept on AVX-512 only (16 lanes)")
    halo_in, halo_out, halo_res = halos
    pad = k // 2
    ob = kernels.out_block(oc, LANES)
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((oc, c, k, k)).astype(np.float32)
    b = rng.standard_normal(oc).astype(np.float32)
    want = _conv_ref(x, w, b, stride, pad, 1)
    r = rng.standard_normal(want.shape).astype(np.float32)
    want = np.maximum(want + (r if residual else 0), 0)
    xs, wp = _bordered(_nchwc(x, 16), halo_in), kernels.pack_conv(w, ob, 16)
    rs = [_bordered(_nchwc(r, 16), halo_res)] if residual else []
    tx, tw, tb = te.placeholder(xs.shape, "float32"), te.placeholder(wp.shape, "float32"), te.placeholder((oc,))
    tr = [te.placeholder(a.shape, "float32") for a in rs]
    geometry = {"strides": (stride, stride), "pads": (pad,) * 4, "dilations": (1, 1), "groups": 1}
    borders = {"halo_in": halo_in, "halo_out": halo_out, "halo_res": halo_res if residual else 0}
    out = kernels.conv2d(tx, tw, tb, *tr, **geometry, act="relu", block_in=16, block_out=16,
                         block_res=16 if residual else 0, **borders)
    func = KernelAttrs("conv2d", ob, act="relu", residual=residual, block_in=16, block_out=16, **borders,
                       **geometry).tag(te.create_prim_func([tx, tw, tb, *tr, out]))
    mod = schedules.apply_rules(tvm.IRModule({"main": func}), tvm.target.Target(HOST))
    assert "xflat" in mod.script(), "the hand-written blocked conv did not replace the TE function"
    built = tvm.compile(mod, target=tvm.target.Target(HOST))["main"]
    want = _bordered(_nchwc(want.astype(np.float32), 16), halo_out)
    dev = tvm.cpu()
    got = tvm.runtime.tensor(np.full(want.shape, np.nan, np.float32), dev)
    built(*[tvm.runtime.tensor(a, dev) for a in (xs, wp, b, *rs)], got)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)


def test_a_blocked_conv_without_a_border_keeps_the_te_schedule_and_a_wider_padding_is_refused():
    """No border anywhere: the TE function is scheduled as before (a padding stage); an input border narrower than
    the conv's padding is a ValueError (the lowering never asks for it)."""
    if LANES != 16:
        pytest.skip("blocked activations are kept on AVX-512 only (16 lanes)")
    tx, tw, tb = te.placeholder((1, 2, 8, 8, 16)), te.placeholder((1, 2, 3, 3, 16, 32)), te.placeholder((32,))
    geometry = {"strides": (1, 1), "pads": (1,) * 4, "dilations": (1, 1), "groups": 1}
    out = kernels.conv2d(tx, tw, tb, **geometry, act="relu", block_in=16, block_out=16)
    func = KernelAttrs("conv2d", 32, act="relu", block_in=16, block_out=16, **geometry).tag(
        te.create_prim_func([tx, tw, tb, out]))
    script = schedules.apply_rules(tvm.IRModule({"main": func}), tvm.target.Target(HOST)).script()
    assert "conv_pad" in script and "xflat" not in script
    with pytest.raises(ValueError, match="border"):
        kernels.conv2d(tx, tw, tb, **{**geometry, "pads": (2,) * 4}, block_in=16, block_out=16, halo_in=1)


@pytest.mark.parametrize("banded", [True, False])
def test_a_batch_1_fp32_conv_in_row_bands_is_the_reference_conv(banded, monkeypatch):
    """At batch 1 on AVX-512 a strided fp32 conv with small weights splits its output rows into ``ROW_BANDS``
    bands outermost in its parallel loop, its padding banded by rows too (``schedules.ROW_BANDED``): the
    reference's values with bands and without, NCHW16c in and out with a residual, even and odd input sizes."""
    if LANES != 16:
        pytest.skip("row bands are keyed to AVX-512 (16 lanes)")
    monkeypatch.setattr(schedules, "ROW_BANDED", banded)
    assert schedules.row_bands(8, 4 * 32 * 32 * 9, 1, LANES, 2, True) == (schedules.ROW_BANDS if banded else 1)
    for stride, hw in ((2, 16), (2, 15)):  # 8 output rows either way
        x = rng.standard_normal((1, 32, hw, hw)).astype(np.float32)
        w = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
        b = rng.standard_normal(32).astype(np.float32)
        want = _conv_ref(x, w, b, stride, 1, 1)
        r = rng.standard_normal(want.shape).astype(np.float32)
        want = _nchwc(np.maximum(want + r, 0), 16)
        wp = kernels.pack_conv(w, 32, 16)
        tx, tw, tb = (te.placeholder(a.shape, "float32") for a in (_nchwc(x, 16), wp, b))
        tr = te.placeholder(want.shape, "float32")
        geometry = {"strides": (stride, stride), "pads": (1,) * 4, "dilations": (1, 1), "groups": 1}
        out = kernels.conv2d(tx, tw, tb, tr, **geometry, act="relu", block_in=16, block_out=16, block_res=16)
        func = _build([tx, tw, tb, tr, out], "conv2d", 32, act="relu", residual=True, block_in=16, block_out=16,
                      **geometry)
        got = _run(func, _nchwc(x, 16), wp, b, _nchwc(r, 16), out_shape=want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_row_bands_only_for_strided_blocked_convs_at_batch_1_on_avx512_with_weights_in_l2(monkeypatch):
    monkeypatch.setattr(schedules, "ROW_BANDED", True)
    bands = schedules.ROW_BANDS
    assert schedules.row_bands(28, 294_912, 1, 16, 2, True) == bands  # ResNet-18's 64->128 3x3 stride 2
    assert [schedules.row_bands(28, 294_912, 2, 16, 2, True), schedules.row_bands(28, 294_912, 1, 8, 2, True),
            schedules.row_bands(56, 147_456, 1, 16, 1, True), schedules.row_bands(14, 1_179_648, 1, 16, 2, True),
            schedules.row_bands(112, 37_632, 1, 16, 2, False), schedules.row_bands(7, 4096, 1, 16, 2, True),
            schedules.row_bands(2 * bands + 1, 4096, 1, 16, 2, True)] == [1] * 7
    monkeypatch.setattr(schedules, "ROW_BANDED", False)
    assert schedules.row_bands(28, 294_912, 1, 16, 2, True) == 1


@pytest.mark.parametrize(("n", "launches"), [(1, 1), (schedules.PER_SAMPLE_MIN_BATCH, 0)])
def test_a_padded_fp32_conv_pads_and_convolves_in_one_parallel_launch(n, launches):
    """Below the per-sample batch the padding and the tiles are two parallel stages: one launch with a barrier
    between them (``schedules.ONE_LAUNCH``: the pool's threads woken once per call); from it, each sample is
    padded inside the one parallel loop over samples, no launch point needed. The outputs of the one-launch
    schedule are checked against numpy by ``test_conv2d_matches_numpy_including_depthwise_and_residual``."""
    x, w, b = te.placeholder((n, 32, 14, 14), "float32"), te.placeholder((1, 32, 3, 3, 32), "float32"), \
        te.placeholder((32,), "float32")
    geometry = {"strides": (1, 1), "pads": (1,) * 4, "dilations": (1, 1), "groups": 1}
    out = kernels.conv2d(x, w, b, **geometry, act="relu")
    func = KernelAttrs("conv2d", 32, act="relu", **geometry).tag(te.create_prim_func([x, w, b, out]))
    script = schedules.apply_rules(tvm.IRModule({"main": func}), tvm.target.Target(HOST)).script()
    assert script.count("pragma_parallel_launch_point") == launches
    assert script.count("pragma_parallel_barrier_when_finish") == launches


def _conv_int8_reference(x, codes, icg, sw, b, stride, pad, groups, taps=0, levels=kernels.CONV_INT8_LEVELS,
                         amax=None):
    """numpy: activations per sample in ±levels (of ``amax`` per sample, by default max |x|), integer
    convolution of the codes, fp32 requantization."""
    amax = np.abs(x).reshape(len(x), -1).max(axis=1) if amax is None else amax
    amax = np.maximum(amax, np.float32(1e-12))
    xq = np.round(x * (np.float32(levels) / amax)[:, None, None, None])
    acc = _conv_ref(xq.astype(np.float64), kernels.conv_int8_codes(codes, icg, taps).astype(np.float64),
                    np.zeros(len(sw)), stride, pad, groups)
    return acc * ((amax / np.float32(levels))[:, None, None, None] * sw[None, :, None, None]) + b[None, :, None, None]


@pytest.mark.parametrize(("n", "c", "oc", "hw", "stride", "pad", "groups", "residual"),
                         [(1, 1, 16, 8, 1, 1, 1, False), (2, 16, 32, 8, 1, 1, 1, False),
                          (3, 32, 64, 4, 1, 1, 1, False), (2, 3, 16, 9, 2, 1, 1, False), (1, 12, 24, 6, 1, 0, 1, False),
                          (2, 16, 16, 8, 1, 1, 16, False), (1, 6, 8, 5, 1, 1, 1, False), (2, 1, 16, 9, 2, 1, 1, False),
                          (1, 1, 8, 6, 1, 0, 1, False), (1, 64, 64, 7, 1, 1, 1, True), (1, 20, 32, 14, 2, 1, 1, True),
                          (64, 16, 32, 6, 1, 1, 1, True), (64, 32, 32, 5, 1, 1, 32, False)])
def test_conv2d_int8_is_integer_arithmetic_with_requantization(n, c, oc, hw, stride, pad, groups, residual, path):
    """M (batch) 1 and 64, single-channel (taps), channels not a multiple of 4, depthwise, residual epilogue."""
    if residual and not path.scheme.int8_residual:
        pytest.skip(f"the {path.name} int8 conv has no residual epilogue (the lowering does not fuse one)")
    ob = kernels.out_block(oc // groups if groups > 1 else oc, path.lanes)
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((oc, c // groups, 3, 3)).astype(np.float32)
    b = rng.standard_normal(oc).astype(np.float32)
    taps = kernels.conv_int8_taps(c // groups, 3, 1)
    assert bool(taps) == (c // groups == 1)
    codes, sw = kernels.quantize_conv_int8(w, ob, taps, path.levels)
    assert codes.dtype == np.int8 and np.abs(codes).max() <= path.levels
    np.testing.assert_array_equal(kernels.conv_int8_codes(codes, c // groups, taps),
                                  np.clip(np.rint(w / sw[:, None, None, None]), -path.levels, path.levels))  # lossless
    want = _conv_int8_reference(x, codes, c // groups, sw, b, stride, pad, groups, taps, path.levels)
    r = rng.standard_normal(want.shape).astype(np.float32) if residual else None
    tx, tc, ts, tb = te.placeholder(x.shape, "float32"), te.placeholder(codes.shape, "int8"), \
        te.placeholder((oc,), "float32"), te.placeholder((oc,), "float32")
    tr = [te.placeholder(want.shape, "float32")] if residual else []
    geometry = {"strides": (stride, stride), "pads": (pad,) * 4, "dilations": (1, 1), "groups": groups}
    out = kernels.conv2d_int8(tx, tc, ts, tb, *tr, **geometry, act="relu", taps=taps, levels=path.levels)
    hand = path.intrinsic if groups == 1 and ob % path.lanes == 0 and (path.name != "vnni" or not taps) else None
    func = _build([tx, tc, ts, tb, *tr, out], "conv2d_int8", ob, path.target, intrinsic=hand, act="relu", taps=taps,
                  levels=path.levels, residual=residual, **geometry)
    want = np.maximum(want + (r if residual else 0), 0)
    got = _run(func, x, codes, sw, b, *([r] if residual else []), out_shape=want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # and close to the fp32 convolution (quantization error only)
    exact = np.maximum(_conv_ref(x, w, b, stride, pad, groups) + (r if residual else 0), 0)
    assert np.abs(got - exact).max() < 0.05 * np.abs(exact).max()


@pytest.mark.parametrize(("n", "c", "oc", "hw", "stride"),
                         [(2, 64, 32, 14, 2), (1, 16, 32, 13, 2), (3, 6, 16, 12, 2), (1, 32, 64, 28, 2), (2, 8, 16, 9, 3)])
def test_a_strided_1x1_int8_conv_is_the_integer_conv_of_the_pixels_it_reads(n, c, oc, hw, stride, path):
    """ResNet's downsampling shortcut (1×1, stride 2, no padding): only the pixels it reads are quantized (on VNNI
    whole channel quads are read as contiguous rows, every stride-th pixel kept), odd and even widths, channels
    not a multiple of 4."""
    ob = kernels.out_block(oc, path.lanes)
    geometry = {"strides": (stride, stride), "pads": (0,) * 4, "dilations": (1, 1), "groups": 1}
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((oc, c, 1, 1)).astype(np.float32)
    b = rng.standard_normal(oc).astype(np.float32)
    codes, sw = kernels.quantize_conv_int8(w, ob, 0, path.levels)
    want = _conv_int8_reference(x, codes, c, sw, b, stride, 0, 1, 0, path.levels)
    tx, tc, ts, tb = te.placeholder(x.shape, "float32"), te.placeholder(codes.shape, "int8"), \
        te.placeholder((oc,), "float32"), te.placeholder((oc,), "float32")
    out = kernels.conv2d_int8(tx, tc, ts, tb, **geometry, levels=path.levels)
    hand = path.intrinsic if ob % path.lanes == 0 else None
    func = _build([tx, tc, ts, tb, out], "conv2d_int8", ob, path.target, intrinsic=hand, levels=path.levels, **geometry)
    np.testing.assert_allclose(_run(func, x, codes, sw, b, out_shape=want.shape), want, rtol=1e-5, atol=1e-4)


def _max_pool_reference(y, kernel, stride, pad):
    """numpy: square max pooling of NCHW ``y``, padding with -inf."""
    n, c, h, w = y.shape
    padded = np.pad(y, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    oh, ow = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
    out = np.full((n, c, oh, ow), -np.inf)
    for ky in range(kernel):
        for kx in range(kernel):
            out = np.maximum(out, padded[:, :, ky:ky + stride * oh:stride, kx:kx + stride * ow:stride])
    return out


@pytest.mark.parametrize(("n", "c", "oc", "hw", "k", "stride", "act", "pool"),
                         [(8, 3, 32, 30, 7, 2, "relu", (3, 2, 1)), (9, 8, 16, 13, 3, 1, "none", (3, 1, 1)),
                          (2, 4, 32, 12, 3, 1, "none", (2, 2, 0))])
def test_fp32_conv_with_a_fused_max_pooling_writes_the_pooling_of_its_output(n, c, oc, hw, k, stride, act, pool, path):
    """A max pooling fused after the fp32 conv (ResNet's stem at batch ≥ 8: a sample's conv in cache, pooled
    there) gives the pooling of the conv's output, on every path (the TE schedule is portable)."""
    ob = kernels.out_block(oc, path.lanes)
    geometry = {"strides": (stride, stride), "pads": (k // 2,) * 4, "dilations": (1, 1), "groups": 1}
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((oc, c, k, k)).astype(np.float32)
    b = rng.standard_normal(oc).astype(np.float32)
    conv = _conv_ref(x, w, b, stride, k // 2, 1)
    want = _max_pool_reference(np.maximum(conv, 0) if act == "relu" else conv, *pool)
    tx, tw, tb = te.placeholder(x.shape, "float32"), te.placeholder((oc // ob, c, k, k, ob), "float32"), \
        te.placeholder((oc,), "float32")
    out = kernels.conv2d(tx, tw, tb, **geometry, act=act, pool=pool)
    func = _build([tx, tw, tb, out], "conv2d", ob, path.target, act=act, pool=pool, **geometry)
    got = _run(func, x, kernels.pack_conv(w, ob), b, out_shape=want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("n", "c", "oc", "hw", "k", "stride", "act", "pool"),
                         [(2, 3, 64, 30, 7, 2, "relu", (3, 2, 1)), (1, 3, 32, 17, 3, 1, "relu", (3, 2, 1)),
                          (3, 8, 32, 16, 3, 1, "none", (2, 2, 0)), (1, 16, 16, 13, 3, 1, "none", (3, 1, 1)),
                          (9, 8, 32, 12, 1, 1, "relu", (3, 3, 2))])
def test_int8_conv_with_a_fused_max_pooling_writes_the_pooling_of_its_output(n, c, oc, hw, k, stride, act, pool):
    """VNNI: a max pooling fused after the int8 conv (ResNet's stem: 7×7/2 conv, 3×3/2 pooling) gives exactly
    the pooling of the conv's own output (every window clamped to the image, so no padding value is needed
    whatever the activation: ``act="none"``), batch 1 (bands of pooled rows split over threads) and beyond,
    and its output absmax per (sample, block, band of pooled rows) for the next int8 conv."""
    vnni = next(p for p in PATHS if p.name == "vnni")
    if not vnni.features <= targets.host_features():
        pytest.skip("the fused max pooling has only the VNNI micro-kernel; this CPU lacks AVX-512 VNNI")
    ob = kernels.out_block(oc, vnni.lanes)
    geometry = {"strides": (stride, stride), "pads": (k // 2,) * 4, "dilations": (1, 1), "groups": 1}
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((oc, c, k, k)).astype(np.float32)
    b = rng.standard_normal(oc).astype(np.float32)
    codes, sw = kernels.quantize_conv_int8(w, ob, 0, vnni.levels)
    conv = _conv_int8_reference(x, codes, c, sw, b, stride, k // 2, 1, 0, vnni.levels)
    want = _max_pool_reference(np.maximum(conv, 0) if act == "relu" else conv, *pool)
    tx, tc, ts, tb = te.placeholder(x.shape, "float32"), te.placeholder(codes.shape, "int8"), \
        te.placeholder((oc,), "float32"), te.placeholder((oc,), "float32")
    out, out_amax = kernels.conv2d_int8(tx, tc, ts, tb, **geometry, act=act, levels=vnni.levels, emit_amax=True,
                                        pool=pool)
    assert tuple(int(d) for d in out.shape) == want.shape
    func = _build([tx, tc, ts, tb, out, out_amax], "conv2d_int8", ob, vnni.target, intrinsic=vnni.intrinsic, act=act,
                  levels=vnni.levels, amax_out=True, pool=pool, **geometry)
    dev = tvm.cpu()
    bands = kernels.pool_bands(n * oc // ob, want.shape[2])
    got, got_amax = (tvm.runtime.tensor(np.zeros(shape, np.float32), dev)
                     for shape in (want.shape, (n, oc // ob * bands)))
    func(*[tvm.runtime.tensor(a, dev) for a in (x, codes, sw, b)], got, got_amax)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-4)
    per_band = np.abs(got.numpy()).reshape(n, oc // ob, ob, bands, -1).max(axis=(2, 4)).reshape(n, -1)
    np.testing.assert_array_equal(got_amax.numpy(), per_band)


@pytest.mark.parametrize(("n", "c", "oc", "hw", "stride", "residual"),
                         [(1, 32, 32, 14, 1, False), (2, 16, 32, 9, 2, True), (64, 16, 32, 6, 1, True),
                          (1, 64, 64, 7, 1, False)])
def test_int8_conv_writes_its_output_absmax_and_the_next_reads_it_instead_of_its_own_pass(
        n, c, oc, hw, stride, residual, path):
    """Consecutive int8 convs carry the per-sample absmax: the first returns max |out| per sample beside its
    output (taken in its epilogue), the second reads it instead of a pass over its input. Same codes, same
    outputs as each conv on its own."""
    if residual and not path.scheme.int8_residual:
        pytest.skip(f"the {path.name} int8 conv has no residual epilogue (the lowering does not fuse one)")
    ob = kernels.out_block(oc, path.lanes)
    geometry = {"strides": (stride, stride), "pads": (1,) * 4, "dilations": (1, 1), "groups": 1}
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w1 = rng.standard_normal((oc, c, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((oc, oc, 3, 3)).astype(np.float32)
    b1, b2 = rng.standard_normal(oc).astype(np.float32), rng.standard_normal(oc).astype(np.float32)
    codes1, sw1 = kernels.quantize_conv_int8(w1, ob, 0, path.levels)
    codes2, sw2 = kernels.quantize_conv_int8(w2, ob, 0, path.levels)
    y_want = _conv_int8_reference(x, codes1, c, sw1, b1, stride, 1, 1, 0, path.levels)
    r = rng.standard_normal(y_want.shape).astype(np.float32) if residual else None
    y_want = np.maximum(y_want + (r if residual else 0), 0)
    dev = tvm.cpu()
    hand = path.intrinsic if ob % path.lanes == 0 and path.name == "vnni" else None  # AVX2: the TE schedule

    tx, tc, ts, tb = te.placeholder(x.shape, "float32"), te.placeholder(codes1.shape, "int8"), \
        te.placeholder((oc,), "float32"), te.placeholder((oc,), "float32")
    tr = [te.placeholder(y_want.shape, "float32")] if residual else []
    out, out_amax = kernels.conv2d_int8(tx, tc, ts, tb, *tr, **geometry, act="relu", levels=path.levels,
                                        emit_amax=True)
    first = _build([tx, tc, ts, tb, *tr, out, out_amax], "conv2d_int8", ob, path.target, intrinsic=hand, act="relu",
                   levels=path.levels, residual=residual, amax_out=True, **geometry)
    y = tvm.runtime.tensor(np.zeros(y_want.shape, np.float32), dev)
    oh = y_want.shape[2]
    y_amax = tvm.runtime.tensor(np.zeros((n, oc // ob * oh), np.float32), dev)
    first(*[tvm.runtime.tensor(a, dev) for a in (x, codes1, sw1, b1, *([r] if residual else []))], y, y_amax)
    np.testing.assert_allclose(y.numpy(), y_want, rtol=1e-5, atol=1e-4)
    # one slot per sample, block of ob output channels and row
    per_block_row = np.abs(y.numpy()).reshape(n, oc // ob, ob, oh, -1).max(axis=(2, 4)).reshape(n, -1)
    np.testing.assert_array_equal(y_amax.numpy(), per_block_row)

    ty, ta = te.placeholder(y_want.shape, "float32"), te.placeholder(y_amax.shape, "float32")
    tc2 = te.placeholder(codes2.shape, "int8")
    geometry["strides"] = (1, 1)
    out2 = kernels.conv2d_int8(ty, tc2, ts, tb, None, ta, **geometry, levels=path.levels)
    second = _build([ty, tc2, ts, tb, ta, out2], "conv2d_int8", ob, path.target, intrinsic=hand, levels=path.levels,
                    amax_in=True, **geometry)
    got = _run(second, y.numpy(), codes2, sw2, b2, y_amax.numpy(), out_shape=(n, oc, *y_want.shape[2:]))
    want = _conv_int8_reference(y.numpy(), codes2, oc, sw2, b2, 1, 1, 1, 0, path.levels)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # the absmax it is given is the one it quantizes with (twice the true one: half the code range used)
    doubled = (2 * y_amax.numpy()).astype(np.float32)
    got = _run(second, y.numpy(), codes2, sw2, b2, doubled, out_shape=want.shape)
    coarse = _conv_int8_reference(y.numpy(), codes2, oc, sw2, b2, 1, 1, 1, 0, path.levels, amax=doubled.max(axis=1))
    np.testing.assert_allclose(got, coarse, rtol=1e-5, atol=1e-4)
    assert np.abs(coarse - want).max() > 1e-3  # the two scales give different results: the test can tell them apart


def _u8_words(codes: np.ndarray) -> np.ndarray:
    """numpy: NCHW uint8 codes as ``avx512.u8_shape`` (channels last, a border of code 0)."""
    from bitpass.backends.tvm import avx512

    pad = avx512.U8_PAD
    return np.pad(codes.transpose(0, 2, 3, 1), ((0, 0), (pad, pad), (pad, pad), (0, 0))).astype(np.uint8)


def _u8_kernel(shape, oc, ob, kernel, stride, pad, target, **modes):
    from bitpass.backends.tvm import avx512

    func = avx512.conv2d_int8(shape, oc, ob, (kernel, kernel), (stride, stride), (pad,) * 4, (1, 1), "relu",
                              parallel=True, **modes).with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(target))["main"]


def _u8_unpacked(codes: np.ndarray) -> np.ndarray:
    """numpy: ``avx512.u8_shape`` codes back to NCHW, the border included."""
    return codes.transpose(0, 3, 1, 2)


@pytest.mark.parametrize(("n", "c", "oc", "hw", "k", "stride", "pool"),
                         [(2, 3, 64, 30, 7, 2, (3, 2, 1)), (1, 8, 32, 17, 3, 1, (3, 2, 1))])
def test_int8_conv_with_a_fused_max_pooling_writes_its_pooled_output_as_codes(n, c, oc, hw, k, stride, pool):
    """VNNI: ResNet's stem (conv, ReLU, max pooling in the epilogue) writes the pooled values as uint8 codes of a
    calibrated scale, bordered by code 0, for the int8 convs that read it."""
    vnni = PATHS[0]
    if not vnni.features <= targets.host_features():
        pytest.skip("this CPU lacks AVX-512 VNNI")
    from bitpass.backends.tvm import avx512

    ob = kernels.out_block(oc, vnni.lanes)
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((oc, c, k, k)).astype(np.float32)
    b = rng.standard_normal(oc).astype(np.float32)
    codes, sw = kernels.quantize_conv_int8(w, ob, 0, vnni.levels)
    conv = _conv_int8_reference(x, codes, c, sw, b, stride, k // 2, 1, 0, vnni.levels)
    pooled = _max_pool_reference(np.maximum(conv, 0), *pool).astype(np.float32)
    scale = np.float32(0.9 * pooled.max() / 255)
    want = np.minimum(np.round(pooled * np.float32(1 / scale)), 255)
    func = avx512.conv2d_int8(x.shape, oc, ob, (k, k), (stride, stride), (k // 2,) * 4, (1, 1), "relu", parallel=True,
                              pool=pool, u8_out=float(scale)).with_attr("global_symbol", "main")
    func = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(vnni.target))["main"]
    dev = tvm.cpu()
    got = tvm.runtime.tensor(np.full(avx512.u8_shape(want.shape), 7, np.uint8), dev)
    func(*[tvm.runtime.tensor(a, dev) for a in (x, codes, sw, b)], got)
    unpacked = _u8_unpacked(got.numpy())
    pad = avx512.U8_PAD
    inner = unpacked[:, :, pad:-pad, pad:-pad]
    assert np.abs(inner.astype(int) - want).max() <= 1 and (inner == want).mean() > 0.999 and want.max() == 255
    assert unpacked.sum() == inner.sum()  # the border holds code 0


@pytest.mark.parametrize(("n", "c", "oc", "hw", "kernel", "stride", "pad", "residual"),
                         [(1, 32, 32, 14, 3, 1, 1, False), (2, 16, 32, 9, 3, 2, 1, True),
                          (3, 32, 64, 8, 1, 2, 0, False), (1, 64, 64, 7, 3, 1, 1, True),
                          (64, 16, 32, 6, 3, 1, 1, True), (1, 16, 32, 6, 1, 1, 0, False)])
def test_int8_convs_pass_uint8_codes_with_calibrated_scales_between_them(n, c, oc, hw, kernel, stride, pad, residual):
    """VNNI: a conv with a ReLU writes its output as uint8 codes of a calibrated scale (min(round(y / s), 255),
    zero point 0), channels last with a border of code 0; the next conv reads them in place (3×3 padded, 1×1
    strided), and a residual input may be codes too. Each is the integer conv of the codes."""
    vnni = PATHS[0]
    if not vnni.features <= targets.host_features():
        pytest.skip("this CPU lacks AVX-512 VNNI")
    from bitpass.backends.tvm import avx512

    ob = kernels.out_block(oc, LANES)
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w1 = rng.standard_normal((oc, c, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((oc, oc, kernel, kernel)).astype(np.float32)
    b1, b2 = rng.standard_normal(oc).astype(np.float32), rng.standard_normal(oc).astype(np.float32)
    codes1, sw1 = kernels.quantize_conv_int8(w1, ob, 0, vnni.levels)
    codes2, sw2 = kernels.quantize_conv_int8(w2, ob, 0, vnni.levels)
    y_fp = np.maximum(_conv_int8_reference(x, codes1, c, sw1, b1, 1, 1, 1, 0, vnni.levels), 0).astype(np.float32)
    s1 = np.float32(0.8 * y_fp.max() / 255)  # a calibrated range that clips the largest values
    y_codes = np.minimum(np.round(y_fp * np.float32(1 / s1)), 255).astype(np.uint8)
    dev = tvm.cpu()

    first = _u8_kernel(x.shape, oc, ob, 3, 1, 1, vnni.target, u8_out=float(s1))
    y = tvm.runtime.tensor(np.full(avx512.u8_shape(y_fp.shape), 7, np.uint8), dev)  # the border is written too
    first(*[tvm.runtime.tensor(a, dev) for a in (x, codes1, sw1, b1)], y)
    got_words = y.numpy()
    unpacked = _u8_unpacked(got_words)
    inner = unpacked[:, :, avx512.U8_PAD:-avx512.U8_PAD, avx512.U8_PAD:-avx512.U8_PAD]
    assert np.abs(inner.astype(int) - y_codes.astype(int)).max() <= 1  # fp32 rounding of ties only
    assert (inner == y_codes).mean() > 0.999 and y_codes.max() == 255
    assert not unpacked.sum() - inner.sum()  # the border holds code 0

    oh = (hw + 2 * pad - kernel) // stride + 1
    r_fp = np.maximum(rng.standard_normal((n, oc, oh, oh)), 0).astype(np.float32) if residual else None
    s_r = np.float32(r_fp.max() / 255) if residual else np.float32(0)
    r_codes = np.minimum(np.round(r_fp / s_r), 255).astype(np.uint8) if residual else None
    second = _u8_kernel((n, oc, hw, hw), oc, ob, kernel, stride, pad, vnni.target, u8_in=float(s1),
                        residual=residual, u8_res=float(s_r))
    got = _run(second, got_words, codes2, sw2, b2, *([_u8_words(r_codes)] if residual else []),
               out_shape=(n, oc, oh, oh))
    acc = _conv_ref(inner.astype(np.float64), kernels.conv_int8_codes(codes2, oc, 0).astype(np.float64),
                    np.zeros(oc), stride, pad, 1)
    want = acc * (s1 * sw2)[None, :, None, None] + b2[None, :, None, None]
    if residual:
        want = want + r_codes * s_r
    np.testing.assert_allclose(got, np.maximum(want, 0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("n", "c", "oc", "hw", "stride"), [(1, 64, 128, 14, 2), (2, 20, 32, 9, 2), (1, 32, 64, 7, 1)])
def test_pointwise_int8_conv_quantizes_only_the_pixels_a_stride_reads(n, c, oc, hw, stride, path):
    """1×1 convolutions (ResNet's downsampling shortcut: stride 2, no padding): the VNNI kernel quantizes a
    subsampled image; the integers are the reference's."""
    ob = kernels.out_block(oc, path.lanes)
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((oc, c, 1, 1)).astype(np.float32)
    b = rng.standard_normal(oc).astype(np.float32)
    codes, sw = kernels.quantize_conv_int8(w, ob, 0, path.levels)
    geometry = {"strides": (stride, stride), "pads": (0,) * 4, "dilations": (1, 1), "groups": 1}
    tx, tc, ts, tb = te.placeholder(x.shape, "float32"), te.placeholder(codes.shape, "int8"), \
        te.placeholder((oc,), "float32"), te.placeholder((oc,), "float32")
    out = kernels.conv2d_int8(tx, tc, ts, tb, **geometry, act="none", levels=path.levels)
    func = _build([tx, tc, ts, tb, out], "conv2d_int8", ob, path.target, intrinsic=path.intrinsic, levels=path.levels,
                  **geometry)
    want = _conv_int8_reference(x, codes, c, sw, b, stride, 0, 1, 0, path.levels)
    np.testing.assert_allclose(_run(func, x, codes, sw, b, out_shape=want.shape), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("a_shape", "b_shape"), [((2, 3, 20, 24), (2, 3, 24, 40)), ((1, 4, 128, 64), (1, 4, 64, 128)),
                                              ((7, 5), (5, 3))])
def test_tvms_own_matmul_of_two_computed_tensors_is_scheduled_and_exact(a_shape, b_shape, path):
    """Attention's Q·Kᵀ: a Relax matmul legalized by TVM, tiled by the Matmul rule."""
    from tvm import relax

    a, b = (rng.standard_normal(s).astype(np.float32) for s in (a_shape, b_shape))
    bb = relax.BlockBuilder()
    va, vb = relax.Var("a", relax.TensorType(a_shape, "float32")), relax.Var("b", relax.TensorType(b_shape, "float32"))
    with bb.function("main", [va, vb]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(va, vb)))
        bb.emit_func_output(out)
    target = tvm.target.Target(path.target)
    mod = schedules.apply_rules(relax.transform.LegalizeOps()(bb.get()), target)
    tir = next(f for g, f in mod.functions.items() if g.name_hint == "matmul")
    assert tir.attrs["tirx.is_scheduled"] and "vectorized" in tir.script()
    vm = relax.VirtualMachine(relax.build(mod, target=target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    np.testing.assert_allclose(got, a @ b, rtol=1e-4, atol=1e-4)


def test_int4_layout_and_aarch64_compile_of_the_portable_kernels():
    """The portable TE kernels (no AVX2 intrinsics) compile for aarch64, the cross-compiled artifacts' path."""
    target = targets.get("aarch64-neon").tvm_target()
    q = kernels.quantize_int4(rng.standard_normal((64, 32)).astype(np.float32), 16, 32)
    tx, tc, ts, tb = te.placeholder((1, 64), "float32"), te.placeholder(q.codes.shape, "uint8"), \
        te.placeholder(q.scales.shape, "float16"), te.placeholder((32,), "float32")
    codes, _ = kernels.quantize_conv_int8(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), 8)
    cx, cc, cs, cb = te.placeholder((1, 3, 8, 8), "float32"), te.placeholder(codes.shape, "int8"), \
        te.placeholder((16,), "float32"), te.placeholder((16,), "float32")
    conv = kernels.conv2d_int8(cx, cc, cs, cb, strides=(1, 1), pads=(1,) * 4, dilations=(1, 1), groups=1)
    c8, _ = kernels.quantize_int8(rng.standard_normal((60, 32)).astype(np.float32), 16)
    x8, d8, s8, b8 = te.placeholder((4, 60), "float32"), te.placeholder(c8.shape, "uint8"), \
        te.placeholder((32,), "float32"), te.placeholder((32,), "float32")
    funcs = {
        "dense8": KernelAttrs("dense_int8", 16).tag(
            te.create_prim_func([x8, d8, s8, b8, kernels.dense_int8(x8, d8, s8, b8)])).with_attr("global_symbol",
                                                                                                  "dense8"),
        "dense4": KernelAttrs("dense_int4", 16).tag(te.create_prim_func(
            [tx, tc, ts, tb, kernels.dense_int4(tx, tc, ts, tb, block_size=32)])).with_attr("global_symbol", "dense4"),
        "conv8": KernelAttrs("conv2d_int8", 8, pads=(1, 1, 1, 1)).tag(
            te.create_prim_func([cx, cc, cs, cb, conv])).with_attr("global_symbol", "conv8"),
    }
    mod = schedules.apply_rules(tvm.IRModule(funcs), target)
    assert all(mod[name].attrs["tirx.is_scheduled"] for name in funcs)
    assert "llvm.x86" not in mod.script()
    tvm.compile(mod, target=target)  # codegen for aarch64 (no linking)


def test_targets_registry_and_host_detection():
    assert {"x86-64-avx2", "x86-64-avx512", "aarch64-neon", "aarch64-dotprod"} <= set(targets.TARGETS)
    for spec in targets.TARGETS.values():
        target = spec.tvm_target()
        assert str(target.attrs["mtriple"]) == spec.triple
        assert schedules.features_of(target) >= spec.features - {"fma"}
    assert targets.get("aarch64-neon").cross_compiler == "aarch64-linux-gnu-gcc"
    assert targets._cpuinfo_flags("flags\t: fpu avx2 fma avx512f\n") >= {"avx2", "avx512f"}
    assert targets.host_target() in targets.TARGETS


def test_conv_layers_annotated_8_bit_lower_to_the_int8_conv_kernel(tmp_path, cnn_model, digits_files):
    from bitpass.tools import compile

    convs = [layer.id for layer in cnn_model.layers() if layer.op_type == "Conv"]
    bits = ",".join(f"set-bits(layers={layer},weight=8)" for layer in convs[1:])  # the first stays fp32
    artifact = compile(cnn_model, tmp_path / "conv8", backend="tvm",
                       pipeline=f"fold-constants,eliminate-dead-nodes,fuse,{bits}",
                       evaluation=str(digits_files / "eval.npz"), latency=False)
    layers = json.loads((artifact.path / "tvm.json").read_text())["layers"]
    assert [layers[layer]["kernel"] for layer in convs] == ["conv2d", "conv2d_int8", "conv2d_int8"]
    assert [layers[layer]["weight_bits"] for layer in convs] == [32, 8, 8]
    fidelity = artifact.metrics["quality"]["fidelity"]
    assert fidelity["top1_agreement"] >= 0.98 and fidelity["cosine"] > 0.995, fidelity


def test_all_cnn_layers_at_8_bits_keep_the_fp32_top1(tmp_path, cnn_model, digits_files):
    """Every conv and Gemm at 8 bits (7-bit codes for weights and activations): the held-out top-1 stays."""
    from bitpass.tools import compile

    layers = [layer for layer in cnn_model.layers() if layer.op_type in ("Conv", "Gemm")]
    bits = ",".join(f"set-bits(layers={layer.id},weight=8)" for layer in layers)
    artifact = compile(cnn_model, tmp_path / "all8", backend="tvm",
                       pipeline=f"fold-constants,eliminate-dead-nodes,fuse,{bits}",
                       evaluation=str(digits_files / "eval.npz"), latency=False)
    report = json.loads((artifact.path / "tvm.json").read_text())["layers"]
    want = {"Conv": "conv2d_int8", "Gemm": "dense_int8"}
    assert [report[layer.id]["kernel"] for layer in layers] == [want[layer.op_type] for layer in layers]
    fidelity = artifact.metrics["quality"]["fidelity"]
    assert fidelity["top1_agreement"] >= 0.98 and fidelity["cosine"] > 0.995, fidelity


def test_a_calibrated_int8_compile_passes_codes_between_convs_and_keeps_the_fp32_top1(tmp_path, cnn_model,
                                                                                       digits_files):
    """``compile`` with a calibrate pass hands its activation ranges to the TVM backend: on VNNI the second conv
    (ReLU, max pooling fused) writes uint8 codes of the calibrated scale and the third reads them; the held-out
    top-1 and cosine stay where the per-sample scheme has them."""
    from bitpass.tools import compile

    if not kernels.scheme_for(SPEC.features).int8_codes:
        pytest.skip("this CPU's int8 conv does not pass codes (no AVX-512 VNNI)")
    layers = [layer for layer in cnn_model.layers() if layer.op_type in ("Conv", "Gemm")]
    bits = ",".join(f"set-bits(layers={layer.id},weight=8)" for layer in layers)
    artifact = compile(cnn_model, tmp_path / "codes", backend="tvm",
                       pipeline=f"fold-constants,eliminate-dead-nodes,fuse,calibrate(method=minmax),{bits}",
                       calibration=str(digits_files / "calib.npz"), evaluation=str(digits_files / "eval.npz"),
                       latency=False)
    report = json.loads((artifact.path / "tvm.json").read_text())["layers"]
    convs = [report[layer.id] for layer in layers if layer.op_type == "Conv"]
    assert [conv.get("activations") for conv in convs] == [
        None, {"in": "float32", "out": "uint8"}, {"in": "uint8", "out": "float32"}]
    assert convs[1]["epilogue"] == "bias+relu+maxpool"
    fidelity = artifact.metrics["quality"]["fidelity"]
    assert fidelity["top1_agreement"] >= 0.98 and fidelity["cosine"] > 0.995, fidelity
