"""The fp32 conv on blocked NCHW16c activations that carry a zero border, as hand-written TIR.

Between AVX-512 fp32 convs the activations are blocked NCHW16c (``lower.Blocked``). A 3×3 conv with padding 1 on
such an input first copied it into a padded buffer, then convolved, a barrier between the two: at 2 threads that
stage cost a 56×56 conv of ResNet-18 3-11 % (isolated, against the same conv on an input already padded), at one
thread 0-3 %. Here the writer leaves ``halo`` pixels of zeros around each plane it writes, so a reader with at
most that padding reads the writer's buffer in place, with no stage and no barrier. TVM's TE cannot write into the
inside of a larger buffer, hence a TIR kernel, as ``avx512.conv2d_int8`` writes its codes with a border.

The arithmetic is ``kernels.conv2d``'s (same packed weights, ``pack_conv(block=16)``, the same order of sums per
output), which stays the reference: the schedule rule replaces that TE function by this one where it applies
(``conv2d_supported``). A tile of ``owt`` output columns × ``ob`` output channels is held in registers; per step
(input block, tap, channel of the block) one broadcast input value per column and ``ob / 16`` weight registers.
Parallel over (sample, output block, row, column tile): a batch's sample outermost so its input stays in cache
across the blocks, a block's weights across its rows. A (sample, block)'s first tile also zeros the border of its
planes, so the border costs no pass of its own and no barrier. Parsing the TVMScript is most of the cost of
building one (about 0.1 s), so each geometry is built once per process.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from bitpass.backends.tvm import avx512, microkernels

#: fp32 lanes of one AVX-512 register, and channels per block of the blocked layout
LANES = avx512.LANES


def conv2d_supported(block_in: int, block_out: int, ob: int, groups: int, pads: tuple[int, int, int, int],
                     halo_in: int, pool: tuple[int, int, int]) -> bool:
    """Whether ``conv2d`` computes this conv: blocked 16-channel input and output, one group, no fused pooling, and
    an input whose border covers the conv's padding (none to add)."""
    return block_in == LANES and block_out == LANES and ob % LANES == 0 and groups == 1 and not pool[0] and \
        max(pads) <= halo_in


