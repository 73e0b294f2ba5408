"""bitpass's own compute kernels (TE) and the weight layouts they read, packed in numpy at compile time.

Every kernel is a TE compute whose blocks carry the names the schedule rules look for
(``schedules.py``); the PrimFunc is tagged ``bitpass.kernel`` with the kernel's kind and
tile sizes so a rule never has to guess. Weight layouts are "output block innermost":
a weight for ``N`` outputs is stored as ``[N / nb, K, nb]`` so the innermost, vectorized
loop reads ``nb`` contiguous outputs' weights for one reduction index.

Kernels
-------
* ``dense``: fp32 ``x[M, K] @ W[K, N] + b`` with a fused activation.
* ``dense_int8``: int8 weights (per-output-channel scale) × int8 activations quantized per row
  on the fly, int32 accumulation, requantized to fp32 in the epilogue.
* ``dense_int4``: weight-only 4-bit, two codes per byte, fp16 scale per block of ``bs``
  reduction indices; per block the nibbles × x are summed in fp32 (interleaved partial sums at
  M = 1), then corrected for the +8 offset with the block sum of x and scaled once.
* ``conv2d``: fp32 NCHW convolution (groups, so depthwise too) with fused bias and activation,
  computed with output channels innermost and written back to NCHW by the epilogue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ACTIVATIONS = ("none", "relu")


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
    """Output tile of the 4-bit kernel: four vectors where they divide ``n`` (one 16-byte load of codes
    feeds 32 outputs; the kernel is bound by nibble-to-float conversions, not by FMA latency)."""
    for nb in (4 * lanes, 2 * lanes, lanes, 8, 4, 2):
        if n % nb == 0:
            return nb
    return 1


# --- weight layouts (numpy) ---------------------------------------------------------------------
def pack_dense(w_kn: np.ndarray, nb: int) -> np.ndarray:
    """[K, N] -> [N/nb, K, nb] fp32."""
    k, n = w_kn.shape
    return np.ascontiguousarray(w_kn.reshape(k, n // nb, nb).transpose(1, 0, 2)).astype(np.float32)


def quantize_int8(w_kn: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8: codes [N/nb, K, nb] int8 and scales [N] fp32."""
    amax = np.abs(w_kn).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(w_kn / scale), -127, 127).astype(np.int8)
    return pack_dense(codes.astype(np.float32), nb).astype(np.int8), scale


def dequantize_int8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    blocks, k, nb = codes.shape
    return codes.transpose(1, 0, 2).reshape(k, blocks * nb).astype(np.float32) * scale


@dataclass(frozen=True)
class Int4Weight:
    """Packed 4-bit weight: ``codes`` [N/nb, K, nb/2] uint8 (byte j of a tile holds output j in its
    low nibble and output j + nb/2 in its high nibble, offset by 8), ``scales`` [N/nb, K/bs, nb] fp16."""

    codes: np.ndarray
    scales: np.ndarray
    block_size: int

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes


