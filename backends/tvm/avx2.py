"""Hand-written AVX2 micro-kernels for bitpass's integer kernels, as TIR with LLVM intrinsic calls.

TVM 0.27's ``Schedule.tensorize`` crashes (``tvm::ffi::ToJSONGraph``, the bug that also breaks
MetaSchedule; NOTES.md), and LLVM does not turn TIR's vectorized ``sext × sext`` sums into
``vpmaddubsw`` / ``vpmaddwd`` by itself. So for AVX2 targets the schedule rules (``schedules.py``)
replace the TE kernel by one of these functions: same parameters, same weight layouts, same integer
arithmetic (``kernels.py`` holds the definitions, which stay the portable path, e.g. for aarch64).

* ``dense_int4``: per 32 bytes of packed codes (8 outputs × 8 k), an AND and a shift give the low and
  high nibbles, each multiplied by 4 broadcast int8 activations with ``vpmaddubsw`` (u8 × s8 → pairs
  summed in int16; |sum| ≤ 2·15·127, so eight of them still fit an int16), then ``vpmaddwd`` by ones
  widens to int32 once per 32 k. Parallel over output tiles.
* ``dense_int8``: weights stored as u8 = 7-bit code + 64 (``kernels.quantize_int8``: 8 outputs × 4 k per
  32 bytes), activations quantized per row to 7-bit s8 codes once per call (the + 64 is taken back per
  row with 64·Σ x_q): per 8 k, two ``vpmaddubsw`` (weights × 4 broadcast activation codes) summed in
  int16 (|sum| ≤ 2·2·127·63 < 2^15), then ``vpmaddwd`` by ones into int32, as the conv below. A tile of
  rows × outputs with ≤ 8 int32 accumulators (4 rows × 16 outputs) stays in registers, each step's
  weight vectors loaded once for its rows.
  Where the packed weights fit in L2 and there are ≥ 8 row tiles (batched layers), one parallel loop
  over row tiles quantizes its rows and sweeps all output blocks; else (GEMV, large weights) the rows
  are quantized first and the parallel loop runs over output blocks × row tiles, block major, so a
  block's weights are read from memory once. Scratch lives outside the parallel loops: a buffer
  allocated inside one costs a workspace allocation and free per iteration.
* ``conv2d_int8``: activations quantized per sample to 7-bit codes stored as u8 = code + 64 in quads
  of input channels (padded spatially; the offset is taken back per output with Σ w), weights as 7-bit
  codes, 8 outputs × 4 channels per register: ``vpmaddubsw`` of two quads summed in int16
  (|sum| ≤ 2·2·127·63 < 2^15), then ``vpmaddwd`` by ones into int32: 64 multiply-adds per 3
  multiplier instructions. (An exact int8 × int8 ``vpmaddwd`` path, 16 per instruction, measured no
  faster than the fp32 FMA kernel on Zen 1, where both run on one multiplier pipe at the same rate.)
  A tile of ``owt`` output columns × ``ob`` channels stays in registers; parallel over (sample,
  output row). A single-channel conv (``kernels.conv_int8_taps``) puts a row of taps in the 4 lanes
  instead: 4 adjacent bytes of the quantized image, two rows of taps per widening.
"""

from __future__ import annotations

from tvm import tirx
from tvm.ir.expr import Expr
from tvm.script import tirx as T

from bitpass.backends.tvm import kernels, microkernels

#: fp32 lanes (int32 lanes) of one AVX2 register
LANES = 8
#: the code range these kernels take: 7 bits (``kernels.CONV_INT8_LEVELS``), so ``vpmaddubsw`` never saturates
LEVELS = kernels.CONV_INT8_LEVELS
#: input elements below which the conv's quantization prologue runs on one thread (~10 µs to wake the
#: pool on a busy machine, more than quantizing them)
PROLOGUE_PARALLEL_MIN = 1 << 15
#: row tiles below which the int8 dense parallelizes over output blocks, not row tiles
ROW_TILES_MIN = 8
#: packed int8 weights up to which a row tile sweeps all output blocks (``dense_int8_rows_first``): a
#: quarter of Zen 1's 512 KiB L2, leaving room for the activations
ROWS_FIRST_WEIGHT_BYTES = 128 << 10
#: k groups of 8 whose int16 sums are accumulated before widening: 4 × 2 products of ≤ 2·15·127 each
INT16_GROUPS = 4


