"""Winograd F(m×m, 3×3) fp32 convolution on blocked NCHW16c activations, as one hand-written TIR kernel.

A 3×3 stride-1 conv computes each m×m tile of outputs from an (m+2)×(m+2) tile of inputs. Winograd's minimal
filtering (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) transforms the input tile
(``Bᵀ d B``) and the weights (``G g Gᵀ``, once, when the artifact is built), multiplies them elementwise, summed over
input channels (one matrix product per tile element, the work a direct conv spends 9 multiplies on), and
transforms the result back (``Aᵀ M A``). Multiplies per output per channel pair: 9 direct, (m+2)²/m² Winograd:
4 for F(2×2), 2.25 for F(4×4). ONNX Runtime's fp32 convs (MLAS, NCHWc) are direct, as is ``kernels.conv2d``,
which stays the reference semantics; measured isolated on the 2-core AVX-512 EPYC at one thread, this kernel
runs ResNet-18's 56² and 28² 3×3 convs 2.8-3.9× faster than ``blocked.conv2d``, the 14² ones 2.0× and, at 2
threads, the 7² ones 1.3-1.5× (``tile_size``).

Numerically the transforms add rounding: against the direct conv in float64, F(4×4) measured a largest error of
1.9-4.2e-6 of the output's largest magnitude, F(2×2) 1.3-2.7e-7 (``tests/backends/tvm/test_winograd.py``); larger m
would lose precision fast (its points spread), so m is 4 or 2.

One parallel launch, no intermediate tensor: a task is (sample, span of its tiles, part of the output channels).
It transforms its span of input tiles (all input channels) into a scratch buffer on its own stack (at most
``SCRATCH_BYTES`` where a register tile's tiles fit; ResNet's spans take 115-129 KiB, in L2), then for each
32-channel output block and group of tiles multiplies in registers (``group`` tiles × 32 channels, per step one
broadcast per tile and two weight registers, as the direct conv), keeps the (m+2)² products of the group in a stack
buffer, transforms them back, adds bias and residual, applies the activation and stores a register's 16 channels of
a pixel at once. The input may carry a zero border (read in place) or not (reads outside the plane are zeros, a
select); the output may carry one (written by a sample's first span). A plane that m×m tiles do not cover exactly
(7×7) can take partial tiles, reads past the plane zeros and outputs past it not stored (``PARTIAL_TILES``, off).

Not done: a weights-stationary order for small planes at large batches (every span streams the conv's weights, so
F(4×4) on 7×7 loses at batch 32), and AVX2 / ARM64 (their activations are not blocked)."""

from __future__ import annotations

import functools

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from bitpass.backends.tvm import avx512, microkernels

#: fp32 lanes of one AVX-512 register, and channels per block of the blocked layout
LANES = avx512.LANES
#: output channels of a register tile (two registers)
CHANNELS = 32
#: most tiles of a register tile (16 accumulators with 32 channels)
MAX_GROUP = 8
#: a batch-1 conv's tasks split the output channels until there are at least this many (and an even count)
MIN_TASKS = 8
#: planes that m×m tiles do not cover exactly (7×7) take partial 2×2 tiles; off: they keep the direct conv. On
#: ResNet-18 they made the whole model 1.035× faster at batch 1 and 1.059× at batch 32 (``bench_tvm --toggle
#: winograd.PARTIAL_TILES``) for 14.8 MB more weights (its two Winograd-eligible 512-channel 7×7 convs stored
#: transformed: 46.7 MB direct, 59.3 MB with Winograd on exact tilings, 74.0 MB with partial tiles too): not worth
#: it by default
PARTIAL_TILES = False
#: a task's transformed input tiles live on its thread's stack: a sample's tiles are cut into spans of at most this
#: many bytes (ResNet's spans take 115-129 KiB, in L2)
SCRATCH_BYTES = 160 << 10
#: a conv whose smallest span (one register tile's tiles) would take more is left to the direct conv
MAX_SCRATCH_BYTES = 1 << 20


def matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aᵀ (m × m+2), G (m+2 × 3), Bᵀ (m+2 × m+2) of F(m×m, 3×3), points 0, ±1 (m = 2) and 0, ±1, ±2 (m = 4)."""
    if m == 2:
        at = [[1, 1, 1, 0], [0, 1, -1, -1]]
        g = [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]
        bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    elif m == 4:
        at = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
        g = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
             [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
        bt = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
              [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
    else:
        raise ValueError(f"F({m}x{m}, 3x3) is not built: m is 2 or 4")
    return np.array(at, np.float64), np.array(g, np.float64), np.array(bt, np.float64)


def tile_size(h: int, w: int) -> int:
    """m of the F(m×m, 3×3) for an h × w output: 4 where 4×4 tiles cover it exactly, else 2 (partial 2×2 tiles on
    an odd plane, their outside computed and not stored, where ``PARTIAL_TILES``). Measured on the 2-core AVX-512
    EPYC against the direct conv (2 threads): 512 channels at 7×7, F(2×2) 1.3-1.5× at batch 1 and 1.4× at batch 32,
    F(4×4) 0.8-1.2× (4 tiles a sample, each task streaming weights 4× the direct conv's); 256 at 14×14, F(2×2)
    2.0-2.3×, F(4×4) 2.5× but 2.25× the weight bytes."""
    return 4 if h % 4 == 0 and w % 4 == 0 else 2


def span(c: int, m: int, tiles: int) -> int:
    """Tiles of a sample one task transforms: the most whole register tiles (``group``) dividing the sample's
    ``tiles`` whose transformed inputs, (m+2)² × ``c`` floats a tile, fit ``SCRATCH_BYTES`` (at least one
    register tile)."""
    group = microkernels.divisor(tiles, MAX_GROUP)
    per_tile = (m + 2) ** 2 * c * 4
    fits = [s for s in range(group, tiles + 1, group) if tiles % s == 0 and s * per_tile <= SCRATCH_BYTES]
    return max(fits, default=group)


def _tiles(h: int, w: int, m: int) -> tuple[int, int]:
    """Rows and columns of m×m tiles covering an h × w output."""
    return -(-h // m), -(-w // m)


def supported(block_in: int, block_out: int, c: int, oc: int, kernel: tuple[int, int], strides: tuple[int, int],
              pads: tuple[int, int, int, int], dilations: tuple[int, int], groups: int, pool: tuple[int, int, int],
              out_hw: tuple[int, int]) -> bool:
    """Whether ``conv2d`` computes this conv: 3×3, stride 1, padding 1, undilated, one group, no fused pooling,
    blocked 16-channel input and output, whole 32-channel output blocks, a plane m×m tiles cover exactly unless
    ``PARTIAL_TILES``, and a task's scratch of transformed inputs at most ``MAX_SCRATCH_BYTES`` (``c`` input
    channels)."""
    m = tile_size(*out_hw)
    ty, tx = _tiles(*out_hw, m)
    return block_in == LANES and block_out == LANES and c % LANES == 0 and oc % CHANNELS == 0 and \
        tuple(kernel) == (3, 3) and tuple(strides) == (1, 1) and tuple(pads) == (1, 1, 1, 1) and \
        tuple(dilations) == (1, 1) and groups == 1 and not pool[0] and \
        (PARTIAL_TILES or (ty * m, tx * m) == tuple(out_hw)) and \
        span(c, m, ty * tx) * (m + 2) ** 2 * c * 4 <= MAX_SCRATCH_BYTES


def pack_weights(w_oihw: np.ndarray, m: int) -> np.ndarray:
    """The transformed weights ``G g Gᵀ`` (computed in float64), [(m+2)², OC/32, IC, 32] float32: per tile element
    and output block, a channel's 32 outputs contiguous (the register tile's two loads)."""
    _, g, _ = matrices(m)
    oc, ic = w_oihw.shape[:2]
    u = np.einsum("ai,kcij,bj->abkc", g, w_oihw.astype(np.float64), g)  # [m+2, m+2, OC, IC]
    u = u.reshape((m + 2) ** 2, oc // CHANNELS, CHANNELS, ic).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(u.astype(np.float32))


def weight_bytes(oc: int, ic: int, m: int) -> int:
    """Bytes of ``pack_weights``: (m+2)²/9 × the direct conv's (16/9 for m = 2, 4 for m = 4)."""
    return (m + 2) ** 2 * oc * ic * 4


def _combine(coefs, terms):
    """Σ coef·term as TIR, zero coefficients skipped and ±1 an add or subtract (the transforms' constants are
    folded here, not left to LLVM)."""
    out = None
    for coef, term in zip(coefs, terms):
        if coef == 0:
            continue
        if out is None:
            out = term if coef == 1 else term * tirx.const(float(coef), "float32")
        else:
            scaled = term if abs(coef) == 1 else term * tirx.const(float(abs(coef)), "float32")
            out = out + scaled if coef > 0 else out - scaled
    return out


def _vec(start):
    """The 16 lanes from flat index ``start``."""
    return tirx.Ramp(start, 1, LANES)