def quantize_int4(w_kn: np.ndarray, nb: int, block_size: int) -> Int4Weight:
    """Symmetric 4-bit codes in [-7, 7] with one fp16 scale per (block of ``block_size`` k, output)."""
    k, n = w_kn.shape
    if k % block_size or nb % 2:
        raise ValueError(f"int4 needs K ({k}) divisible by the block size ({block_size}) and an even tile ({nb})")
    grouped = w_kn.reshape(k // block_size, block_size, n).astype(np.float64)
    amax = np.abs(grouped).max(axis=1)
    scales = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float16)
    scales[scales == 0] = np.float16(1.0)
    codes = np.clip(np.rint(grouped / scales.astype(np.float64)[:, None, :]), -7, 7).astype(np.int16)
    codes = codes.reshape(k, n) + 8  # unsigned nibbles
    tiles = codes.reshape(k, n // nb, 2, nb // 2).transpose(1, 0, 2, 3)  # [N/nb, K, half, nb/2]
    packed = (tiles[:, :, 0, :] | (tiles[:, :, 1, :] << 4)).astype(np.uint8)
    scale_tiles = scales.reshape(k // block_size, n // nb, nb).transpose(1, 0, 2)
    return Int4Weight(np.ascontiguousarray(packed), np.ascontiguousarray(scale_tiles), block_size)


def dequantize_int4(weight: Int4Weight) -> np.ndarray:
    """The fp32 [K, N] weight the kernel computes with."""
    blocks, k, half = weight.codes.shape
    lo = (weight.codes & 15).astype(np.float32) - 8
    hi = (weight.codes >> 4).astype(np.float32) - 8
    codes = np.concatenate([lo, hi], axis=2)  # [N/nb, K, nb]
    scales = np.repeat(weight.scales.astype(np.float32), weight.block_size, axis=1)  # [N/nb, K, nb]
    return (codes * scales).transpose(1, 0, 2).reshape(k, blocks * 2 * half)


def pack_conv(w_oihw: np.ndarray, ob: int) -> np.ndarray:
    """[OC, IC/g, KH, KW] -> [OC/ob, IC/g, KH, KW, ob] fp32."""
    oc, icg, kh, kw = w_oihw.shape
    return np.ascontiguousarray(w_oihw.reshape(oc // ob, ob, icg, kh, kw).transpose(0, 2, 3, 4, 1)).astype(np.float32)


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


def int4_parts(m: int, block_size: int) -> int:
    """Independent partial sums per block for the 4-bit kernel: at M = 1 one tile has too few
    accumulators to hide the FMA latency, so the block's reduction is split ``parts`` ways."""
    for parts in ((2,) if m == 1 else (1,)):
        if block_size % parts == 0:
            return parts
    return 1


def dense_int4(x, codes, scales, bias, *, block_size: int, act: str = "none"):
    """Weight-only 4-bit dense: ``codes`` [N/nb, K, nb/2] uint8, ``scales`` [N/nb, K/bs, nb] fp16.

    Per block of ``bs`` reduction indices the unsigned nibbles (code + 8) are multiplied by ``x`` and
    summed in fp32 (``dense4_part``, ``parts`` interleaved partial sums); the block's sum is then
    corrected for the offset with the block sum of ``x`` (``x_block_sum``) and scaled once:
    ``acc += (Σ nibble·x − 8·Σ x) · scale``. No per-element subtract or scale multiply."""
    from tvm import te, tirx

    m, k = (int(v) for v in x.shape)
    blocks, _, half = (int(v) for v in codes.shape)
    nb = 2 * half
    n = blocks * nb
    nkb = k // block_size
    parts = int4_parts(m, block_size)
    steps = block_size // parts
    rt = te.reduce_axis((0, steps), name="t")
    rb = te.reduce_axis((0, block_size), name="kb_in")
    xsum = te.compute((m, nkb), lambda i, b: te.sum(x[i, b * block_size + rb], axis=rb), name="x_block_sum")

    def nibble(kk, j):
        byte = codes[j // nb, kk, j % half].astype("int32")
        return ((byte >> ((j % nb) // half * 4)) & 15).astype("float32")

    part = te.compute(
        (m, n, nkb, parts),
        lambda i, j, b, r: te.sum(x[i, b * block_size + rt * parts + r] * nibble(b * block_size + rt * parts + r, j),
                                  axis=rt),
        name="dense4_part")
    rkb = te.reduce_axis((0, nkb), name="kb")

    def block_term(i, j, b):
        total = part[i, j, b, 0]
        for r in range(1, parts):
            total = total + part[i, j, b, r]
        return (total - tirx.const(8.0, "float32") * xsum[i, b]) * scales[j // nb, b, j % nb].astype("float32")

    acc = te.compute((m, n), lambda i, j: te.sum(block_term(i, j, rkb), axis=rkb), name="dense_acc")
    if bias is None:
        return te.compute((m, n), lambda i, j: _activate(acc[i, j], act), name="dense_out")
    return te.compute((m, n), lambda i, j: _activate(acc[i, j] + bias[j], act), name="dense_out")


def dense_int8(x, codes, wscale, bias, *, act: str = "none"):
    """int8 × int8 → int32 dense: ``x`` fp32 [M, K] is quantized per row (symmetric, 127 levels),
    ``codes`` [N/nb, K, nb] int8 with per-output ``wscale`` [N]; fp32 out = acc · sx · sw + b."""
    from tvm import te, tirx

    m, k = x.shape
    blocks, _, nb = codes.shape
    n = blocks * nb
    ra = te.reduce_axis((0, k), name="ka")
    amax = te.compute((m,), lambda i: te.max(tirx.abs(x[i, ra]), axis=ra), name="row_amax")
    sx = te.compute((m,), lambda i: tirx.max(amax[i], tirx.const(1e-12, "float32")) / tirx.const(127.0, "float32"),
                    name="row_scale")
    xq = te.compute((m, k), lambda i, j: tirx.round(x[i, j] / sx[i]).astype("int8"), name="quantize_x")
    rk = te.reduce_axis((0, k), name="k")
    acc = te.compute((m, n), lambda i, j: te.sum(xq[i, rk].astype("int32") * codes[j // nb, rk, j % nb]
                                                 .astype("int32"), axis=rk), name="dense_acc")

    def out(i, j):
        value = acc[i, j].astype("float32") * sx[i] * wscale[j]
        return _activate(value + bias[j] if bias is not None else value, act)

    return te.compute((m, n), out, name="dense_out")


def conv2d(data, w, bias, *, strides, pads, dilations, groups: int, act: str = "none"):
    """fp32 NCHW conv: ``w`` packed [OC/ob, IC/g, KH, KW, ob]; ``pads`` (top, left, bottom, right)."""
    from tvm import te, tirx

    n, c, h, wd = (int(v) for v in data.shape)
    oblocks, icg, kh, kw, ob = (int(v) for v in w.shape)
    oc = oblocks * ob
    sh, sw = strides
    dh, dw = dilations
    pt, pl, pb, pr = pads
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    ocg = oc // groups
    if pt or pl or pb or pr:
        padded = te.compute(
            (n, c, h + pt + pb, wd + pl + pr),
            lambda b, ch, y, x: tirx.if_then_else(
                tirx.all(y >= pt, y < h + pt, x >= pl, x < wd + pl), data[b, ch, y - pt, x - pl],
                tirx.const(0.0, "float32")),
            name="conv_pad")
    else:
        padded = data
    rc = te.reduce_axis((0, icg), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    acc = te.compute(
        (n, oh, ow, oc),
        lambda b, y, x, o: te.sum(
            padded[b, (o // ocg) * icg + rc, y * sh + ry * dh, x * sw + rx * dw] * w[o // ob, rc, ry, rx, o % ob],
            axis=[rc, ry, rx]),
        name="conv_acc")
    if bias is None:
        return te.compute((n, oc, oh, ow), lambda b, o, y, x: _activate(acc[b, y, x, o], act), name="conv_out")
    return te.compute((n, oc, oh, ow), lambda b, o, y, x: _activate(acc[b, y, x, o] + bias[o], act),
                      name="conv_out")


def gemv_bytes(k: int, n: int, bits: int, block_size: int = 128) -> int:
    """Bytes a dense kernel streams for one [K, N] weight at ``bits`` (scales included)."""
    if bits == 32:
        return 4 * k * n
    if bits == 8:
        return k * n + 4 * n
    return math.ceil(k * n * bits / 8) + 2 * n * (k // block_size)