def dense_int4_supported(k: int, nb: int, block_size: int) -> bool:
    return nb % LANES == 0 and block_size % 8 == 0 and k % block_size == 0


def dense_int4(m: int, k: int, n: int, nb: int, block_size: int, act: str, parallel: bool) -> tirx.PrimFunc:
    """4-bit weights × int8 activations (``kernels.dense_int4``) with ``vpmaddubsw``: up to ``INT16_GROUPS``
    groups of 8 k summed in int16, then widened by ``vpmaddwd``."""
    bs = block_size
    kg, groups, vecs = k // 8, bs // 8, nb // LANES
    gacc = next(g for g in range(min(INT16_GROUPS, groups), 0, -1) if groups % g == 0)

    @T.macro
    def accumulate(part, flat, xq, t, i, b):
        for go in range(groups // gacc):
            s16 = T.alloc_buffer((nb * 2,), "int16", scope="local")
            for j in T.vectorized(nb * 2):
                s16[j] = T.int16(0)
            for gi in T.unroll(gacc):
                for v in T.unroll(vecs):
                    s16[T.ramp(v * 16, 1, 16)] = s16[T.ramp(v * 16, 1, 16)] + _nibble_dot(
                        flat, xq, ((t * kg + (b * bs + (go * gacc + gi) * 8) // 8) * nb + v * 8) * 4,
                        i * k + b * bs + (go * gacc + gi) * 8)
            for v in T.unroll(vecs):
                part[T.ramp(v * 8, 1, 8)] = part[T.ramp(v * 8, 1, 8)] + T.call_llvm_pure_intrin(
                    "int32x8", "llvm.x86.avx2.pmadd.wd", s16[T.ramp(v * 16, 1, 16)], T.broadcast(T.int16(1), 16))

    return microkernels.dense_int4(m, k, n, nb, bs, act, parallel, LANES, accumulate)


def _nibble_dot(flat, xq, byte: Expr, xi: Expr) -> Expr:
    """int16x16: for 8 outputs, Σ over k..k+7 of nibble × x_q, as pairs (two ``vpmaddubsw``)."""
    codes = flat[tirx.Ramp(byte, 1, 32)]
    mask = tirx.Broadcast(tirx.const(15, "uint8"), 32)
    lo = tirx.bitwise_and(codes, mask)
    hi = tirx.bitwise_and(tirx.shift_right(codes, tirx.Broadcast(tirx.const(4, "uint8"), 32)), mask)

    def quad(offset):
        word = tirx.call_intrin("int32", "tirx.reinterpret", xq[tirx.Ramp(xi + offset, 1, 4)])
        return tirx.call_intrin("int8x32", "tirx.reinterpret", tirx.Broadcast(word, 8))

    def madd(u8, s8):
        return tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", u8, s8)

    return madd(lo, quad(0)) + madd(hi, quad(4))


def dense_int8_supported(nb: int) -> bool:
    return nb % LANES == 0


def dense_int8_rows(m: int, vecs: int) -> int:
    """Rows per register tile: ``rows × vecs`` int32 accumulators stay ≤ 8 registers, beside the 2 · vecs
    weight vectors of a step (16 ymm registers in all)."""
    return microkernels.divisor(m, 8 // vecs)


def dense_int8_rows_first(m: int, k: int, n: int, nb: int) -> bool:
    """Whether the int8 dense runs one parallel loop over row tiles, each quantizing its own rows and then
    sweeping all output blocks: one thread-pool wake instead of two, where the weights stay in a core's L2
    across row tiles and there are enough row tiles to share out (else: quantize, then output blocks)."""
    tiles = m // dense_int8_rows(m, nb // LANES)
    return tiles >= ROW_TILES_MIN and kernels.dense_int8_depth(k) * n <= ROWS_FIRST_WEIGHT_BYTES


def dense_int8(m: int, k: int, n: int, nb: int, act: str, parallel: bool) -> tirx.PrimFunc:
    """7-bit dense (``kernels.dense_int8``) with ``vpmaddubsw``: u8 weights (code + 64) × s8 activations."""
    kp = kernels.dense_int8_depth(k)
    quads, blocks, vecs = kp // 4, n // nb, nb // LANES
    mt = dense_int8_rows(m, vecs)
    mtiles = m // mt
    lanes = microkernels.simd_lanes(k, LANES)
    qlanes = 4 * LANES if k % (4 * LANES) == 0 else lanes  # 32 codes: one store per 4 conversions
    levels = float(kernels.DENSE_INT8_LEVELS)
    offset = kernels.DENSE_INT8_OFFSET
    floor = microkernels.floor(act)
    loop = microkernels.loop(parallel)
    prologue = microkernels.loop(parallel and m * k >= PROLOGUE_PARALLEL_MIN)

    @T.macro
    def quantize_row(x, i, amax, sx, lane_max, lane_sum, xoff, xq):
        """Row ``i``'s 7-bit activations (as ``kernels.dense_int8``), its scale and 64·Σ x_q."""
        for v in T.vectorized(lanes):
            lane_max[i * lanes + v] = T.float32(0)
        for v in T.vectorized(qlanes):
            lane_sum[i * qlanes + v] = 0
        for r in range(k // lanes):
            for v in T.vectorized(lanes):
                lane_max[i * lanes + v] = T.max(lane_max[i * lanes + v], T.fabs(x[i, r * lanes + v]))
        amax[i] = T.float32(1e-12)
        for v in range(lanes):
            amax[i] = T.max(amax[i], lane_max[i * lanes + v])
        sx[i] = amax[i] / T.float32(levels)
        for r in range(k // qlanes):
            for v in T.vectorized(qlanes):
                xq[i * kp + r * qlanes + v] = T.Cast(
                    "int8", T.Cast("int32", T.round(x[i, r * qlanes + v] * (T.float32(levels) / amax[i]))))
        for r in range(k // qlanes):
            for v in T.vectorized(qlanes):
                lane_sum[i * qlanes + v] = lane_sum[i * qlanes + v] + T.Cast("int32", xq[i * kp + r * qlanes + v])
        for r in range(kp - k):
            xq[i * kp + k + r] = T.int8(0)
        xoff[i] = 0
        for v in range(qlanes):
            xoff[i] = xoff[i] + lane_sum[i * qlanes + v]
        xoff[i] = xoff[i] * offset

    @T.macro
    def tile(blk, rt, wflat, xq, acc, xoff, sx, wscale, bias, out):
        """Rows ``rt``·mt.. × outputs ``blk``·nb..: the sums in registers, then requantized to ``out``."""
        for z in T.vectorized(mt * nb):
            acc[(blk * mtiles + rt) * mt * nb + z] = 0
        for q in range(quads // 2):
            for r in T.unroll(mt):
                for v in T.unroll(vecs):
                    acc[T.ramp((blk * mtiles + rt) * mt * nb + (r * vecs + v) * 8, 1, 8)] = \
                        acc[T.ramp((blk * mtiles + rt) * mt * nb + (r * vecs + v) * 8, 1, 8)] + \
                        T.call_llvm_pure_intrin(
                            "int32x8", "llvm.x86.avx2.pmadd.wd",
                            _weight_dots(wflat, xq, ((blk * quads + q * 2) * nb + v * 8) * 4, nb * 4,
                                         (rt * mt + r) * kp + q * 8),
                            T.broadcast(T.int16(1), 16))
        for r, v in T.grid(mt, vecs):
            for z in T.vectorized(LANES):
                out[rt * mt + r, blk * nb + v * LANES + z] = T.max(
                    T.Cast("float32", acc[(blk * mtiles + rt) * mt * nb + (r * vecs + v) * 8 + z] - xoff[rt * mt + r])
                    * (sx[rt * mt + r] * wscale[blk * nb + v * LANES + z]) + bias[blk * nb + v * LANES + z],
                    T.float32(floor))

    rows_first = dense_int8_rows_first(m, k, n, nb)

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((m, k), "float32"), codes: T.Buffer((blocks, quads, nb, 4), "uint8"),
               wscale: T.Buffer((n,), "float32"), bias: T.Buffer((n,), "float32"),
               out: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        wflat = T.decl_buffer((blocks * quads * nb * 4,), "uint8", data=codes.data)
        # scratch indexed by row or tile, allocated once: a buffer allocated inside the parallel loop
        # costs a workspace allocation and free per iteration
        amax = T.alloc_buffer((m,), "float32")
        sx = T.alloc_buffer((m,), "float32")
        lane_max = T.alloc_buffer((m * lanes,), "float32")
        lane_sum = T.alloc_buffer((m * qlanes,), "int32")
        xoff = T.alloc_buffer((m,), "int32")
        xq = T.alloc_buffer((m * kp,), "int8")
        acc = T.alloc_buffer((blocks * mtiles * mt * nb,), "int32")
        if rows_first:
            for rt in loop(mtiles):
                for r in range(mt):
                    quantize_row(x, rt * mt + r, amax, sx, lane_max, lane_sum, xoff, xq)
                for blk in range(blocks):
                    tile(blk, rt, wflat, xq, acc, xoff, sx, wscale, bias, out)
        else:
            for i in prologue(m):
                quantize_row(x, i, amax, sx, lane_max, lane_sum, xoff, xq)
            for t in loop(blocks * mtiles):  # output block major: a block's weights stay cached across row tiles
                tile(t // mtiles, t % mtiles, wflat, xq, acc, xoff, sx, wscale, bias, out)

    return kernel


def _weight_dots(wflat, xq, weight: Expr, weight_step: int, xi: Expr) -> Expr:
    """int16x16: for 8 outputs, Σ over two quads of k of (code + 64) × x_q, as pairs (two ``vpmaddubsw``:
    8 outputs × 4 weight bytes at ``weight``, the next quad ``weight_step`` bytes on; 4 activation codes
    at ``xi`` broadcast, then the next 4)."""
    total = None
    for s in range(2):
        word = tirx.call_intrin("int32", "tirx.reinterpret", xq[tirx.Ramp(xi + 4 * s, 1, 4)])
        acts = tirx.call_intrin("int8x32", "tirx.reinterpret", tirx.Broadcast(word, 8))
        dot = tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw",
                                         wflat[tirx.Ramp(weight + s * weight_step, 1, 32)], acts)
        total = dot if total is None else total + dot
    return total


@T.macro
def _weight_offsets(wflat, offset, oblocks, ob, words):
    """``offset[o]`` = 64·Σ w over output o's ``words`` weight words: with activations stored as code + 64,
    Σ (code + 64)·w = Σ code·w + 64·Σ w, and this is the second term (the kernel's own multiply-add with
    every activation at 64)."""
    for blk, v in T.grid(oblocks, ob // LANES):
        total = T.alloc_buffer((LANES,), "int32", scope="local")
        for z in T.vectorized(LANES):
            total[z] = 0
        for r in range(words):
            total[T.ramp(0, 1, LANES)] = total[T.ramp(0, 1, LANES)] + T.call_llvm_pure_intrin(
                "int32x8", "llvm.x86.avx2.pmadd.wd", T.call_llvm_pure_intrin(
                    "int16x16", "llvm.x86.avx2.pmadd.ub.sw", T.broadcast(T.int8(64), 32),
                    wflat[T.ramp(((blk * words + r) * ob + v * LANES) * 4, 1, 32)]),
                T.broadcast(T.int16(1), 16))
        for z in T.vectorized(LANES):
            offset[blk * ob + v * LANES + z] = total[z]


@T.macro
def _fill_code_zero(xq, size):
    """Every byte of the quantized image at code 0 (64), for the padding the prologue does not overwrite."""
    for zo in range(size // 32):
        for z in T.vectorized(32):
            xq[zo * 32 + z] = T.uint8(64)


@T.macro
def _requantize_nchw(acc, offset, sx, wscale, bias, out, row, xo, blk, oh, ob, owt, clamp):
    """A conv tile's int32 sums (``owt`` columns × ``ob`` channels) less the weight offsets, scaled, biased
    and clamped, stored to NCHW 8 channels at a time."""
    for v, xi in T.grid(ob // LANES, owt):
        for z in T.vectorized(LANES):
            out[row // oh, blk * ob + v * LANES + z, row % oh, xo * owt + xi] = T.max(
                T.Cast("float32", acc[xi * ob + v * LANES + z] - offset[blk * ob + v * LANES + z])
                * (sx[row // oh] * wscale[blk * ob + v * LANES + z]) + bias[blk * ob + v * LANES + z],
                T.float32(clamp))


def conv2d_int8_supported(ob: int, groups: int) -> bool:
    return ob % LANES == 0 and groups == 1


def conv2d_int8(shape: tuple[int, int, int, int], oc: int, ob: int, kernel: tuple[int, int],
                strides: tuple[int, int], pads: tuple[int, int, int, int], dilations: tuple[int, int],
                act: str, parallel: bool, taps: int = 0) -> tirx.PrimFunc:
    """int8 NCHW conv (``kernels.conv2d_int8``, groups = 1) with ``vpmaddubsw``: activations as u8 = code + 64."""
    if taps:
        return _conv2d_int8_taps(shape, oc, ob, (kernel[0], taps), strides, pads, dilations, act, parallel)
    n, c, h, wd = shape
    kh, kw = kernel
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = strides, dilations, pads
    hp, wp = h + pt + pb, wd + pl + pr
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    quads = kernels.conv_int8_channels(c) // 4
    pair = 2 if quads % 2 == 0 else 1  # quads summed in int16 before widening
    oblocks, vecs = oc // ob, ob // LANES
    owt = microkernels.divisor(ow, 8 // vecs)
    chw = c * h * wd
    lanes = microkernels.simd_lanes(chw, LANES)
    levels = float(kernels.CONV_INT8_LEVELS)
    floor = microkernels.floor(act)
    loop = microkernels.loop(parallel)
    # per sample: at batch 1 one iteration, which a parallel loop would only wake the pool for
    prologue = microkernels.loop(parallel and n > 1 and n * chw >= PROLOGUE_PARALLEL_MIN)
    steps = quads * kh * kw * 4  # weight codes per output
    xsize = n * quads * hp * wp * 4
    xsize += -xsize % 32
    xlanes = next(d for d in (8, 4, 2, 1) if wd % d == 0)

    @T.prim_func(private=True)
    def kernel_fn(data: T.Buffer((n, c, h, wd), "float32"), codes: T.Buffer((oblocks, quads, kh, kw, ob, 4), "int8"),
                  wscale: T.Buffer((oc,), "float32"), bias: T.Buffer((oc,), "float32"),
                  out: T.Buffer((n, oc, oh, ow), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        dflat = T.decl_buffer((n * chw,), "float32", data=data.data)
        wflat = T.decl_buffer((oblocks * steps * ob,), "int8", data=codes.data)
        sx = T.alloc_buffer((n,), "float32")
        offset = T.alloc_buffer((oc,), "int32")
        xq = T.alloc_buffer((xsize,), "uint8")
        _weight_offsets(wflat, offset, oblocks, ob, steps // 4)
        _fill_code_zero(xq, xsize)  # padding and padding channels hold code 0, i.e. 64
        for b in prologue(n):  # per-sample 7-bit activations, as kernels.conv2d_int8
            lane_max = T.alloc_buffer((lanes,), "float32", scope="local")
            amax = T.alloc_buffer((1,), "float32", scope="local")
            microkernels.absmax_scale(dflat, b * chw, chw, lanes, levels, lane_max, amax, sx, b)
            for ch, y, xo in T.grid(c, h, wd // xlanes):
                for xx in T.vectorized(xlanes):
                    xq[(((b * quads + ch // 4) * hp + y + pt) * wp + xo * xlanes + xx + pl) * 4 + ch % 4] = T.Cast(
                        "uint8", T.Cast("int32", T.round(data[b, ch, y, xo * xlanes + xx] * (T.float32(levels)
                                                                                          / amax[0]))) + 64)
        for row in loop(n * oh):
            for xo, blk in T.grid(ow // owt, oblocks):
                acc = T.alloc_buffer((owt * ob,), "int32", scope="local")
                for z in T.vectorized(owt * ob):
                    acc[z] = 0
                for qq, ky, kx in T.grid(quads // pair, kh, kw):
                    for v in T.unroll(vecs):
                        for xi in T.unroll(owt):
                            acc[T.ramp((xi * vecs + v) * 8, 1, 8)] = acc[T.ramp((xi * vecs + v) * 8, 1, 8)] + \
                                T.call_llvm_pure_intrin(
                                    "int32x8", "llvm.x86.avx2.pmadd.wd",
                                    _dots(xq, wflat, pair,
                                          ((((row // oh) * quads + qq * pair) * hp + (row % oh) * sh + ky * dh) * wp
                                           + (xo * owt + xi) * sw + kx * dw) * 4, hp * wp * 4,
                                          ((((blk * quads + qq * pair) * kh + ky) * kw + kx) * ob + v * 8) * 4,
                                          kh * kw * ob * 4),
                                    T.broadcast(T.int16(1), 16))
                _requantize_nchw(acc, offset, sx, wscale, bias, out, row, xo, blk, oh, ob, owt, floor)

    return kernel_fn


def _conv2d_int8_taps(shape: tuple[int, int, int, int], oc: int, ob: int, kernel: tuple[int, int],
                      strides: tuple[int, int], pads: tuple[int, int, int, int], dilations: tuple[int, int],
                      act: str, parallel: bool) -> tirx.PrimFunc:
    """The single-channel case (``kernels.conv_int8_taps``): a row of ≤ 4 taps per 32-bit lane, read as 4
    adjacent bytes of the quantized, padded image (a zero 4th tap reads one more byte of padding); two
    rows of taps summed in int16 per ``vpmaddwd``."""
    n, _, h, wd = shape
    kh, kw = kernel
    (sh, sw), (dh, _), (pt, pl, pb, pr) = strides, dilations, pads
    hp, wp = h + pt + pb, wd + pl + pr
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - kw) // sw + 1
    wq = wp + 4 - kw  # room for the zero taps
    oblocks, vecs = oc // ob, ob // LANES
    owt = microkernels.divisor(ow, 8 // vecs)
    hw = h * wd
    lanes = microkernels.simd_lanes(hw, LANES)
    levels = float(kernels.CONV_INT8_LEVELS)
    floor = microkernels.floor(act)
    loop = microkernels.loop(parallel)
    # per sample: at batch 1 one iteration, which a parallel loop would only wake the pool for
    prologue = microkernels.loop(parallel and n > 1 and n * hw >= PROLOGUE_PARALLEL_MIN)
    xsize = n * hp * wq
    xsize += -xsize % 32
    xlanes = next(d for d in (8, 4, 2, 1) if wd % d == 0)

    @T.prim_func(private=True)
    def kernel_fn(data: T.Buffer((n, 1, h, wd), "float32"), codes: T.Buffer((oblocks, 1, kh, 1, ob, 4), "int8"),
                  wscale: T.Buffer((oc,), "float32"), bias: T.Buffer((oc,), "float32"),
                  out: T.Buffer((n, oc, oh, ow), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        dflat = T.decl_buffer((n * hw,), "float32", data=data.data)
        wflat = T.decl_buffer((oblocks * kh * ob * 4,), "int8", data=codes.data)
        sx = T.alloc_buffer((n,), "float32")
        offset = T.alloc_buffer((oc,), "int32")
        xq = T.alloc_buffer((xsize,), "uint8")
        _weight_offsets(wflat, offset, oblocks, ob, kh)
        _fill_code_zero(xq, xsize)
        for b in prologue(n):
            lane_max = T.alloc_buffer((lanes,), "float32", scope="local")
            amax = T.alloc_buffer((1,), "float32", scope="local")
            microkernels.absmax_scale(dflat, b * hw, hw, lanes, levels, lane_max, amax, sx, b)
            for y, xo in T.grid(h, wd // xlanes):
                for xx in T.vectorized(xlanes):
                    xq[(b * hp + y + pt) * wq + xo * xlanes + xx + pl] = T.Cast(
                        "uint8", T.Cast("int32", T.round(data[b, 0, y, xo * xlanes + xx] * (T.float32(levels)
                                                                                            / amax[0]))) + 64)
        for row in loop(n * oh):
            for xo, blk in T.grid(ow // owt, oblocks):
                acc = T.alloc_buffer((owt * ob,), "int32", scope="local")
                for z in T.vectorized(owt * ob):
                    acc[z] = 0
                for kp in range(kh // 2):  # two rows of taps per widening; an odd last row alone
                    for v in T.unroll(vecs):
                        for xi in T.unroll(owt):
                            acc[T.ramp((xi * vecs + v) * 8, 1, 8)] = acc[T.ramp((xi * vecs + v) * 8, 1, 8)] + \
                                T.call_llvm_pure_intrin(
                                    "int32x8", "llvm.x86.avx2.pmadd.wd",
                                    _dots(xq, wflat, 2,
                                          ((row // oh) * hp + (row % oh) * sh + 2 * kp * dh) * wq
                                          + (xo * owt + xi) * sw, dh * wq, ((blk * kh + 2 * kp) * ob + v * 8) * 4,
                                          ob * 4),
                                    T.broadcast(T.int16(1), 16))
                for kt in range(kh % 2):
                    for v in T.unroll(vecs):
                        for xi in T.unroll(owt):
                            acc[T.ramp((xi * vecs + v) * 8, 1, 8)] = acc[T.ramp((xi * vecs + v) * 8, 1, 8)] + \
                                T.call_llvm_pure_intrin(
                                    "int32x8", "llvm.x86.avx2.pmadd.wd",
                                    _dots(xq, wflat, 1,
                                          ((row // oh) * hp + (row % oh) * sh + (kh - 1 + kt) * dh) * wq
                                          + (xo * owt + xi) * sw, 0, ((blk * kh + kh - 1 + kt) * ob + v * 8) * 4, 0),
                                    T.broadcast(T.int16(1), 16))
                _requantize_nchw(acc, offset, sx, wscale, bias, out, row, xo, blk, oh, ob, owt, floor)

    return kernel_fn


def _dots(xq, wflat, rows: int, byte: Expr, byte_step: int, weight: Expr, weight_step: int) -> Expr:
    """int16x16: for 8 outputs, Σ over ``rows`` steps of 4 lanes (channels or taps) of (code + 64) × w, as
    pairs of int16 lanes per output (``vpmaddubsw``: 4 activation bytes at ``byte`` broadcast, 8 outputs ×
    4 weight bytes at ``weight``; the next step ``byte_step`` / ``weight_step`` bytes on)."""
    total = None
    for r in range(rows):
        word = tirx.call_intrin("int32", "tirx.reinterpret", xq[tirx.Ramp(byte + r * byte_step, 1, 4)])
        acts = tirx.call_intrin("int8x32", "tirx.reinterpret", tirx.Broadcast(word, 8))
        dot = tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", acts,
                                         wflat[tirx.Ramp(weight + r * weight_step, 1, 32)])
        total = dot if total is None else total + dot
    return total
