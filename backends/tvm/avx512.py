"""Hand-written AVX-512 VNNI micro-kernels for bitpass's integer kernels, as TIR with LLVM intrinsic calls.

As ``avx2.py`` (TVM 0.27's ``tensorize`` crashes, and LLVM does not find ``vpdpbusd`` in TIR's vectorized
``sext × sext`` sums by itself), the schedule rules replace the TE kernel by one of these functions on
targets with AVX-512 and VNNI: same parameters, same weight layouts, same integer arithmetic
(``kernels.py``). ``vpdpbusd`` (``llvm.x86.avx512.vpdpbusd.512``) multiplies 64 unsigned bytes by 64
signed bytes and adds each group of four products straight into one of 16 int32 lanes: no int16 stage
and no saturation, so the codes use the full 8 bits (±127, ``kernels.Scheme``): the unsigned operand
stores ``code + 128``, taken back with 128 · Σ of the other operand.

* ``conv2d_int8``: activations quantized per sample to u8 = code + 128, four input channels of one pixel
  in one 32-bit word (written as whole words: four channel planes are read, packed by shifts, stored 16
  pixels at a time), weights as s8 codes, 16 outputs × 4 channels per register (``[OC/ob, ICq/4, KH, KW,
  ob, 4]``): per step, one broadcast word of activations, ``ob / 16`` weight registers, one ``vpdpbusd``
  per output column × register; a tile of ``owt`` columns × ``ob`` channels stays in ≤ 24 registers.
  Parallel over (output block, sample row, column tile), block outermost so a block's weights stay in
  cache, in one parallel launch with the prologue stages (weight sums, padding border, per-sample amax and
  packing, a batch's samples each packed while cached) separated by barriers. The epilogue fuses bias, a
  residual input and ReLU and stores each channel's columns as one vector. Between consecutive int8 convs
  the absmax travels with the activation: a writer keeps max |out| of each (output block, row) it stores
  in one slot (one iteration per slot: no barrier), the reader takes the maximum of the slots instead of a
  pass over its input (``kernels.conv2d_int8``'s ``amax`` / ``emit_amax``). A max pooling that reads the conv
  (ResNet's stem) runs in its epilogue: conv rows go to a per-task ring of rows in cache, pooled as soon as a
  window is complete, so the conv's full output is never written (``pool``).
* ``dense_int8``: weights u8 = code + 128 (``[N/nb, Kp/4, nb, 4]``: 16 outputs × 4 k per register),
  activations quantized per row to s8 codes, broadcast 4 at a time; a tile of rows × outputs in ≤ 24
  registers; 128 · Σ x_q per row taken back in the epilogue.
* ``dense_int4``: per 64 bytes of packed codes (16 outputs × 8 k), an AND and a shift give the low and
  high nibbles, each one ``vpdpbusd`` with 4 broadcast int8 activations, summed in int32 per block of
  ``bs`` k and scaled once per block. Parallel over output tiles, each streaming its contiguous weights.
"""

from __future__ import annotations

from tvm import tirx
from tvm.ir.expr import Expr
from tvm.script import tirx as T

from bitpass.backends.tvm import kernels, microkernels

#: int32 (fp32) lanes of one AVX-512 register
LANES = 16
#: the code range these kernels take: 8 bits (``kernels.Scheme`` with VNNI)
LEVELS = 127
OFFSET = LEVELS + 1
#: a 32-bit word of four u8 code-0 bytes (128 each)
PADDING_WORD = int.from_bytes(bytes([OFFSET] * 4), "little")
#: accumulator registers of a tile (32 zmm: the rest hold a step's weights and broadcast activations)
ACCUMULATORS = 24
#: the widest output-column tile of the conv
MAX_COLUMNS = 14
#: input elements below which a prologue runs on one thread
PROLOGUE_PARALLEL_MIN = 1 << 15
#: pixels of code 0 around an activation kept as codes between int8 convs (``u8_shape``): a reader with padding up
#: to this reads the writer's words in place
U8_PAD = 1
#: a parallel conv runs as one parallel launch with barriers between its stages (``body_one_launch``); False
#: gives the former launch per stage, for timing one against the other
ONE_LAUNCH = True


def _dot(acc: Expr, unsigned: Expr, signed: Expr) -> Expr:
    """``vpdpbusd``: acc (int32x16) + Σ over each 4 bytes of unsigned (u8x64) × signed (s8x64)."""
    return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, unsigned, signed)


def _broadcast_word(buffer, index: Expr, dtype: str) -> Expr:
    """The 4 bytes at ``index`` (a 32-bit word) in all 16 lanes, as 64 bytes of ``dtype``."""
    word = buffer[index]
    return tirx.call_intrin(f"{dtype}x64", "tirx.reinterpret", tirx.Broadcast(word, LANES))


def _broadcast_bytes(buffer, start: Expr, dtype: str) -> Expr:
    """4 consecutive bytes of ``buffer`` from ``start`` in all 16 lanes, as 64 bytes of ``dtype``."""
    word = tirx.call_intrin("int32", "tirx.reinterpret", buffer[tirx.Ramp(start, 1, 4)])
    return tirx.call_intrin(f"{dtype}x64", "tirx.reinterpret", tirx.Broadcast(word, LANES))


# --- conv ---------------------------------------------------------------------------------------
def conv2d_int8_supported(ob: int, groups: int, levels: int, taps: int) -> bool:
    return ob % LANES == 0 and groups == 1 and levels == LEVELS and taps == 0