@functools.cache
def conv2d(shape: tuple[int, int, int, int], oc: int, ob: int, kernel: tuple[int, int], strides: tuple[int, int],
           pads: tuple[int, int, int, int], dilations: tuple[int, int], act: str, parallel: bool,
           residual: bool = False, halo_in: int = 0, halo_out: int = 0, halo_res: int = 0) -> tirx.PrimFunc:
    """fp32 conv of the NCHW ``shape`` (n, c, h, w) input stored blocked [N, C/16, H + 2·halo_in, W + 2·halo_in, 16]
    (the border zeros), weights ``[OC/ob, C/16, KH, KW, 16, ob]``, bias [OC], optional residual [N, OC/16, OH +
    2·halo_res, OW + 2·halo_res, 16]; out = act(conv + bias [+ residual]) stored blocked with ``halo_out`` pixels of
    zeros around each plane. The padding (top, left, bottom, right) must lie within ``halo_in``
    (``conv2d_supported``): the conv's padded image starts ``halo_in - pad`` pixels into the stored one."""
    n, c, h, w = shape
    kh, kw = kernel
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = strides, dilations, pads
    if not conv2d_supported(LANES, LANES, ob, 1, pads, halo_in, (0, 0, 0)) or c % LANES or oc % ob:
        raise ValueError(f"the blocked fp32 conv takes 16-channel blocks, {ob}-channel tiles and padding {pads} "
                         f"within the input's border of {halo_in}")
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    cb, oblocks, vecs = c // LANES, oc // ob, ob // LANES
    owt = avx512.conv_columns(ow, vecs)  # the int8 conv's tiles: the same 24 accumulator registers
    xtiles = ow // owt
    hi, wi = h + 2 * halo_in, w + 2 * halo_in  # stored input plane
    ho, wo = oh + 2 * halo_out, ow + 2 * halo_out  # stored output plane
    hr, wr = oh + 2 * halo_res, ow + 2 * halo_res  # stored residual plane
    ro, co = halo_in - pt, halo_in - pl  # where the padded image starts in the stored input
    floor = microkernels.floor(act)
    loop = microkernels.loop(parallel)
    tasks = n * oblocks * oh * xtiles
    res_shape = (n, oc // LANES, hr, wr, LANES) if residual else (1,)

    def at(blocks: int, rows: int, cols: int, b, q, y, x):
        """Flat index of lane 0 of pixel (y, x) of channel block q of sample b in a [N, blocks, rows, cols, 16]
        buffer."""
        return (((b * blocks + q) * rows + y) * cols + x) * LANES

    def epilogue(acc, bias, res, b, blk, v, y, xo, xi):
        """act(sum + bias [+ residual]) of register v (16 channels of block blk) of the tile's column xi."""
        total = acc[tirx.Ramp(xi * ob + v * LANES, 1, LANES)] + bias[tirx.Ramp(blk * ob + v * LANES, 1, LANES)]
        if residual:
            total = total + res[b, blk * vecs + v, y + halo_res, xo * owt + xi + halo_res, tirx.Ramp(0, 1, LANES)]
        return tirx.max(total, tirx.Broadcast(tirx.const(floor, "float32"), LANES))

    @T.macro
    def zero_pixel(oflat, b, q, y, x):
        oflat[T.ramp(at(oc // LANES, ho, wo, b, q, y, x), 1, LANES)] = T.broadcast(T.float32(0), LANES)

    @T.macro
    def border(oflat, b, blk, y, xo):  # a (sample, block)'s first tile zeros the border of its planes
        if halo_out > 0 and y == 0 and xo == 0:
            for v, e, x in T.grid(vecs, 2 * halo_out, wo):  # the rows above and below
                zero_pixel(oflat, b, blk * vecs + v, T.if_then_else(e < halo_out, e, oh + e), x)
            for v, r, e in T.grid(vecs, oh, 2 * halo_out):  # the columns left and right of each row
                zero_pixel(oflat, b, blk * vecs + v, r + halo_out, T.if_then_else(e < halo_out, e, ow + e))

    @T.macro
    def tile(xflat, wflat, bias, res, oflat, t):
        # task t: sample b, output block blk, output row y, column tile xo (sample outermost, then block)
        b = T.meta_var(t // (oblocks * oh * xtiles))
        blk = T.meta_var(t // (oh * xtiles) % oblocks)
        y = T.meta_var(t // xtiles % oh)
        xo = T.meta_var(t % xtiles)
        acc = T.alloc_buffer((owt * ob,), "float32", scope="local")
        for r in T.unroll(owt * vecs):
            acc[T.ramp(r * LANES, 1, LANES)] = T.broadcast(T.float32(0), LANES)
        for q, ky, kx, ci in T.grid(cb, kh, kw, LANES):
            for xi in T.unroll(owt):
                for v in T.unroll(vecs):
                    acc[T.ramp(xi * ob + v * LANES, 1, LANES)] = acc[T.ramp(xi * ob + v * LANES, 1, LANES)] \
                        + T.broadcast(xflat[at(cb, hi, wi, b, q, y * sh + ky * dh + ro,
                                               (xo * owt + xi) * sw + kx * dw + co) + ci], LANES) \
                        * wflat[T.ramp(((((blk * cb + q) * kh + ky) * kw + kx) * LANES + ci) * ob + v * LANES, 1,
                                       LANES)]
        for xi in T.unroll(owt):  # bias, residual and activation, a register's 16 channels stored at once
            for v in T.unroll(vecs):
                oflat[T.ramp(at(oc // LANES, ho, wo, b, blk * vecs + v, y + halo_out, xo * owt + xi + halo_out), 1,
                             LANES)] = epilogue(acc, bias, res, b, blk, v, y, xo, xi)
        border(oflat, b, blk, y, xo)

    @T.prim_func(private=True)
    def kernel_fn(data: T.Buffer((n, cb, hi, wi, LANES), "float32"),
                  weight: T.Buffer((oblocks, cb, kh, kw, LANES, ob), "float32"), bias: T.Buffer((oc,), "float32"),
                  res: T.Buffer(res_shape, "float32"), out: T.Buffer((n, oc // LANES, ho, wo, LANES), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        xflat = T.decl_buffer((n * cb * hi * wi * LANES,), "float32", data=data.data)
        wflat = T.decl_buffer((oblocks * cb * kh * kw * LANES * ob,), "float32", data=weight.data)
        oflat = T.decl_buffer((n * (oc // LANES) * ho * wo * LANES,), "float32", data=out.data)
        for t in loop(tasks):
            tile(xflat, wflat, bias, res, oflat, t)

    return microkernels.taking(kernel_fn, (True, True, True, residual, True))
