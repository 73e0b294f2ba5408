"""bitpass's own compute kernels (TE) and the weight layouts they read, packed in numpy at compile time.

Every kernel is a TE compute whose blocks carry the names the schedule rules look for
(``schedules.py``); the PrimFunc is tagged ``bitpass.kernel`` with the kernel's kind and
tile sizes so a rule never has to guess. Weight layouts are "output block innermost":
a weight for ``N`` outputs is stored as ``[N / nb, K, nb]`` so the innermost, vectorized
loop reads ``nb`` contiguous outputs' weights for one reduction index.

Kernels
-------
* ``dense``: fp32 ``x[M, K] @ W[K, N] + b`` with a fused activation.
* ``dense_int8``: 7-bit weight codes (±63, per-output-channel scale; ``DENSE_INT8_LEVELS``) × 7-bit
  activations quantized per row on the fly, int32 accumulation, requantized to fp32 with fused bias and
  activation. The 7 bits are the int8 conv's (below), for the same reason: on AVX2 a ``vpmaddubsw`` of
  u8 weights (code + 64) × s8 activations sums two steps in int16 without saturating (``avx2.py``); the
  + 64 is taken back per row with 64·Σ x_q. Weights are stored ``[N/nb, Kp/4, nb, 4]`` uint8: 4
  reduction indices of one output per 32-bit lane, K zero-padded (code 0, byte 64) to ``Kp``, a
  multiple of 8 (``dense_int8_depth``): two quads are summed in int16 before widening.
* ``dense_int4``: 4-bit weights (two codes per byte, fp16 scale per block of ``bs`` reduction
  indices) × int8 activations quantized per block of ``bs`` on the fly (as ORT's MatMulNBits with
  accuracy_level 4): per block the unsigned nibbles (code + 8) × int8 x are summed in int32, corrected
  for the offset with the block's Σ x_q and scaled once in fp32. The byte layout
  ``[N/nb, K/8, nb, 4]`` puts k..k+3 of one output in the low nibbles of 4 adjacent bytes and k+4..k+7
  in their high nibbles, so one 32-byte load, an AND and a shift give two u8×s8 multiply-add
  operands (``vpmaddubsw``, ``avx2.py``).
* ``conv2d``: fp32 NCHW convolution (groups, so depthwise too) with fused bias and activation,
  computed with output channels innermost and written back to NCHW by the epilogue; with groups = 1 its
  input, output and residual may each be blocked NCHW{16}c instead (what fp32 convs pass each other on
  AVX-512: the epilogue then stores whole registers), its weights then ``[OC/ob, IC/16, KH, KW, 16, ob]``.
* ``conv2d_int8``: int8 weights (per-output-channel scale) × int8 activations quantized per sample on
  the fly, int32 accumulation, requantized to fp32 with fused bias and activation. Codes use 7 bits
  (±63, ``CONV_INT8_LEVELS``: ORT's "reduce_range" for AVX2 without VNNI) so that the u8 × s8
  multiply-add (``vpmaddubsw``, ``avx2.py``) never saturates and two steps sum in int16: on Zen 1 an
  exact int16 ``vpmaddwd`` path only matches fp32 FMA throughput. Weights are stored
  ``[OC/ob, ICq/4, KH, KW, ob, 4]``: 4 input channels of one output per 32-bit lane; a single-channel
  conv (a first layer) holds a row of taps there instead (``conv_int8_taps``).

The int8 code range depends on the target (``Scheme``): 7 bits (±63) where AVX2's ``vpmaddubsw`` sums
pairs in int16, 8 bits (±127) with AVX-512 VNNI's ``vpdpbusd`` and on the portable path; the unsigned
operand stores ``code + levels + 1``.

The TE computes are the definition and the portable (aarch64) path; on AVX2 and AVX-512 VNNI targets the
schedule rules substitute the hand-written micro-kernels of ``avx2.py`` and ``avx512.py``, which read the
same layouts and compute the same integers (TVM 0.27's ``tensorize`` crashes, so the intrinsics are called
from TIR directly). The fp32 and int8 convolutions fuse a residual input (a skip connection) into their
epilogue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ACTIVATIONS = ("none", "relu")


@dataclass(frozen=True)
class Scheme:
    """What a target's kernels look like: fp32 ``lanes`` per vector register (tile widths), the int8 code
    range (±``int8_levels``), whether the int8 conv kernel fuses a residual input and whether int8 convs pass
    each other their activations' absmax (``int8_amax_carry``). With VNNI
    (``vpdpbusd``: u8 × s8, four products summed straight into int32) the codes use the full 8 bits; on
    AVX2 without it, 7 bits (``vpmaddubsw`` sums pairs in int16, which 8-bit codes would saturate; see
    ``CONV_INT8_LEVELS``); the portable TE kernels compute in int32 and take either."""

    lanes: int
    int8_levels: int
    int8_residual: bool = True
    #: consecutive int8 convs carry the per-sample absmax (``conv2d_int8``'s ``amax`` / ``emit_amax``): where the
    #: target's micro-kernel takes it in its epilogue (VNNI); the portable schedule would reduce it serially
    int8_amax_carry: bool = False
    #: an int8 conv followed by a max pooling computes the pooling in its epilogue (``conv2d_int8``'s ``pool``):
    #: where the target's micro-kernel does (VNNI)
    int8_pool: bool = False
    #: with calibrated activation ranges, an int8 conv with a ReLU read only by int8 convs writes uint8 codes of
    #: a static scale that they read in place (``avx512.u8_shape``): where the target's micro-kernel does (VNNI)
    int8_codes: bool = False
    #: fp32 convs pass each other their activations blocked NCHW{fp32_block}c (channels per block; 0: NCHW), as
    #: ORT does on AVX-512: a conv's epilogue stores whole registers, no transposing write-back (``conv2d``)
    fp32_block: int = 0

    @property
    def int8_offset(self) -> int:
        """The unsigned operand of the integer multiply-adds stores ``code + offset`` (1..2·levels+1)."""
        return self.int8_levels + 1


def scheme_for(features) -> Scheme:
    """The kernel scheme of a target with ``features`` (``targets.TargetSpec`` vocabulary)."""
    features = frozenset(features)
    lanes = 16 if "avx512" in features else 8 if "avx2" in features else 4
    block = 16 if "avx512" in features else 0
    if "vnni" in features:
        return Scheme(lanes, 127, int8_amax_carry=True, int8_pool=True, int8_codes=True, fp32_block=block)
    if "avx2" in features:  # the AVX2 micro-kernels (avx2.py): 7-bit codes, no residual epilogue
        return Scheme(lanes, CONV_INT8_LEVELS, int8_residual=False, fp32_block=block)
    return Scheme(lanes, 127)


def _divisor_at_most(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def out_block(n: int, lanes: int) -> int:
    """Output channels per tile: two vectors where they divide ``n``, else the largest power of two that does."""
    for nb in (2 * lanes, lanes, 8, 4, 2):
        if n % nb == 0:
            return nb
    return 1


def int4_out_block(n: int, lanes: int) -> int:
    """Output tile of the 4-bit kernel: four vectors where they divide ``n`` (four int16 accumulators of
    8 outputs share each broadcast of the activations; 128 contiguous bytes of codes per 8 k)."""
    for nb in (4 * lanes, 2 * lanes, lanes, 8, 4, 2):
        if n % nb == 0:
            return nb
    return 1


# --- weight layouts (numpy) ---------------------------------------------------------------------
def pack_dense(w_kn: np.ndarray, nb: int) -> np.ndarray:
    """[K, N] -> [N/nb, K, nb] fp32."""
    k, n = w_kn.shape
    return np.ascontiguousarray(w_kn.reshape(k, n // nb, nb).transpose(1, 0, 2)).astype(np.float32)


#: levels of the int8 dense's weight and activation codes: 7 bits, as the int8 conv (``CONV_INT8_LEVELS``)
DENSE_INT8_LEVELS = 63
#: the int8 dense stores weight code c as the byte c + 64 (unsigned, for ``vpmaddubsw``'s u8 operand)
DENSE_INT8_OFFSET = 64


def dense_int8_depth(k: int) -> int:
    """The reduction length the int8 dense layout holds: K rounded up to whole pairs of quads (8)."""
    return -(-k // 8) * 8


def quantize_int8(w_kn: np.ndarray, nb: int, levels: int = DENSE_INT8_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric codes in ±``levels`` (7 bits by default, ``DENSE_INT8_LEVELS``) stored as
    bytes code + levels + 1: codes [N/nb, Kp/4, nb, 4] uint8 (``dense_int8_depth``; padding holds code 0)
    and scales [N] fp32."""
    k, n = w_kn.shape
    amax = np.abs(w_kn).max(axis=0)
    scale = np.where(amax > 0, amax / levels, 1.0).astype(np.float32)
    codes = np.clip(np.rint(w_kn / scale), -levels, levels).astype(np.int16)
    kp = dense_int8_depth(k)
    codes = np.pad(codes, ((0, kp - k), (0, 0))) + (levels + 1)
    tiles = codes.reshape(kp // 4, 4, n // nb, nb).transpose(2, 0, 3, 1)  # [N/nb, Kp/4, nb, 4]
    return np.ascontiguousarray(tiles.astype(np.uint8)), scale


def int8_codes(codes: np.ndarray, k: int, levels: int = DENSE_INT8_LEVELS) -> np.ndarray:
    """The signed codes [K, N] (int32) of a packed int8 dense weight (the padding dropped)."""
    blocks, quads, nb, _ = codes.shape
    full = codes.transpose(1, 3, 0, 2).reshape(quads * 4, blocks * nb).astype(np.int32) - (levels + 1)
    return full[:k]


def dequantize_int8(codes: np.ndarray, scale: np.ndarray, k: int, levels: int = DENSE_INT8_LEVELS) -> np.ndarray:
    """The fp32 [K, N] weight a packed int8 dense weight stands for."""
    return int8_codes(codes, k, levels).astype(np.float32) * scale


@dataclass(frozen=True)
class Int4Weight:
    """Packed 4-bit weight: ``codes`` [N/nb, K/8, nb, 4] uint8 (byte (g, j, q) holds output j's code for
    k = 8g + q in its low nibble and for k = 8g + 4 + q in its high nibble, offset by 8), ``scales``
    [N/nb, K/bs, nb] fp16."""

    codes: np.ndarray
    scales: np.ndarray
    block_size: int

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes


def quantize_int4(w_kn: np.ndarray, nb: int, block_size: int) -> Int4Weight:
    """Symmetric 4-bit codes in [-7, 7] with one fp16 scale per (block of ``block_size`` k, output)."""
    k, n = w_kn.shape
    if k % block_size or block_size % 8 or n % nb:
        raise ValueError(f"int4 needs K ({k}) divisible by the block size ({block_size}), a block size "
                         f"divisible by 8 and N ({n}) by the tile ({nb})")
    grouped = w_kn.reshape(k // block_size, block_size, n).astype(np.float64)
    amax = np.abs(grouped).max(axis=1)
    scales = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float16)
    scales[scales == 0] = np.float16(1.0)
    codes = np.clip(np.rint(grouped / scales.astype(np.float64)[:, None, :]), -7, 7).astype(np.int16)
    codes = codes.reshape(k, n) + 8  # unsigned nibbles
    tiles = codes.reshape(k // 8, 2, 4, n // nb, nb).transpose(3, 0, 4, 1, 2)  # [N/nb, K/8, nb, half, q]
    packed = (tiles[..., 0, :] | (tiles[..., 1, :] << 4)).astype(np.uint8)
    scale_tiles = scales.reshape(k // block_size, n // nb, nb).transpose(1, 0, 2)
    return Int4Weight(np.ascontiguousarray(packed), np.ascontiguousarray(scale_tiles), block_size)


def int4_codes(weight: Int4Weight) -> np.ndarray:
    """The signed codes [K, N] (int32) of a packed 4-bit weight."""
    blocks, kg, nb, _ = weight.codes.shape
    lo = (weight.codes & 15).astype(np.int32) - 8
    hi = (weight.codes >> 4).astype(np.int32) - 8
    codes = np.stack([lo, hi], axis=3)  # [N/nb, K/8, nb, half, q]
    return codes.transpose(1, 3, 4, 0, 2).reshape(kg * 8, blocks * nb)


def dequantize_int4(weight: Int4Weight) -> np.ndarray:
    """The fp32 [K, N] weight the codes and scales stand for."""
    blocks, nkb, nb = weight.scales.shape
    scales = weight.scales.astype(np.float32).transpose(1, 0, 2).reshape(nkb, blocks * nb)
    return int4_codes(weight).astype(np.float32) * np.repeat(scales, weight.block_size, axis=0)


def quantize_rows_blockwise(x: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' on-the-fly activation quantization, in numpy: int8 codes [M, K] and one fp32 scale
    per (row, block of ``block_size``) [M, K/bs]; code = round(x · 127 / amax)."""
    m, k = x.shape
    amax = np.maximum(np.abs(x.reshape(m, k // block_size, block_size)).max(axis=2), np.float32(1e-12))
    inv = (np.float32(127.0) / amax).astype(np.float32)
    codes = np.round(x * np.repeat(inv, block_size, axis=1)).astype(np.int8)
    return codes, (amax / np.float32(127.0)).astype(np.float32)


def pack_conv(w_oihw: np.ndarray, ob: int, block: int = 0) -> np.ndarray:
    """[OC, IC/g, KH, KW] -> [OC/ob, IC/g, KH, KW, ob] fp32; for a blocked (NCHW{block}c) input
    [OC/ob, IC/block, KH, KW, block, ob]: the order the conv reduces in (``conv2d``), so its weights stream
    contiguously."""
    oc, icg, kh, kw = w_oihw.shape
    if block:
        return np.ascontiguousarray(w_oihw.reshape(oc // ob, ob, icg // block, block, kh, kw)
                                    .transpose(0, 2, 4, 5, 3, 1)).astype(np.float32)
    return np.ascontiguousarray(w_oihw.reshape(oc // ob, ob, icg, kh, kw).transpose(0, 2, 3, 4, 1)).astype(np.float32)


#: levels of the int8 conv's weight and activation codes: 7 bits (±63), so that AVX2's u8 × s8
#: multiply-add (``vpmaddubsw``) can sum two steps in int16 without saturating (2 · 2 · 127 · 63 < 2^15)
CONV_INT8_LEVELS = 63


def conv_int8_channels(icg: int) -> int:
    """Input channels per group the int8 conv layout holds: whole quads (4 channels per 32-bit lane), and
    an even number of quads beyond one (two quads are summed in int16 before widening)."""
    return 4 if icg <= 4 else -(-icg // 8) * 8


def conv_int8_taps(icg: int, kw: int, dilation_w: int) -> int:
    """The kernel width when the int8 conv layout puts a row of taps, not channels, in the 4 lanes of a
    32-bit word: single-channel convolutions (first layers) with adjacent taps (dilation 1) that fit
    (kw ≤ 4); else 0. Without it a 1-channel conv would multiply 3 zero channels per tap."""
    return kw if icg == 1 and 1 < kw <= 4 and dilation_w == 1 else 0


def quantize_conv_int8(w_oihw: np.ndarray, ob: int, taps: int = 0,
                       levels: int = CONV_INT8_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric codes in ±``levels`` (7 bits by default, ``CONV_INT8_LEVELS``) in int8
    and scales [OC] fp32.
    Codes [OC/ob, ICq/4, KH, KW, ob, 4] (zero channels pad IC to ``conv_int8_channels``), or with
    ``taps`` (``conv_int8_taps``) [OC/ob, 1, KH, 1, ob, 4] holding the taps of a row (zero-padded to 4)."""
    oc, icg, kh, kw = w_oihw.shape
    amax = np.abs(w_oihw).reshape(oc, -1).max(axis=1)
    scale = np.where(amax > 0, amax / levels, 1.0).astype(np.float32)
    codes = np.clip(np.rint(w_oihw / scale[:, None, None, None]), -levels, levels)
    codes = codes.astype(np.int8)
    if taps:
        codes = np.pad(codes, ((0, 0), (0, 0), (0, 0), (0, 4 - kw)))
        tiles = codes.reshape(oc // ob, ob, 1, kh, 1, 4).transpose(0, 2, 3, 4, 1, 5)
        return np.ascontiguousarray(tiles), scale
    icq = conv_int8_channels(icg)
    codes = np.pad(codes, ((0, 0), (0, icq - icg), (0, 0), (0, 0)))
    tiles = codes.reshape(oc // ob, ob, icq // 4, 4, kh, kw).transpose(0, 2, 4, 5, 1, 3)
    return np.ascontiguousarray(tiles), scale


def conv_int8_codes(codes: np.ndarray, icg: int, taps: int = 0) -> np.ndarray:
    """The [OC, IC/g, KH, KW] int32 codes of a packed int8 conv weight (the padding dropped)."""
    blocks, quads, kh, kw, ob, _ = codes.shape
    if taps:
        return codes.transpose(0, 4, 1, 2, 3, 5).reshape(blocks * ob, 1, kh, 4)[..., :taps].astype(np.int32)
    full = codes.transpose(0, 4, 1, 5, 2, 3).reshape(blocks * ob, quads * 4, kh, kw)
    return full[:, :icg].astype(np.int32)


# --- TE computes ----------------------------------------------------------------------------------
def _activate(value, act: str):
    from tvm import tirx

    if act == "relu":
        return tirx.max(value, tirx.const(0.0, "float32"))
    return value


def dense(x, w, bias, *, act: str = "none"):
    """fp32 dense: ``x`` [M, K], ``w`` packed [N/nb, K, nb], ``bias`` [N] or None -> [M, N]."""
    from tvm import te

    m, k = x.shape
    blocks, _, nb = w.shape
    n = blocks * nb
    rk = te.reduce_axis((0, k), name="k")
    acc = te.compute((m, n), lambda i, j: te.sum(x[i, rk] * w[j // nb, rk, j % nb], axis=rk), name="dense_acc")
    if bias is None:
        return te.compute((m, n), lambda i, j: _activate(acc[i, j], act), name="dense_out")
    return te.compute((m, n), lambda i, j: _activate(acc[i, j] + bias[j], act), name="dense_out")


def _floored(amax):
    """An all-zero block or sample gets a tiny scale (codes 0), not a division by zero."""
    from tvm import tirx

    return tirx.max(amax, tirx.const(1e-12, "float32"))


def quantize_blocks(x, block_size: int):
    """TE stages quantizing ``x`` [M, K] to int8 per (row, block of ``block_size``): returns the codes
    [M, K], their scales [M, K/bs] and the codes' block sums [M, K/bs] (int32)."""
    from tvm import te, tirx

    m, k = (int(v) for v in x.shape)
    nkb = k // block_size
    ra = te.reduce_axis((0, block_size), name="ra")
    amax = te.compute((m, nkb), lambda i, b: te.max(tirx.abs(x[i, b * block_size + ra]), axis=ra), name="block_amax")
    sx = te.compute((m, nkb), lambda i, b: _floored(amax[i, b]) / tirx.const(127.0, "float32"), name="block_scale")
    inv = te.compute((m, nkb), lambda i, b: tirx.const(127.0, "float32") / _floored(amax[i, b]), name="block_inv")
    xq = te.compute((m, k), lambda i, kk: tirx.round(x[i, kk] * inv[i, kk // block_size]).astype("int8"),
                    name="quantize_x")
    rs = te.reduce_axis((0, block_size), name="rs")
    xsum = te.compute((m, nkb), lambda i, b: te.sum(xq[i, b * block_size + rs].astype("int32"), axis=rs),
                      name="xq_block_sum")
    return xq, sx, xsum


def dense_int4(x, codes, scales, bias, *, block_size: int, act: str = "none"):
    """4-bit weights × int8 activations: ``codes`` [N/nb, K/8, nb, 4] uint8, ``scales`` [N/nb, K/bs, nb]
    fp16, ``bias`` [N]. x is quantized per block of ``bs`` (``quantize_blocks``); per block
    ``Σ nibble·x_q`` is an int32 (``dense4_part``), and ``acc += (part − 8·Σ x_q) · sx · sw`` in fp32."""
    from tvm import te

    m, k = (int(v) for v in x.shape)
    blocks, _, nb, _ = (int(v) for v in codes.shape)
    n = blocks * nb
    nkb = k // block_size
    xq, sx, xsum = quantize_blocks(x, block_size)

    def nibble(kk, j):
        byte = codes[j // nb, kk // 8, j % nb, kk % 4].astype("int32")
        return (byte >> (kk % 8 // 4 * 4)) & 15

    rt = te.reduce_axis((0, block_size), name="t")
    part = te.compute(
        (m, nkb, n),
        lambda i, b, j: te.sum(xq[i, b * block_size + rt].astype("int32") * nibble(b * block_size + rt, j), axis=rt),
        name="dense4_part")
    rkb = te.reduce_axis((0, nkb), name="kb")
    acc = te.compute(
        (m, n),
        lambda i, j: te.sum((part[i, rkb, j] - 8 * xsum[i, rkb]).astype("float32")
                            * (sx[i, rkb] * scales[j // nb, rkb, j % nb].astype("float32")), axis=rkb),
        name="dense_acc")
    return te.compute((m, n), lambda i, j: _activate(acc[i, j] + bias[j], act), name="dense_out")


def dense_int8(x, codes, wscale, bias, *, act: str = "none", levels: int = DENSE_INT8_LEVELS):
    """int8 × int8 → int32 dense: ``x`` fp32 [M, K] is quantized per row (symmetric, ±``levels``),
    ``codes`` (``quantize_int8``) [N/nb, Kp/4, nb, 4] uint8 = code + levels + 1 with per-output
    ``wscale`` [N], ``bias`` [N]; fp32 out = act(acc · sx · sw + b)."""
    from tvm import te, tirx

    m, k = (int(v) for v in x.shape)
    blocks, _, nb, _ = (int(v) for v in codes.shape)
    n = blocks * nb
    offset = int(levels) + 1
    levels = tirx.const(float(levels), "float32")
    ra = te.reduce_axis((0, k), name="ka")
    amax = te.compute((m,), lambda i: te.max(tirx.abs(x[i, ra]), axis=ra), name="row_amax")
    sx = te.compute((m,), lambda i: _floored(amax[i]) / levels, name="row_scale")
    xq = te.compute((m, k), lambda i, j: tirx.round(x[i, j] * (levels / _floored(amax[i]))).astype("int32"),
                    name="quantize_x")
    rk = te.reduce_axis((0, k), name="k")
    acc = te.compute(
        (m, n),
        lambda i, j: te.sum(xq[i, rk] * (codes[j // nb, rk // 4, j % nb, rk % 4].astype("int32")
                                         - offset), axis=rk),
        name="dense_acc")
    return te.compute(
        (m, n), lambda i, j: _activate(acc[i, j].astype("float32") * (sx[i] * wscale[j]) + bias[j], act),
        name="dense_out")


def conv2d(data, w, bias, residual=None, *, strides, pads, dilations, groups: int, act: str = "none",
           pool: tuple[int, int, int] = (0, 0, 0), block_in: int = 0, block_out: int = 0, block_res: int = 0,
           halo_in: int = 0, halo_out: int = 0, halo_res: int = 0):
    """fp32 NCHW conv: ``w`` packed [OC/ob, IC/g, KH, KW, ob] (``pack_conv``; blocked input: its blocked layout);
    ``pads`` (top, left, bottom, right);
    out = act(conv + bias [+ residual]), ``residual`` a tensor of the output's shape (a skip connection).
    ``pool`` (kernel, stride, pad) fuses a max pooling (``max_pool``, no residual): the activated conv stays
    channels-last (``conv_rows``, a sample at a time in cache under the schedule) and out is the pooled tensor.

    ``block_in`` / ``block_out`` / ``block_res`` (channels per block; 0: NCHW): the input / output / residual is
    blocked NCHW{block}c, [N, C/block, H, W, block] (groups = 1), as ORT keeps fp32 activations between convs on
    AVX-512: the epilogue stores a register's 16 channels of a pixel at once instead of transposing the tile back
    to NCHW, and the reduction walks a pixel's ``block_in`` channels contiguously (``rci``, innermost).

    ``halo_in`` / ``halo_out`` / ``halo_res`` (pixels; blocked tensors only): the tensor carries a border of zeros
    that wide around each plane, [N, C/block, H + 2·halo, W + 2·halo, block]. An input whose border covers the
    padding is read in place (no padding stage); the output's border is written as zeros. This TE form is the
    reference semantics; on AVX-512 ``blocked.conv2d`` computes it (TE cannot write inside a larger buffer)."""
    from tvm import te, tirx

    if (halo_in and not block_in) or (halo_out and not block_out) or (halo_res and not block_res):
        raise ValueError("only a blocked (NCHWc) tensor carries a border")
    if halo_in and max(pads) > halo_in:
        raise ValueError(f"padding {pads} wider than the input's border of {halo_in}")
    if block_in:
        n, cb, h, wd, _ = (int(v) for v in data.shape)
        h, wd = h - 2 * halo_in, wd - 2 * halo_in
        c = cb * block_in
    else:
        n, c, h, wd = (int(v) for v in data.shape)
    if block_in:  # pack_conv's blocked layout [OC/ob, IC/block, KH, KW, block, ob]
        oblocks, _, kh, kw, _, ob = (int(v) for v in w.shape)
        icg = c
    else:
        oblocks, icg, kh, kw, ob = (int(v) for v in w.shape)
    oc = oblocks * ob
    if (block_in or block_out or block_res) and groups != 1:
        raise ValueError("a blocked (NCHWc) conv has groups = 1")
    if block_out and ob % block_out:
        raise ValueError(f"output tile {ob} is not whole blocks of {block_out} channels")
    sh, sw = strides
    dh, dw = dilations
    pt, pl, pb, pr = pads
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    ocg = oc // groups
    # where the padded image starts in the stored input: ``halo_in - pad`` pixels into a bordered one
    ro, co = (halo_in - pt, halo_in - pl) if halo_in else (0, 0)
    if halo_in:  # the border holds the padding
        padded = data
    elif pt or pl or pb or pr:
        def pad(y, x, value):
            return tirx.if_then_else(tirx.all(y >= pt, y < h + pt, x >= pl, x < wd + pl), value,
                                     tirx.const(0.0, "float32"))

        if block_in:
            padded = te.compute((n, cb, h + pt + pb, wd + pl + pr, block_in),
                                lambda b, q, y, x, z: pad(y, x, data[b, q, y - pt, x - pl, z]), name="conv_pad")
        else:
            padded = te.compute((n, c, h + pt + pb, wd + pl + pr),
                                lambda b, ch, y, x: pad(y, x, data[b, ch, y - pt, x - pl]), name="conv_pad")
    else:
        padded = data
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    if block_in:  # input blocks outermost, a pixel's channels of a block innermost (contiguous)
        rc = te.reduce_axis((0, cb), name="rc")
        rci = te.reduce_axis((0, block_in), name="rci")
        acc = te.compute(
            (n, oh, ow, oc),
            lambda b, y, x, o: te.sum(
                padded[b, rc, y * sh + ry * dh + ro, x * sw + rx * dw + co, rci] * w[o // ob, rc, ry, rx, rci, o % ob],
                axis=[rc, ry, rx, rci]),
            name="conv_acc")
    else:
        rc = te.reduce_axis((0, icg), name="rc")
        acc = te.compute(
            (n, oh, ow, oc),
            lambda b, y, x, o: te.sum(
                padded[b, (o // ocg) * icg + rc, y * sh + ry * dh, x * sw + rx * dw] * w[o // ob, rc, ry, rx, o % ob],
                axis=[rc, ry, rx]),
            name="conv_acc")
    if pool[0]:
        if residual is not None:
            raise ValueError("a conv with a fused max pooling takes no residual input")
        rows = te.compute((n, oh, ow, oc), lambda b, y, x, o: _activate(_plus(acc[b, y, x, o], bias, o), act),
                          name="conv_rows")
        return max_pool(lambda b, o, y, x: rows[b, y, x, o], (n, oc, oh, ow), pool, block=block_out)

    def res(b, o, y, x):
        if residual is None:
            return None
        if block_res:
            return residual[b, o // block_res, y + halo_res, x + halo_res, o % block_res]
        return residual[b, o, y, x]

    def value(b, o, y, x):
        total = _plus(acc[b, y, x, o], bias, o)
        extra = res(b, o, y, x)
        return _activate(total if extra is None else total + extra, act)

    if block_out:
        return _blocked(value, (n, oc, oh, ow), block_out, halo_out, "conv_out")
    return te.compute((n, oc, oh, ow), value, name="conv_out")


def _plus(value, tensor, *index):
    """``value + tensor[index]``, or ``value`` when there is no such tensor (no bias, no residual)."""
    return value if tensor is None else value + tensor(*index)


def _blocked(value, shape: tuple[int, int, int, int], block: int, halo: int, name: str):
    """TE: the NCHW values ``value(b, c, y, x)`` of ``shape`` stored blocked NCHW{block}c, with ``halo`` pixels of
    zeros around each plane (0: none)."""
    from tvm import te, tirx

    n, c, h, w = shape
    if not halo:
        return te.compute((n, c // block, h, w, block), lambda b, q, y, x, z: value(b, q * block + z, y, x), name=name)

    def bordered(b, q, y, x, z):
        inside = tirx.all(y >= halo, y < h + halo, x >= halo, x < w + halo)
        return tirx.if_then_else(inside, value(b, q * block + z, y - halo, x - halo), tirx.const(0.0, "float32"))

    return te.compute((n, c // block, h + 2 * halo, w + 2 * halo, block), bordered, name=name)


def conv_out_size(size: int, pad: int, kernel: int, stride: int, dilation: int) -> int:
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


#: parallel tasks a conv with a fused max pooling is split into at least: an int8 conv's bands of pooled rows
#: (``pool_bands``); an fp32 conv pools a sample per task, so it fuses the pooling from this batch on
POOL_MIN_TASKS = 8


def pool_bands(tasks: int, rows: int) -> int:
    """Bands of pooled rows per (output block, sample) of an int8 conv with a fused max pooling: the fewest
    (each band recomputes the conv rows its first window shares with the band above) that give at least
    ``POOL_MIN_TASKS`` parallel tasks, a divisor of ``rows``. Its output absmax has one slot per (block, band)."""
    return next((d for d in range(1, rows + 1) if rows % d == 0 and tasks * d >= POOL_MIN_TASKS), rows)


def pool_fusable(pool: tuple[int, int, int]) -> bool:
    """Whether a square max pooling (kernel, stride, pad) can run in a conv's epilogue (``conv2d``,
    ``conv2d_int8``): its windows advance (stride ≤ kernel) and each holds an image pixel (pad < kernel)."""
    k, s, p = pool
    return k > 0 and 0 < s <= k and 0 <= p < k


def pool_out_size(size: int, pool: tuple[int, int, int]) -> int:
    kernel, stride, pad = pool
    return (size + 2 * pad - kernel) // stride + 1


def max_pool(read, shape: tuple[int, int, int, int], pool: tuple[int, int, int], block: int = 0, halo: int = 0):
    """TE: square max pooling (kernel, stride, pad) of the NCHW tensor of ``shape`` that ``read(b, c, y, x)``
    reads, as one element-wise maximum of each window's pixels (a spatial block: a schedule can vectorize it
    over channels), pixels outside the image clamped to its edge (a pixel the window holds anyway: the same
    maximum as padding with -inf, when pad < kernel). ``block`` (channels; 0: NCHW): the output is blocked
    NCHW{block}c, ``read`` still takes NCHW indices; ``halo``: with a border of zeros that wide (``conv2d``'s
    ``halo_in``)."""
    from tvm import te, tirx

    n, c, h, w = shape
    k, s, p = pool

    def clamp(v, size):
        return tirx.max(tirx.min(v, size - 1), 0)

    def window(b, o, y, x):
        value = None
        for ky in range(k):
            for kx in range(k):
                item = read(b, o, clamp(y * s - p + ky, h), clamp(x * s - p + kx, w))
                value = item if value is None else tirx.max(value, item)
        return value

    ph, pw = pool_out_size(h, pool), pool_out_size(w, pool)
    if block:  # the pooled tensor blocked NCHW{block}c (``conv2d``'s ``block_out``)
        return _blocked(window, (n, c, ph, pw), block, halo, "pool_out")
    return te.compute((n, c, ph, pw), window, name="pool_out")


def conv2d_int8(data, codes, wscale, bias, residual=None, amax=None, *, strides, pads, dilations, groups: int,
                act: str = "none", taps: int = 0, levels: int = CONV_INT8_LEVELS, emit_amax: bool = False,
                pool: tuple[int, int, int] = (0, 0, 0)):
    """int8 × int8 → int32 NCHW conv: ``data`` fp32 is quantized per sample (symmetric, ±``levels``),
    ``codes`` (``quantize_conv_int8``, ``taps`` as packed) int8 with per-output ``wscale`` [OC], ``bias``
    [OC]; fp32 out = act(acc · sx · sw + b [+ residual]). ``pads`` (top, left, bottom, right).

    Carrying the per-sample absmax between consecutive int8 convs: ``amax`` [N, P] (fp32), when given, holds
    max |data| per sample in P slots as the kernel that wrote ``data`` left it (``block_row_absmax``); their
    maximum replaces this kernel's own pass over its input. ``emit_amax`` returns ``(out, out_amax)``,
    out_amax = ``block_row_absmax(out, ob)`` for the next int8 conv. Max is exact in any order, so the codes
    are the same either way. ``pool`` (kernel, stride, pad) fuses a max pooling (``max_pool``) after the
    activation: out is the pooled tensor, its absmax one slot per (block, band of pooled rows: ``pool_bands``)."""
    from tvm import te, tirx

    n, c, h, wd = (int(v) for v in data.shape)
    oblocks, _, kh, kw, ob, _ = (int(v) for v in codes.shape)
    kw = taps or kw
    oc = oblocks * ob
    icg, ocg = c // groups, oc // groups
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = strides, dilations, pads
    oh, ow = conv_out_size(h, pt + pb, kh, sh, dh), conv_out_size(wd, pl + pr, kw, sw, dw)
    rc, ry, rx = (te.reduce_axis((0, e), name=nm) for e, nm in ((c, "ac"), (h, "ay"), (wd, "ax")))
    if amax is None:
        amax = te.compute((n,), lambda b: te.max(tirx.abs(data[b, rc, ry, rx]), axis=[rc, ry, rx]),
                          name="sample_amax")
    else:  # the writer's absmax per (output block, row): its maximum
        rp = te.reduce_axis((0, int(amax.shape[1])), name="rp")
        amax = te.compute((n,), lambda b: te.max(amax[b, rp], axis=rp), name="sample_amax")
    levels = tirx.const(float(levels), "float32")
    sx = te.compute((n,), lambda b: _floored(amax[b]) / levels, name="sample_scale")
    inv = te.compute((n,), lambda b: levels / _floored(amax[b]), name="sample_inv")
    xq = te.compute(
        (n, c, h + pt + pb, wd + pl + pr),
        lambda b, ch, y, x: tirx.if_then_else(
            tirx.all(y >= pt, y < h + pt, x >= pl, x < wd + pl),
            tirx.round(data[b, ch, y - pt, x - pl] * inv[b]).astype("int32"), 0),
        name="quantize_x")
    kc, ky, kx = te.reduce_axis((0, icg), name="rc"), te.reduce_axis((0, kh), name="ry"), \
        te.reduce_axis((0, kw), name="rx")
    acc = te.compute(
        (n, oh, ow, oc),
        lambda b, y, x, o: te.sum(
            xq[b, (o // ocg) * icg + kc, y * sh + ky * dh, x * sw + kx * dw]
            * _conv_int8_code(codes, o, kc, ky, kx, ob, taps).astype("int32"), axis=[kc, ky, kx]),
        name="conv_acc")
    out = te.compute(
        (n, oc, oh, ow),
        lambda b, o, y, x: _activate(_plus(acc[b, y, x, o].astype("float32") * (sx[b] * wscale[o]) + bias[o],
                                           residual, b, o, y, x), act),
        name="conv_out")
    if pool[0]:
        out = max_pool(out, (n, oc, oh, ow), pool)
        if emit_amax:
            return out, band_absmax(out, ob, pool_bands(n * oblocks, int(out.shape[2])))
    if not emit_amax:
        return out
    return out, block_row_absmax(out, ob)


def band_absmax(x, ob: int, bands: int):
    """TE: max |x| of a 4-d NCHW tensor per sample, block of ``ob`` channels and band of rows: [N, C/ob ·
    bands] (slot block · bands + band), the slots of an int8 conv with a fused max pooling."""
    from tvm import te, tirx

    n, c, h, w = (int(v) for v in x.shape)
    rows = h // bands
    rj, ry, rx = (te.reduce_axis((0, e), name=nm) for e, nm in ((ob, "bj"), (rows, "by"), (w, "bx")))
    return te.compute((n, c // ob * bands),
                      lambda b, p: te.max(tirx.abs(x[b, p // bands * ob + rj, p % bands * rows + ry, rx]),
                                          axis=[rj, ry, rx]), name="conv_out_amax")


def block_row_absmax(x, ob: int):
    """TE: max |x| of a 4-d NCHW tensor per sample, block of ``ob`` channels and row: [N, C/ob · H] fp32 (slot
    block · H + row; no floor: the reader applies it). The int8 conv's epilogue leaves its output's absmax in
    these slots, each written by one thread, for the next int8 conv to reduce."""
    from tvm import te, tirx

    n, c, h, w = (int(v) for v in x.shape)
    rj, rx = te.reduce_axis((0, ob), name="mj"), te.reduce_axis((0, w), name="mx")
    return te.compute((n, c // ob * h), lambda b, p: te.max(tirx.abs(x[b, p // h * ob + rj, p % h, rx]), axis=[rj, rx]),
                      name="conv_out_amax")


def _conv_int8_code(codes, o, kc, ky, kx, ob: int, taps: int):
    if taps:
        return codes[o // ob, 0, ky, 0, o % ob, kx]
    return codes[o // ob, kc // 4, ky, kx, o % ob, kc % 4]


def gemv_bytes(k: int, n: int, bits: int, block_size: int = 128) -> int:
    """Bytes a dense kernel streams for one [K, N] weight at ``bits`` (scales included)."""
    if bits == 32:
        return 4 * k * n
    if bits == 8:
        return dense_int8_depth(k) * n + 4 * n
    return math.ceil(k * n * bits / 8) + 2 * n * (k // block_size)