def conv2d_int8_pool_supported(pool: tuple[int, int, int]) -> bool:
    return kernels.pool_fusable(pool)


def u8_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """An NCHW activation kept as codes: uint8 channels-last [N, H + 2·U8_PAD, W + 2·U8_PAD, C], the border code
    0 (a reader's broadcast word is four channels of one pixel; a writer stores a register's 16 channels as 16
    bytes)."""
    n, c, h, w = (int(d) for d in shape)
    return (n, h + 2 * U8_PAD, w + 2 * U8_PAD, c)


def u8_readable(channels: int, pads: tuple[int, int, int, int]) -> bool:
    """Whether a conv with these input channels and pads (top, left, bottom, right) reads codes in place."""
    pt, pl, pb, pr = pads
    return channels % 4 == 0 and pt == pb and pl == pr and max(pads) <= U8_PAD


def conv_columns(ow: int, vecs: int) -> int:
    """Output columns per tile: the largest divisor of ``ow`` within the accumulator budget."""
    return microkernels.divisor(ow, min(MAX_COLUMNS, ACCUMULATORS // vecs))


def conv2d_int8(shape: tuple[int, int, int, int], oc: int, ob: int, kernel: tuple[int, int],
                strides: tuple[int, int], pads: tuple[int, int, int, int], dilations: tuple[int, int],
                act: str, parallel: bool, residual: bool = False, amax_in: int = 0,
                amax_out: bool = False, pool: tuple[int, int, int] = (0, 0, 0), u8_in: float = 0.0,
                u8_out: float = 0.0, u8_res: float = 0.0, nhwc_out: float | bool = False,
                nhwc_res: float | bool = False) -> tirx.PrimFunc:
    """int8 NCHW conv (``kernels.conv2d_int8``, groups = 1, 8-bit codes) with ``vpdpbusd``; ``residual``,
    ``amax_in`` (the input absmax's slots per sample; 0: none) and ``amax_out`` add the TE kernel's optional
    parameters, in its order (data, codes, wscale, bias, [residual], [input absmax], out, [output absmax]).

    ``pool`` (kernel, stride, pad; kernel 0: none) fuses a square max pooling after the activation: per
    (output block, sample, band of pooled rows) the conv rows a band's windows need are computed into a ring of
    ``kernel`` rows held in cache ([row, column, channel]: a tile's accumulators are whole channel vectors per
    column), and each pooled row is taken from it as soon as its window is complete; ``out`` is the pooled
    tensor and the output absmax one slot per band. The conv's full output (102 MB for ResNet's stem at batch
    32) never reaches memory.

    ``u8_in`` / ``u8_out`` / ``u8_res`` (a calibrated scale; 0: fp32 NCHW): the input / output / residual input
    is an activation kept as codes between int8 convs (``u8_shape``): uint8 with zero point 0 (the output of a
    ReLU), channels last, bordered by ``U8_PAD`` pixels of code 0. A reader broadcasts four channels' bytes as
    they are (no absmax, no packing pass, no border: the writer wrote it); a writer requantizes its epilogue's
    fp32 values (bias, residual, ReLU) straight to codes, min(round(v / u8_out), 255), 16 channels per store.
    ``nhwc_out`` / ``nhwc_res``: the output / residual input is channels-last [N, H, W, C] (a conv without a ReLU
    whose output is the residual input of a conv that writes codes: that epilogue reads 16 channels at once):
    True for fp32, a scale for signed int8 codes (clip(round(v / scale), ±127), zero point 0, as ORT's U8S8 keeps
    a residual branch in 8 bits)."""
    n, c, h, wd = shape
    kh, kw = kernel
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = strides, dilations, pads
    reads_u8, writes_u8, res_u8 = u8_in > 0, u8_out > 0, u8_res > 0
    if reads_u8 and not u8_readable(c, pads):
        raise ValueError(f"a conv with pads {pads} over {c} channels cannot read codes bordered by {U8_PAD}")
    if writes_u8 and (act != "relu" or amax_out or oc % 4):
        raise ValueError("only a conv with a fused ReLU and no absmax output writes codes")
    if nhwc_out and (writes_u8 or amax_out or pool[0]) or nhwc_res and res_u8:
        raise ValueError("a channels-last fp32 output or residual is neither codes nor pooled nor with an absmax")
    hp, wp = h + pt + pb, wd + pl + pr
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    quads = kernels.conv_int8_channels(c) // 4
    oblocks, vecs = oc // ob, ob // LANES
    owt = conv_columns(ow, vecs)
    xtiles = ow // owt
    rows = n * oh
    chw = c * h * wd
    lanes = microkernels.simd_lanes(chw, LANES)
    floor = microkernels.floor(act)
    loop = microkernels.loop(parallel)
    prologue = microkernels.loop(parallel and n * chw >= PROLOGUE_PARALLEL_MIN)
    # one sample's absmax is one iteration: a parallel loop of one would only wake the pool and wait for it
    per_sample = microkernels.loop(parallel and n > 1 and n * chw >= PROLOGUE_PARALLEL_MIN)
    steps = quads * kh * kw  # weight words per output
    # the quantized image: padded, or for a strided 1×1 conv without padding only the pixels it reads
    # (a quarter of them at stride 2), which the main loop then walks with stride 1
    sub = kh == kw == 1 and not any(pads) and (sh, sw) != (1, 1) and not reads_u8
    qh, qw = (oh, ow) if sub else (hp, wp)  # the quantized image's rows and columns
    ih, iw = (oh, ow) if sub else (h, wd)  # the image pixels quantized into it
    qy, qx = (sh, sw) if sub else (1, 1)  # source step per quantized pixel
    qt, ql = (0, 0) if sub else (pt, pl)  # where the image starts in it
    ks, kt = (1, 1) if sub else (sh, sw)  # the main loop's strides over it
    ro, co = 0, 0  # where the conv's padded image starts in the quantized one (codes: inside their border)
    if reads_u8:
        qh, qw, ro, co = h + 2 * U8_PAD, wd + 2 * U8_PAD, U8_PAD - pt, U8_PAD - pl
    xlanes = microkernels.divisor(iw, LANES)
    # strided (sub) packing of whole channel quads reads each row's pixels as contiguous vectors, not gathers
    deinterleave = sub and qx > 1 and c % 4 == 0 and iw * qx <= wd
    words = n * quads * qh * qw
    inv_levels = float(LEVELS)
    slots_in, reads_amax = max(amax_in, 1), amax_in > 0
    pk, ps, pp = pool
    pooled = pk > 0
    if pooled and (residual or not conv2d_int8_pool_supported(pool)):
        raise ValueError(f"max pooling {pool} (kernel, stride, pad) cannot be fused: stride and pad must be below "
                         f"the kernel, and the conv must have no residual input")
    ph, pw = ((oh + 2 * pp - pk) // ps + 1, (ow + 2 * pp - pk) // ps + 1) if pooled else (oh, ow)
    bands = kernels.pool_bands(n * oblocks, ph) if pooled else 1
    brows = ph // bands
    out_shape, out_dtype = (u8_shape((n, oc, ph, pw)), "uint8") if writes_u8 else \
        ((n, ph, pw, oc) if nhwc_out else (n, oc, ph, pw), "float32" if isinstance(nhwc_out, bool) else "int8")
    res_shape, res_dtype = (u8_shape((n, oc, oh, ow)), "uint8") if res_u8 else \
        ((n, oh, ow, oc) if nhwc_res else (n, oc, oh, ow), "float32" if isinstance(nhwc_res, bool) else "int8")
    nhwc_inv = 0.0 if isinstance(nhwc_out, bool) else 1.0 / nhwc_out
    writes_nhwc = bool(nhwc_out)  # (TVMScript's conditions take bools only)
    data_shape = u8_shape(shape) if reads_u8 else shape
    inv_out = 1.0 / u8_out if writes_u8 else 0.0
    orows = ph + 2 * U8_PAD  # rows of the output codes, border included

    def residual_value(res, b, ch, y, x):  # the residual input at (b, ch, y, x) as fp32
        if nhwc_res:
            if isinstance(nhwc_res, bool):
                return res[b, y, x, ch]
            return tirx.Cast("float32", res[b, y, x, ch]) * tirx.const(nhwc_res, "float32")
        if not res_u8:
            return res[b, ch, y, x]
        return tirx.Cast("float32", res[b, y + U8_PAD, x + U8_PAD, ch]) * tirx.const(u8_res, "float32")

    def to_code(value):  # a value ≥ 0 (after the ReLU) as its uint8 code
        return tirx.Cast("uint8", tirx.Cast("int32", tirx.min(tirx.round(value * tirx.const(inv_out, "float32")),
                                                              tirx.const(255.0, "float32"))))
    aout_slots = oblocks * bands if pooled else oblocks * oh

    @T.macro
    def epilogue_codes(acc, offset, sx, wscale, bias, res, out, blk, row, xo):
        for xi, v in T.grid(owt, vecs):  # an accumulator register's 16 channels of one pixel: one 16-byte store
            for z in T.vectorized(LANES):
                out[row // oh, row % oh + U8_PAD, xo * owt + xi + U8_PAD, blk * ob + v * LANES + z] = to_code(T.max(
                    T.Cast("float32", acc[(xi * vecs + v) * LANES + z] - offset[blk * ob + v * LANES + z])
                    * (sx[row // oh] * wscale[blk * ob + v * LANES + z]) + bias[blk * ob + v * LANES + z]
                    + (residual_value(res, row // oh, blk * ob + v * LANES + z, row % oh, xo * owt + xi)
                       if residual else T.float32(0)),
                    T.float32(0)))

    def to_nhwc(value):  # fp32, or its signed int8 code
        if isinstance(nhwc_out, bool):
            return value
        return tirx.Cast("int8", tirx.Cast("int32", tirx.max(tirx.min(
            tirx.round(value * tirx.const(nhwc_inv, "float32")), tirx.const(127.0, "float32")),
            tirx.const(-127.0, "float32"))))

    @T.macro
    def epilogue_nhwc(acc, offset, sx, wscale, bias, res, out, blk, row, xo):
        for xi, v in T.grid(owt, vecs):  # an accumulator register's 16 channels of one pixel: one store
            for z in T.vectorized(LANES):
                out[row // oh, row % oh, xo * owt + xi, blk * ob + v * LANES + z] = to_nhwc(T.max(
                    T.Cast("float32", acc[(xi * vecs + v) * LANES + z] - offset[blk * ob + v * LANES + z])
                    * (sx[row // oh] * wscale[blk * ob + v * LANES + z]) + bias[blk * ob + v * LANES + z]
                    + (residual_value(res, row // oh, blk * ob + v * LANES + z, row % oh, xo * owt + xi)
                       if residual else T.float32(0)),
                    T.float32(floor)))

    @T.macro
    def epilogue_fp32(acc, offset, sx, wscale, bias, res, out, tmax, blk, row, xo):
        for v, z in T.grid(vecs, LANES):  # requantized a channel at a time: its owt columns are one NCHW store
            for xi in T.vectorized(owt):
                out[row // oh, blk * ob + v * LANES + z, row % oh, xo * owt + xi] = T.max(
                    T.Cast("float32", acc[(xi * vecs + v) * LANES + z] - offset[blk * ob + v * LANES + z])
                    * (sx[row // oh] * wscale[blk * ob + v * LANES + z]) + bias[blk * ob + v * LANES + z]
                    + (residual_value(res, row // oh, blk * ob + v * LANES + z, row % oh, xo * owt + xi)
                       if residual else T.float32(0)),
                    T.float32(floor))
                if amax_out:  # |out| per column, over the tiles of one (block, row)
                    tmax[xi] = T.max(tmax[xi], T.fabs(out[row // oh, blk * ob + v * LANES + z, row % oh,
                                                          xo * owt + xi]))

    @T.macro
    def epilogue(acc, offset, sx, wscale, bias, res, out, tmax, blk, row, xo):
        if writes_u8:
            epilogue_codes(acc, offset, sx, wscale, bias, res, out, blk, row, xo)
        elif writes_nhwc:
            epilogue_nhwc(acc, offset, sx, wscale, bias, res, out, blk, row, xo)
        else:
            epilogue_fp32(acc, offset, sx, wscale, bias, res, out, tmax, blk, row, xo)

    @T.macro
    def sample_scale(dflat, ain, sx, inv, b):  # per-sample amax, as kernels.conv2d_int8
        lane_max = T.alloc_buffer((lanes,), "float32", scope="local")
        amax = T.alloc_buffer((1,), "float32", scope="local")
        if reads_amax:  # the writer of the input left its absmax per (block, row): no pass over the input
            amax[0] = T.float32(microkernels.ABSMAX_FLOOR)
            for p in range(amax_in):
                amax[0] = T.max(amax[0], ain[b, p])
            sx[b] = amax[0] / T.float32(inv_levels)
        else:
            microkernels.absmax_scale(dflat, b * chw, chw, lanes, inv_levels, lane_max, amax, sx, b)
        inv[b] = T.float32(inv_levels) / amax[0]

    @T.macro
    def pack_plane(data, inv, xq, bq):  # 4 channel planes packed into words, 16 pixels per store
        if deinterleave:  # a strided 1×1 conv's pixels: contiguous loads, every qx-th lane kept (not a gather)
            dflat = T.decl_buffer((n * chw,), "float32", data=data.data)
            for y, xo in T.grid(ih, iw // xlanes):
                xq[T.ramp(((bq * qh) + y + qt) * qw + xo * xlanes + ql, 1, xlanes)] = _word_strided(
                    dflat, (((bq // quads) * c + (bq % quads) * 4) * h + y * qy) * wd + xo * xlanes * qx, h * wd,
                    xlanes, qx, inv[bq // quads])
        else:
            for y, xo in T.grid(ih, iw // xlanes):
                for xx in T.vectorized(xlanes):
                    xq[((bq * qh) + y + qt) * qw + xo * xlanes + xx + ql] = _word(
                        data, bq // quads, (bq % quads) * 4, c, y * qy, (xo * xlanes + xx) * qx, inv)

    @T.macro
    def quantize_all_then_pack(data, dflat, ain, sx, inv, xq):
        for b in per_sample(n):
            sample_scale(dflat, ain, sx, inv, b)
        for bq in prologue(n * quads):
            pack_plane(data, inv, xq, bq)

    @T.macro
    def quantize_per_sample(data, dflat, ain, sx, inv, xq):
        for b in per_sample(n):  # a sample packed right after its amax pass, while it is in cache
            sample_scale(dflat, ain, sx, inv, b)
            for q in range(quads):
                pack_plane(data, inv, xq, b * quads + q)

    # a batch's samples are quantized one at a time (the packing reads the sample the amax pass just read:
    # from cache, not memory); a single sample is split over its channel planes instead
    quantize = quantize_per_sample if n > 1 else quantize_all_then_pack

    @T.macro
    def weight_sums(wflat, offset, blk):  # Σ (code + 128)·w = Σ code·w + 128·Σ w: the second term
        for v in range(vecs):
            total = T.alloc_buffer((LANES,), "int32", scope="local")
            for z in T.vectorized(LANES):
                total[z] = 0
            for r in range(steps):
                total[T.ramp(0, 1, LANES)] = _dot(total[T.ramp(0, 1, LANES)], T.broadcast(T.uint8(OFFSET), 64),
                                                  wflat[T.ramp(((blk * steps + r) * ob + v * LANES) * 4, 1, 64)])
            for z in T.vectorized(LANES):
                offset[blk * ob + v * LANES + z] = total[z]

    @T.macro
    def border(xq, bq):  # the padding border holds code 0, i.e. 128 (the image is overwritten)
        for y in range(qh):
            if y < qt or y >= qt + ih:
                for z in range(qw):
                    xq[(bq * qh + y) * qw + z] = T.uint32(PADDING_WORD)
            else:
                for z in range(ql):
                    xq[(bq * qh + y) * qw + z] = T.uint32(PADDING_WORD)
                for z in range(qw - ql - iw):
                    xq[(bq * qh + y) * qw + ql + iw + z] = T.uint32(PADDING_WORD)

    def input_word(xq, b, q, y, x):  # channels 4q..4q+3 at (y, x) of the quantized image, in all 16 lanes
        if reads_u8:  # the writer's channels-last bytes
            return _broadcast_bytes(xq, ((b * qh + y) * qw + x) * c + q * 4, "uint8")
        return _broadcast_word(xq, ((b * quads + q) * qh + y) * qw + x, "uint8")

    @T.macro
    def accumulate(wflat, xq, acc, blk, row, xo):  # the int32 sums of one tile: (block, sample row, column tile)
        for z in T.vectorized(owt * ob):
            acc[z] = 0
        for q, ky, kx in T.grid(quads, kh, kw):
            for v in T.unroll(vecs):
                for xi in T.unroll(owt):
                    acc[T.ramp((xi * vecs + v) * LANES, 1, LANES)] = _dot(
                        acc[T.ramp((xi * vecs + v) * LANES, 1, LANES)],
                        input_word(xq, row // oh, q, (row % oh) * ks + ky * dh + ro,
                                   (xo * owt + xi) * kt + kx * dw + co),
                        wflat[T.ramp(((((blk * quads + q) * kh + ky) * kw + kx) * ob + v * LANES) * 4, 1, 64)])

    @T.macro
    def tile(wflat, xq, offset, sx, wscale, bias, res, out, tmax, t):
        acc = T.alloc_buffer((owt * ob,), "int32", scope="local")
        accumulate(wflat, xq, acc, t // (rows * xtiles), (t % (rows * xtiles)) // xtiles, t % xtiles)
        epilogue(acc, offset, sx, wscale, bias, res, out, tmax, t // (rows * xtiles), (t % (rows * xtiles)) // xtiles,
                 t % xtiles)

    @T.macro
    def ring_row(wflat, xq, offset, sx, wscale, bias, ring, blk, b, y):
        # conv row y of sample b and block blk into ring slot y % pk as [column, channel]: whole-vector stores of
        # the accumulators (bias, activation; no residual: ``conv2d_int8_pool_supported``)
        for xo in range(xtiles):
            acc = T.alloc_buffer((owt * ob,), "int32", scope="local")
            accumulate(wflat, xq, acc, blk, b * oh + y, xo)
            for xi, v in T.grid(owt, vecs):
                for z in T.vectorized(LANES):
                    ring[((y % pk) * ow + xo * owt + xi) * ob + v * LANES + z] = T.max(
                        T.Cast("float32", acc[(xi * vecs + v) * LANES + z] - offset[blk * ob + v * LANES + z])
                        * (sx[b] * wscale[blk * ob + v * LANES + z]) + bias[blk * ob + v * LANES + z],
                        T.float32(floor))

    def window_max(ring, py, px, ch):
        """max over pooled pixel (py, px)'s window of channel ``ch``'s conv outputs in the ring: rows and
        columns outside the image are clamped to its edge, a pixel the window holds anyway (no padding value,
        whatever the activation)."""
        value = None
        for ky in range(pk):
            y = tirx.max(tirx.min(py * ps - pp + ky, oh - 1), 0)
            for kx in range(pk):
                x = tirx.max(tirx.min(px * ps - pp + kx, ow - 1), 0)
                item = ring[(tirx.floormod(y, pk) * ow + x) * ob + ch]
                value = item if value is None else tirx.max(value, item)
        return value

    @T.macro
    def pool_row_codes(ring, out, blk, b, py):  # the pooled values (≥ 0: after the ReLU) as codes, 16 per store
        for px, v in T.grid(pw, vecs):
            for z in T.vectorized(LANES):
                out[b, py + U8_PAD, px + U8_PAD, blk * ob + v * LANES + z] = to_code(
                    window_max(ring, py, px, v * LANES + z))

    @T.macro
    def pool_row_fp32(ring, out, pmax, blk, b, py):
        for px, v in T.grid(pw, vecs):
            for z in T.vectorized(LANES):
                out[b, blk * ob + v * LANES + z, py, px] = window_max(ring, py, px, v * LANES + z)
                if amax_out:
                    pmax[z] = T.max(pmax[z], T.fabs(out[b, blk * ob + v * LANES + z, py, px]))

    @T.macro
    def pool_row(ring, out, pmax, blk, b, py):
        if writes_u8:
            pool_row_codes(ring, out, blk, b, py)
        else:
            pool_row_fp32(ring, out, pmax, blk, b, py)

    @T.macro
    def pooled_band(wflat, xq, offset, sx, wscale, bias, out, aout, it):
        # task it: block it // (n·bands), sample it // bands % n, band it % bands of pooled rows; the conv rows
        # of its windows computed once each, in order, into a ring of pk rows (the band's first window also
        # needs the pk - ps rows above its own)
        ring = T.alloc_buffer((pk * ow * ob,), "float32")
        pmax = T.alloc_buffer((LANES,), "float32", scope="local")
        total = T.alloc_buffer((1,), "float32", scope="local")
        for z in T.vectorized(LANES):
            pmax[z] = T.float32(0)
        for r in range(pk - ps):
            if (it % bands) * brows * ps - pp + r >= 0:
                ring_row(wflat, xq, offset, sx, wscale, bias, ring, it // (n * bands), it // bands % n,
                         (it % bands) * brows * ps - pp + r)
        for i in range(brows):
            for r in range(ps):
                if ((it % bands) * brows + i) * ps - pp + pk - ps + r >= 0 and \
                        ((it % bands) * brows + i) * ps - pp + pk - ps + r < oh:
                    ring_row(wflat, xq, offset, sx, wscale, bias, ring, it // (n * bands), it // bands % n,
                             ((it % bands) * brows + i) * ps - pp + pk - ps + r)
            pool_row(ring, out, pmax, it // (n * bands), it // bands % n, (it % bands) * brows + i)
        if amax_out:
            total[0] = T.float32(0)
            for z in range(LANES):
                total[0] = T.max(total[0], pmax[z])
            aout[it // bands % n, (it // (n * bands)) * bands + it % bands] = total[0]

    @T.macro
    def row_tiles(wflat, xq, offset, sx, wscale, bias, res, out, aout, tr):
        # amax_out: the tiles of one (block, output row) in one iteration, their absmax to that slot (no two
        # threads write one slot, and no barrier: the reader reduces the slots)
        tmax = T.alloc_buffer((owt,), "float32", scope="local")
        total = T.alloc_buffer((1,), "float32", scope="local")
        for xi in T.vectorized(owt):
            tmax[xi] = T.float32(0)
        for xo in range(xtiles):
            tile(wflat, xq, offset, sx, wscale, bias, res, out, tmax, tr * xtiles + xo)
        total[0] = T.float32(0)
        for xi in range(owt):
            total[0] = T.max(total[0], tmax[xi])
        aout[(tr % rows) // oh, (tr // rows) * oh + tr % rows % oh] = total[0]

    @T.macro
    def input_scales_u8(sx):  # codes in: the calibrated scale, and no Σ w term (zero point 0)
        for b in range(n):
            sx[b] = T.float32(u8_in)

    @T.macro
    def zero_offsets(offset):
        for z in range(oc):
            offset[z] = 0

    @T.macro
    def out_border(out, by):  # codes out: the border of row by % orows of sample by // orows holds code 0
        if by % orows < U8_PAD or by % orows >= ph + U8_PAD:
            for x, ch in T.grid(pw + 2 * U8_PAD, oc):
                out[by // orows, by % orows, x, ch] = T.uint8(0)
        else:
            for x, ch in T.grid(U8_PAD, oc):
                out[by // orows, by % orows, x, ch] = T.uint8(0)
                out[by // orows, by % orows, pw + U8_PAD + x, ch] = T.uint8(0)

    @T.macro
    def main_loop(wflat, xq, offset, sx, wscale, bias, res, out, aout, par):
        if pooled:
            for it in par(oblocks * n * bands):
                pooled_band(wflat, xq, offset, sx, wscale, bias, out, aout, it)
        elif amax_out:
            for tr in par(oblocks * rows):
                row_tiles(wflat, xq, offset, sx, wscale, bias, res, out, aout, tr)
        else:
            for t in par(oblocks * rows * xtiles):  # block outermost: its weights stay cached across rows
                tile(wflat, xq, offset, sx, wscale, bias, res, out, sx, t)  # (no absmax: its buffer is not read)

    @T.macro
    def body_serial_stages(data, dflat, xq, codes, wscale, bias, res, ain, out, aout):
        wflat = T.decl_buffer((oblocks * steps * ob * 4,), "int8", data=codes.data)
        sx = T.alloc_buffer((n,), "float32")
        inv = T.alloc_buffer((n,), "float32")
        offset = T.alloc_buffer((oc,), "int32")
        if reads_u8:
            input_scales_u8(sx)
            zero_offsets(offset)
        else:
            for blk in range(oblocks):
                weight_sums(wflat, offset, blk)
            for bq in range(n * quads):
                border(xq, bq)
            quantize(data, dflat, ain, sx, inv, xq)
        if writes_u8:
            for bq in range(n * orows):
                out_border(out, bq)
        main_loop(wflat, xq, offset, sx, wscale, bias, res, out, aout, loop)

    @T.macro
    def scale_first(dflat, ain, sx, inv):  # one sample: its amax in the first stage, its planes packed in the second
        for b in T.parallel(n):
            sample_scale(dflat, ain, sx, inv, b)

    @T.macro
    def pack_second(data, dflat, ain, sx, inv, xq):
        for bq in T.parallel(n * quads):
            pack_plane(data, inv, xq, bq)

    @T.macro
    def no_stage(dflat, ain, sx, inv):
        T.evaluate(0)

    @T.macro
    def scale_and_pack_second(data, dflat, ain, sx, inv, xq):  # a batch: each sample's amax and packing together
        for b in T.parallel(n):
            sample_scale(dflat, ain, sx, inv, b)
            for q in range(quads):
                pack_plane(data, inv, xq, b * quads + q)

    first_scales, second = (scale_first, pack_second) if n == 1 else (no_stage, scale_and_pack_second)

    @T.macro
    def body_one_launch(data, dflat, xq, codes, wscale, bias, res, ain, out, aout):
        # one parallel launch per call: the pool's threads are woken once and wait for each other at two
        # barriers (weight sums, padding border and a single sample's amax; packing), not woken for every
        # stage with the serial stages run by one thread while the others sleep
        wflat = T.decl_buffer((oblocks * steps * ob * 4,), "int8", data=codes.data)
        sx = T.alloc_buffer((n,), "float32")
        inv = T.alloc_buffer((n,), "float32")
        offset = T.alloc_buffer((oc,), "int32")
        with T.attr(0, "pragma_parallel_launch_point", 1):
            if reads_u8:  # codes in: nothing to prepare but the scales (and the output's border)
                with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                    for bq in T.parallel(n * orows if writes_u8 else 1):
                        if bq == 0:
                            input_scales_u8(sx)
                            zero_offsets(offset)
                        if writes_u8:
                            out_border(out, bq)
            else:
                with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                    for blk in T.parallel(oblocks):
                        weight_sums(wflat, offset, blk)
                    for bq in T.parallel(n * quads):
                        border(xq, bq)
                    if writes_u8:
                        for bq in T.parallel(n * orows):
                            out_border(out, bq)
                    first_scales(dflat, ain, sx, inv)
                with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                    second(data, dflat, ain, sx, inv, xq)
            main_loop(wflat, xq, offset, sx, wscale, bias, res, out, aout, T.parallel)

    body = body_one_launch if parallel and ONE_LAUNCH else body_serial_stages

    # every optional parameter declared, then those this kernel does not take dropped from the signature (the
    # body reads none of them)
    if reads_u8:
        @T.prim_func(private=True)
        def kernel_fn(data: T.Buffer(data_shape, "uint8"), codes: T.Buffer((oblocks, quads, kh, kw, ob, 4), "int8"),
                      wscale: T.Buffer((oc,), "float32"), bias: T.Buffer((oc,), "float32"),
                      res: T.Buffer(res_shape, res_dtype), ain: T.Buffer((n, slots_in), "float32"),
                      out: T.Buffer(out_shape, out_dtype), aout: T.Buffer((n, aout_slots), "float32")):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            xq = T.decl_buffer((n * qh * qw * c,), "uint8", data=data.data)  # the writer's codes, border included
            body(data, xq, xq, codes, wscale, bias, res, ain, out, aout)
    else:
        @T.prim_func(private=True)
        def kernel_fn(data: T.Buffer(data_shape, "float32"), codes: T.Buffer((oblocks, quads, kh, kw, ob, 4), "int8"),
                      wscale: T.Buffer((oc,), "float32"), bias: T.Buffer((oc,), "float32"),
                      res: T.Buffer(res_shape, res_dtype), ain: T.Buffer((n, slots_in), "float32"),
                      out: T.Buffer(out_shape, out_dtype), aout: T.Buffer((n, aout_slots), "float32")):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            dflat = T.decl_buffer((n * chw,), "float32", data=data.data)
            xq = T.alloc_buffer((words,), "uint32")  # 4 channels' u8 codes per word
            body(data, dflat, xq, codes, wscale, bias, res, ain, out, aout)

    return microkernels.taking(kernel_fn, (True, True, True, True, residual, amax_in > 0, True, amax_out))


def _word(data, b: Expr, ch: Expr, c: int, y: Expr, x: Expr, inv) -> Expr:
    """Channels ``ch``..``ch`` + 3's u8 codes at (y, x) packed into one 32-bit word, lowest channel first."""
    word = _code(data, b, ch, c, y, x, inv)
    for i in range(1, 4):
        word = word | (_code(data, b, ch + i, c, y, x, inv) << (8 * i))
    return word


def _word_strided(dflat, start: Expr, plane: int, lanes: int, step: int, inv: Expr) -> Expr:
    """``lanes`` words of 4 channels' u8 codes from every ``step``-th pixel from ``start`` (flat NCHW) on, the
    channels ``plane`` apart: each channel's pixels one contiguous load, its every ``step``-th lane kept by a
    shuffle (the vectorizer would make ``lanes`` scalar loads of a strided index)."""
    scale = tirx.Broadcast(inv, lanes)
    word = None
    for i in range(4):
        wide = dflat[tirx.Ramp(start + i * plane, 1, lanes * step)]
        pixels = tirx.Shuffle([wide], [tirx.const(j * step, "int32") for j in range(lanes)])
        code = tirx.Cast(f"uint32x{lanes}", tirx.Cast(f"int32x{lanes}", tirx.round(pixels * scale))
                         + tirx.Broadcast(tirx.const(OFFSET, "int32"), lanes))
        code = code if i == 0 else code << tirx.Broadcast(tirx.const(8 * i, "uint32"), lanes)
        word = code if word is None else word | code
    return word


def _code(data, b: Expr, ch: Expr, c: int, y: Expr, x: Expr, inv) -> Expr:
    """Channel ``ch``'s u8 code (code + 128, in a uint32) at (y, x); 128 for the padding channels ≥ ``c``."""
    value = data[b, tirx.min(ch, c - 1), y, x]
    code = tirx.Cast("uint32", tirx.Cast("int32", tirx.round(value * inv[b])) + OFFSET)
    return tirx.Select(ch < c, code, tirx.const(OFFSET, "uint32"))


# --- dense --------------------------------------------------------------------------------------
def dense_int8_supported(nb: int, levels: int) -> bool:
    return nb % LANES == 0 and levels == LEVELS


def dense_rows(m: int, vecs: int) -> int:
    """Rows per register tile: ``rows × vecs`` accumulators within the budget."""
    return microkernels.divisor(m, max(1, min(12, ACCUMULATORS // vecs)))


def dense_int8(m: int, k: int, n: int, nb: int, act: str, parallel: bool) -> tirx.PrimFunc:
    """8-bit dense (``kernels.dense_int8``) with ``vpdpbusd``: u8 weights (code + 128) × s8 activations."""
    kp = kernels.dense_int8_depth(k)
    quads, blocks, vecs = kp // 4, n // nb, nb // LANES
    mt = dense_rows(m, vecs)
    mtiles = m // mt
    lanes = microkernels.simd_lanes(k, LANES)
    floor = microkernels.floor(act)
    loop = microkernels.loop(parallel)
    prologue = microkernels.loop(parallel and m * k >= PROLOGUE_PARALLEL_MIN)

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((m, k), "float32"), codes: T.Buffer((blocks, quads, nb, 4), "uint8"),
               wscale: T.Buffer((n,), "float32"), bias: T.Buffer((n,), "float32"),
               out: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        wflat = T.decl_buffer((blocks * quads * nb * 4,), "uint8", data=codes.data)
        sx = T.alloc_buffer((m,), "float32")
        xoff = T.alloc_buffer((m,), "int32")
        xq = T.alloc_buffer((m * kp,), "int8")
        for i in prologue(m):  # row i's 8-bit activations, its scale and 128·Σ x_q
            lane_max = T.alloc_buffer((lanes,), "float32", scope="local")
            lane_sum = T.alloc_buffer((lanes,), "int32", scope="local")
            amax = T.alloc_buffer((1,), "float32", scope="local")
            total = T.alloc_buffer((1,), "int32", scope="local")
            for v in T.vectorized(lanes):
                lane_max[v] = T.float32(0)
                lane_sum[v] = 0
            for r in range(k // lanes):
                for v in T.vectorized(lanes):
                    lane_max[v] = T.max(lane_max[v], T.fabs(x[i, r * lanes + v]))
            amax[0] = T.float32(1e-12)
            for v in range(lanes):
                amax[0] = T.max(amax[0], lane_max[v])
            sx[i] = amax[0] / T.float32(LEVELS)
            for r in range(k // lanes):
                for v in T.vectorized(lanes):
                    xq[i * kp + r * lanes + v] = T.Cast(
                        "int8", T.Cast("int32", T.round(x[i, r * lanes + v] * (T.float32(LEVELS) / amax[0]))))
                    lane_sum[v] = lane_sum[v] + T.Cast("int32", xq[i * kp + r * lanes + v])
            for r in range(kp - k):
                xq[i * kp + k + r] = T.int8(0)
            total[0] = 0
            for v in range(lanes):
                total[0] = total[0] + lane_sum[v]
            xoff[i] = total[0] * OFFSET
        for t in loop(blocks * mtiles):  # output block major: a block's weights stay cached across row tiles
            acc = T.alloc_buffer((mt * nb,), "int32", scope="local")
            for z in T.vectorized(mt * nb):
                acc[z] = 0
            for q in range(quads):
                for r in T.unroll(mt):
                    for v in T.unroll(vecs):
                        acc[T.ramp((r * vecs + v) * LANES, 1, LANES)] = _dot(
                            acc[T.ramp((r * vecs + v) * LANES, 1, LANES)],
                            wflat[T.ramp((((t // mtiles) * quads + q) * nb + v * LANES) * 4, 1, 64)],
                            _broadcast_bytes(xq, ((t % mtiles) * mt + r) * kp + q * 4, "int8"))
            for r, v in T.grid(mt, vecs):
                for z in T.vectorized(LANES):
                    out[(t % mtiles) * mt + r, (t // mtiles) * nb + v * LANES + z] = T.max(
                        T.Cast("float32", acc[(r * vecs + v) * LANES + z] - xoff[(t % mtiles) * mt + r])
                        * (sx[(t % mtiles) * mt + r] * wscale[(t // mtiles) * nb + v * LANES + z])
                        + bias[(t // mtiles) * nb + v * LANES + z], T.float32(floor))

    return kernel


def dense_int4_supported(k: int, nb: int, block_size: int) -> bool:
    return nb % LANES == 0 and block_size % 8 == 0 and k % block_size == 0


def dense_int4(m: int, k: int, n: int, nb: int, block_size: int, act: str, parallel: bool) -> tirx.PrimFunc:
    """4-bit weights × int8 activations (``kernels.dense_int4``) with ``vpdpbusd``: int32 sums throughout."""
    bs = block_size
    kg, groups, vecs = k // 8, bs // 8, nb // LANES

    @T.macro
    def accumulate(part, flat, xq, t, i, b):
        for g in range(groups):
            for v in T.unroll(vecs):
                part[T.ramp(v * LANES, 1, LANES)] = _nibble_dots(
                    part[T.ramp(v * LANES, 1, LANES)], flat,
                    ((t * kg + b * groups + g) * nb + v * LANES) * 4, xq, i * k + b * bs + g * 8)

    return microkernels.dense_int4(m, k, n, nb, bs, act, parallel, LANES, accumulate)


def _nibble_dots(acc: Expr, flat, byte: Expr, xq, xi: Expr) -> Expr:
    """acc + for 16 outputs Σ over k..k+7 of nibble × x_q (two ``vpdpbusd``: low nibbles with x_q[k..k+3],
    high nibbles with x_q[k+4..k+7])."""
    codes = flat[tirx.Ramp(byte, 1, 64)]
    mask = tirx.Broadcast(tirx.const(15, "uint8"), 64)
    lo = tirx.bitwise_and(codes, mask)
    hi = tirx.shift_right(codes, tirx.Broadcast(tirx.const(4, "uint8"), 64))
    return _dot(_dot(acc, lo, _broadcast_bytes(xq, xi, "int8")), hi, _broadcast_bytes(xq, xi + 4, "int8"))