def _parts(tasks: int, blocks: int) -> int:
    """Into how many parts each task's output blocks split: 1 when there are ``MIN_TASKS`` tasks in an even count,
    else the smallest divisor of ``blocks`` that makes it (each part transforms the input tiles again)."""
    for parts in range(1, blocks + 1):
        if blocks % parts == 0 and tasks * parts >= MIN_TASKS and tasks * parts % 2 == 0:
            return parts
    return blocks


@functools.cache
def conv2d(shape: tuple[int, int, int, int], oc: int, act: str, parallel: bool, residual: bool = False,
           halo_in: int = 0, halo_out: int = 0, halo_res: int = 0, m: int = 0) -> tirx.PrimFunc:
    """3×3 stride-1 pad-1 fp32 conv of the NCHW ``shape`` (n, c, h, w) input stored blocked [N, C/16, H + 2·halo_in,
    W + 2·halo_in, 16] (a border of zeros, or none), weights ``pack_weights`` of ``m`` (0: ``tile_size(h, w)``),
    bias [OC], optional residual [N, OC/16, H + 2·halo_res, W + 2·halo_res, 16]; out = act(conv + bias
    [+ residual]) [N, OC/16, H + 2·halo_out, W + 2·halo_out, 16], its border zeros."""
    n, c, h, w = shape
    m = m or tile_size(h, w)
    if not supported(LANES, LANES, c, oc, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (0, 0, 0), (h, w)):
        raise ValueError(f"Winograd takes 16-channel blocks in and 32-channel blocks out; got {c}->{oc} channels")
    a = m + 2
    at, _, bt = matrices(m)
    cb, kb, vecs = c // LANES, oc // CHANNELS, CHANNELS // LANES
    ty, tx = _tiles(h, w, m)
    partial = ty * m != h or tx * m != w  # the last row or column of tiles reaches past the plane
    tiles = ty * tx  # a sample's, numbered row by row
    group = microkernels.divisor(tiles, MAX_GROUP)
    width = span(c, m, tiles)
    spans = tiles // width
    parts = _parts(n * spans, kb)
    hi, wi = h + 2 * halo_in, w + 2 * halo_in
    ho, wo = h + 2 * halo_out, w + 2 * halo_out
    hr, wr = h + 2 * halo_res, w + 2 * halo_res
    floor = tirx.Broadcast(tirx.const(microkernels.floor(act), "float32"), LANES)
    zero = tirx.Broadcast(tirx.const(0.0, "float32"), LANES)

    def at_(blocks, rows, cols, b, q, y, x):
        """Flat index of lane 0 of pixel (y, x) of block q of sample b in a [N, blocks, rows, cols, 16] buffer."""
        return (((b * blocks + q) * rows + y) * cols + x) * LANES

    with IRBuilder() as builder:
        with T.prim_func(private=True):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            data = T.arg("data", T.buffer((n, cb, hi, wi, LANES), "float32"))
            weight = T.arg("weight", T.buffer((a * a, kb, c, CHANNELS), "float32"))
            bias = T.arg("bias", T.buffer((oc,), "float32"))
            res = T.arg("res", T.buffer((n, oc // LANES, hr, wr, LANES) if residual else (1,), "float32"))
            out = T.arg("out", T.buffer((n, oc // LANES, ho, wo, LANES), "float32"))
            xflat = T.decl_buffer((n * cb * hi * wi * LANES,), "float32", data=data.data)
            uflat = T.decl_buffer((a * a * kb * c * CHANNELS,), "float32", data=weight.data)
            if residual:
                rflat = T.decl_buffer((n * (oc // LANES) * hr * wr * LANES,), "float32", data=res.data)
            oflat = T.decl_buffer((n * (oc // LANES) * ho * wo * LANES,), "float32", data=out.data)
            with microkernels.loop(parallel)(0, n * spans * parts) as task:
                b, first, part = task // (spans * parts), task // parts % spans * width, task % parts
                # the span's input tiles (from the sample's tile ``first``), transformed: [tile, (m+2)², C]
                v = T.decl_buffer((width * a * a * c,), "float32", scope="local")
                with T.serial(0, width * cb) as tq:
                    t, q = first + tq // cb, tq % cb
                    rows = T.decl_buffer((a * a * LANES,), "float32", scope="local")

                    def load(i, j):
                        y, x = t // tx * m + i - 1, t % tx * m + j - 1  # in the plane
                        value = xflat[_vec(at_(cb, hi, wi, b, q, y + halo_in, x + halo_in))]
                        if halo_in and not partial:  # every read lies in the plane or its border
                            return value
                        return tirx.if_then_else(tirx.all(y >= 0, y < h, x >= 0, x < w), value, zero)

                    for i in range(a):  # row by row, rows[i][j'] = Σ_j d[i][j] Bᵀ[j'][j]
                        d = [load(i, j) for j in range(a)]
                        for j in range(a):
                            T.buffer_store(rows, _combine(bt[j], d), [_vec((i * a + j) * LANES)])
                    for i in range(a):  # then column by column: Bᵀ d B
                        for j in range(a):
                            value = _combine(bt[i], [rows[_vec((r * a + j) * LANES)] for r in range(a)])
                            T.buffer_store(v, value, [_vec(((t - first) * a * a + i * a + j) * c + q * LANES)])
                with T.serial(0, kb // parts * (width // group)) as kg:
                    k, t0 = part * (kb // parts) + kg // (width // group), kg % (width // group) * group  # in span
                    prod = T.decl_buffer((a * a * group * CHANNELS,), "float32", scope="local")
                    with T.serial(0, a * a) as e:  # per tile element, a matrix product over the input channels
                        acc = T.decl_buffer((group * CHANNELS,), "float32", scope="local")
                        for r in range(group * vecs):
                            T.buffer_store(acc, zero, [_vec(r * LANES)])
                        with T.serial(0, c) as ci:
                            for g in range(group):
                                xv = tirx.Broadcast(v[((t0 + g) * a * a + e) * c + ci], LANES)
                                for u in range(vecs):
                                    idx = _vec((g * vecs + u) * LANES)
                                    wv = uflat[_vec(((e * kb + k) * c + ci) * CHANNELS + u * LANES)]
                                    T.buffer_store(acc, acc[idx] + xv * wv, [idx])
                        for r in range(group * vecs):
                            T.buffer_store(prod, acc[_vec(r * LANES)], [_vec((e * group * vecs + r) * LANES)])
                    with T.serial(0, group * vecs) as gu:  # Aᵀ M A, then the epilogue, 16 channels at a time
                        g, u = gu // vecs, gu % vecs
                        t = first + t0 + g
                        cols = T.decl_buffer((a * m * LANES,), "float32", scope="local")
                        for i in range(a):
                            row = [prod[_vec((((i * a + j) * group + g) * vecs + u) * LANES)] for j in range(a)]
                            for j in range(m):
                                T.buffer_store(cols, _combine(at[j], row), [_vec((i * m + j) * LANES)])
                        blk = k * vecs + u
                        for i in range(m):
                            for j in range(m):
                                y, x = t // tx * m + i, t % tx * m + j
                                total = _combine(at[i], [cols[_vec((r * m + j) * LANES)] for r in range(a)]) + \
                                    bias[_vec(blk * LANES)]
                                if residual:
                                    total = total + rflat[_vec(at_(oc // LANES, hr, wr, b, blk, y + halo_res,
                                                                   x + halo_res))]
                                index = [_vec(at_(oc // LANES, ho, wo, b, blk, y + halo_out, x + halo_out))]
                                if partial:  # a partial tile's outside is computed, not stored
                                    with T.If(tirx.all(y < h, x < w)):
                                        with T.Then():
                                            T.buffer_store(oflat, tirx.max(total, floor), index)
                                else:
                                    T.buffer_store(oflat, tirx.max(total, floor), index)
                if halo_out:  # a sample's first span writes the border of its part's blocks: beside, above, below
                    blocks = (kb // parts) * vecs
                    with T.serial(0, T.if_then_else(first == 0, blocks * h * 2 * halo_out, 0)) as s:
                        blk = part * blocks + s // (h * 2 * halo_out)
                        y = s // (2 * halo_out) % h + halo_out
                        e = s % (2 * halo_out)
                        x = tirx.if_then_else(e < halo_out, e, w + e)
                        T.buffer_store(oflat, zero, [_vec(at_(oc // LANES, ho, wo, b, blk, y, x))])
                    with T.serial(0, T.if_then_else(first == 0, blocks * 2 * halo_out * wo, 0)) as s:
                        blk = part * blocks + s // (2 * halo_out * wo)
                        e = s // wo % (2 * halo_out)
                        y = tirx.if_then_else(e < halo_out, e, h + e)
                        T.buffer_store(oflat, zero, [_vec(at_(oc // LANES, ho, wo, b, blk, y, s % wo))])
    func = builder.get()
    return microkernels.taking(func, (True, True, True, residual, True))
