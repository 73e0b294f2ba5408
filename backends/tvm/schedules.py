"""bitpass's TIR schedules, as dlight-style rules keyed by target features.

A rule is a ``tvm.s_tir.dlight.ScheduleRule``: given a PrimFunc and a target it returns a
schedule, or None when it does not apply. ``rules_for(features)`` picks the rule list for a
target's features (vector width from AVX-512 / AVX2 / NEON), and ``apply_rules`` applies them to
every PrimFunc of a module (TVM's default CPU pipeline schedules nothing; NOTES.md).

On AVX-512 VNNI targets the int8 and 4-bit dense and the int8 conv rules return a schedule of a
hand-written ``vpdpbusd`` micro-kernel (``avx512.py``), on AVX2 one of ``vpmaddubsw`` / ``vpmaddwd``
(``avx2.py``), with the TE kernel's parameters, in place of scheduling the TE compute; elsewhere (aarch64)
they schedule the TE compute, which stays portable. aarch64 dot-product intrinsics are a next step.

Kernel rules recognise bitpass's own kernels by the attributes the lowering puts on them
(``kernel_attrs.KernelAttrs``); ``Elementwise`` and ``Reduction`` handle what TVM's ``LegalizeOps``
produced for the other operators (parallel outer loops, vectorized inner), and ``Pool`` TVM's max pooling.
"""

from __future__ import annotations

from collections.abc import Iterable

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir import stmt as s_stmt
from tvm.target import Target

from bitpass.backends.tvm import avx2, avx512, blocked
from bitpass.backends.tvm.kernel_attrs import KernelAttrs

#: a parallel loop fuses outer loops until it has this many iterations (one per thread would leave a
#: straggler's share to the others)
PARALLEL_MIN_ITERATIONS = 64
#: below this many output elements (or multiply-adds for kernels) a function runs on one thread:
#: waking the pool costs more than the work
PARALLEL_MIN_WORK = 1 << 15


def features_of(target: Target) -> frozenset[str]:
    """Features in ``targets.TargetSpec`` vocabulary, from an LLVM target's triple and mattr."""
    attrs = target.attrs
    mattr = {str(a).lstrip("+") for a in (attrs.get("mattr") or [])}
    triple = str(attrs.get("mtriple", ""))
    found = set()
    if triple.startswith("aarch64") or "neon" in mattr:
        found.add("neon")
    if "dotprod" in mattr:
        found.add("dotprod")
    if "avx2" in mattr:
        found.add("avx2")
    if "avx512f" in mattr:
        found |= {"avx512", "avx2"}
    if "avx512vnni" in mattr:
        found.add("vnni")
    return frozenset(found)


def vector_lanes(features: Iterable[str]) -> int:
    features = set(features)
    if "avx512" in features:
        return 16
    if "avx2" in features:
        return 8
    return 4


def _int(value) -> int | None:
    return int(value) if isinstance(value, (int, tirx.IntImm)) else None


def _shapes(func: tirx.PrimFunc) -> list[tuple[int, ...]]:
    """Static shapes of the function's buffer parameters, in order."""
    return [tuple(int(d) for d in p.ty.shape) for p in func.params]


def _tile_outputs(sch, acc, out, mt: int, nb: int):
    """Tile the output block [mt × nb] per parallel ``outer`` loop and keep the accumulator of a tile in
    registers under it. Returns (outer, ji, ai, aj, k): ``ji`` the output tile's inner column loop, and
    the accumulator's loops (``ai`` is None when mt == 1: unit loops are dropped)."""
    i, j = sch.get_loops(out)
    io, ii = sch.split(i, [None, mt])
    jo, ji = sch.split(j, [None, nb])
    sch.reorder(io, jo, ii, ji)
    outer = sch.fuse(io, jo)
    sch.compute_at(acc, outer)
    sch.set_scope(acc, 0, "local")
    tile = list(sch.get_loops(acc)[1:])  # unit loops (mt == 1, a reduction of one) are gone
    ai = tile.pop(0) if mt > 1 else None
    aj = tile.pop(0)
    return outer, ji, ai, aj, tile[0] if tile else None


def _divisor(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


class _Rule(dlight.ScheduleRule):
    def __init__(self, lanes: int, features: Iterable[str] = ()) -> None:
        self.lanes = lanes
        self.features = frozenset(features)


class Dense(_Rule):
    """fp32 / int8 / int4 dense: [mt × nb] register tiles, outputs innermost (vectorized), k in between,
    the epilogue computed per tile, parallel over tiles. The weight layout [N/nb, K, nb] makes the
    innermost loads contiguous; for M = 1 (GEMV) the kernel streams each tile's weights once."""

    def apply(self, func, target, tunable):
        tags = KernelAttrs.of(func)
        if tags is None or tags.kernel not in ("dense", "dense_int8", "dense_int4"):
            return None
        if tags.kernel == "dense_int4":
            return self._int4_vnni(func, tags) or self._int4_avx2(func, tags) or self._int4(func, tags)
        if tags.kernel == "dense_int8":
            hand = self._int8_vnni(func, tags) or self._int8_avx2(func, tags)
            if hand is not None:
                return hand
        sch = s_tir.Schedule(func)
        nb = tags.nb
        acc = sch.get_sblock("dense_acc")
        out = sch.get_sblock("dense_out")
        m, n = (_int(sch.get(lp).extent) for lp in sch.get_loops(out))
        kk = _int(sch.get(sch.get_loops(acc)[-1]).extent)
        outer, ji, ai, aj, k = _tile_outputs(sch, acc, out, _divisor(m, 4), nb)
        if k is not None:
            sch.reorder(k, *([ai] if ai is not None else []), aj)
        inner = aj
        if ai is not None:
            sch.unroll(ai)
        if m * n * kk >= PARALLEL_MIN_WORK:
            sch.parallel(outer)
        sch.vectorize(inner)
        sch.vectorize(ji)
        if k is not None:
            init = sch.decompose_reduction(acc, k)
            _vectorize_innermost(sch, init, outer)
        if tags.kernel == "dense_int8":
            for name in ("row_amax", "row_scale", "quantize_x"):
                blk = sch.get_sblock(name)
                loops = sch.get_loops(blk)
                if m * kk >= PARALLEL_MIN_WORK and name != "row_scale":
                    sch.parallel(loops[0])
            qloops = sch.get_loops(sch.get_sblock("quantize_x"))
            kx = _int(sch.get(qloops[-1]).extent) or 1
            if kx % self.lanes == 0:
                _, vi = sch.split(qloops[-1], [None, self.lanes])
                sch.vectorize(vi)
        return sch

    def _int8_vnni(self, func, tags: KernelAttrs):
        """The ``vpdpbusd`` micro-kernel (``avx512.dense_int8``) where the target has AVX-512 VNNI."""
        if "vnni" not in self.features or len(func.params) != 5:
            return None
        (m, k), codes = _shapes(func)[:2]
        nb = codes[2]
        if not avx512.dense_int8_supported(nb, tags.levels):
            return None
        n = codes[0] * nb
        return _replacement(func, avx512.dense_int8(m, k, n, nb, tags.act, parallel=m * n * k >= PARALLEL_MIN_WORK))

    def _int4_vnni(self, func, tags: KernelAttrs):
        """The ``vpdpbusd`` micro-kernel (``avx512.dense_int4``) where the target has AVX-512 VNNI."""
        if "vnni" not in self.features or len(func.params) != 5:
            return None
        (m, k), codes, scales = _shapes(func)[:3]
        nb, nkb = codes[2], scales[1]
        if not avx512.dense_int4_supported(k, nb, k // nkb):
            return None
        n = codes[0] * nb
        return _replacement(func, avx512.dense_int4(m, k, n, nb, k // nkb, tags.act,
                                                    parallel=m * n * k >= PARALLEL_MIN_WORK))

    def _int8_avx2(self, func, tags: KernelAttrs):
        """The ``vpmaddubsw`` micro-kernel (``avx2.dense_int8``) where the target has AVX2 and the tile fits."""
        if "avx2" not in self.features or len(func.params) != 5 or tags.levels not in (0, avx2.LEVELS) or tags.pool[0]:
            return None
        (m, k), codes = _shapes(func)[:2]
        nb = codes[2]
        if not avx2.dense_int8_supported(nb):
            return None
        n = codes[0] * nb
        kernel = avx2.dense_int8(m, k, n, nb, tags.act, parallel=m * n * k >= PARALLEL_MIN_WORK)
        return _replacement(func, kernel)

    def _int4_avx2(self, func, tags: KernelAttrs):
        """The ``vpmaddubsw`` micro-kernel (``avx2.dense_int4``) where the target has AVX2 and the tile fits."""
        if "avx2" not in self.features:
            return None
        (m, k), codes, scales = _shapes(func)[:3]
        nb, nkb = codes[2], scales[1]
        if len(func.params) != 5 or not avx2.dense_int4_supported(k, nb, k // nkb):
            return None
        n = codes[0] * nb
        kernel = avx2.dense_int4(m, k, n, nb, k // nkb, tags.act, parallel=m * n * k >= PARALLEL_MIN_WORK)
        return _replacement(func, kernel)

    def _int4(self, func, tags: KernelAttrs):
        """Portable: per tile of ``nb`` outputs (parallel) and block of k, the int32 nibble × x_q sums in
        registers, vectorized over the tile, then one offset correction and scale per block."""
        sch = s_tir.Schedule(func)
        part = sch.get_sblock("dense4_part")
        acc = sch.get_sblock("dense_acc")
        out = sch.get_sblock("dense_out")
        m, n = (_int(sch.get(lp).extent) for lp in sch.get_loops(out))
        kk = _int(sch.get(sch.get_loops(part)[-1]).extent) * _int(sch.get(sch.get_loops(acc)[-1]).extent)
        outer, ji, ai, aj, kb = _tile_outputs(sch, acc, out, 1, tags.nb)
        if kb is not None:
            sch.reorder(kb, aj)
        sch.compute_at(part, kb if kb is not None else outer)
        sch.set_scope(part, 0, "local")
        pj, t = sch.get_loops(part)[-2:]
        sch.reorder(t, pj)
        sch.vectorize(pj)
        sch.vectorize(aj)
        sch.vectorize(ji)
        if m * n * kk >= PARALLEL_MIN_WORK:
            sch.parallel(outer)
        pinit = sch.decompose_reduction(part, t)
        _vectorize_innermost(sch, pinit, outer)
        if kb is not None:
            ainit = sch.decompose_reduction(acc, kb)
            _vectorize_innermost(sch, ainit, outer)
        return sch


#: vector registers a conv tile's accumulators may hold (AVX-512 has 32, AVX2 and NEON 16: two are left
#: for the weight vectors of a step and one for the broadcast activation)
ACCUMULATORS = {16: 24, 8: 12, 4: 24}
#: the batch from which an fp32 conv with padding runs parallel over samples (``Conv2d``): enough samples
#: per thread to balance
PER_SAMPLE_MIN_BATCH = 8
#: the widest output-column tile (longer ones unroll too far for little gain)
MAX_TILE_COLUMNS = 14
#: an fp32 conv with padding that is not parallel over samples pads and convolves in one parallel launch
#: (``_one_launch``); False gives a launch per stage, for timing one against the other
ONE_LAUNCH = True
#: a pointwise fp32 conv loops over output blocks inside a column tile (``Conv2d``); False: blocks outermost,
#: as the other convs, for timing one against the other
POINTWISE_BLOCKS_INNER = True
#: a strided fp32 conv on blocked (NCHW16c) input that is parallel over (block, row, column tile) first splits its
#: output rows into ``ROW_BANDS`` bands, outermost (``Conv2d``, ``row_bands``): a thread's contiguous share of the
#: static split is then a band of rows of every output block, not whole blocks of every row, so it reads the
#: input rows of its band only (the padding stage, banded too, wrote them on the same thread) and a band's input
#: stays in L2 across the blocks. Off: measured on a shared machine, ResNet-18's 64->128 3x3 stride-2 conv at
#: batch 1, 2 threads, came out 1.01-1.08x in 4 runs and 0.98x in a fifth, heavily loaded one (0.03 ms of a
#: 19 ms model); stride-1 convs and the stem showed nothing beyond the noise. Re-measure quietly with
#: ``bench_tvm --only layers --toggle schedules.ROW_BANDED`` ("TVM*": banded) before turning it on. Banding the
#: stride-1 convs too (``row_bands`` without its stride test) gave nothing in the model either: sum of convs 19.27 ->
#: 19.33 ms at 2 threads, 35.94 -> 34.98 ms at one (20 rounds, 3 kept on a shared machine)
ROW_BANDED = False
#: bands of rows: a power of two, so that 1, 2 and 4 threads each get whole bands of a static split
ROW_BANDS = 4
#: a banded conv reads its weights once per band: only where they stay in the L2 cache beside a band's input
#: (1 MiB on AVX-512 server cores; ResNet's late convs stream megabytes of weights from memory, and banding them
#: would read them once per band)
ROW_BAND_MAX_WEIGHT_BYTES = 640 << 10


def row_bands(rows: int, weight_bytes: int, batch: int, lanes: int, stride: int, blocked: bool) -> int:
    """Bands of output rows outermost in an fp32 conv's parallel loop (``ROW_BANDED``): ``ROW_BANDS`` for a
    strided conv on blocked input at batch 1 on AVX-512 (16 lanes) where the weights fit the L2 budget and the
    bands have rows of their own; else 1 (blocks outermost)."""
    if not ROW_BANDED or batch != 1 or lanes != 16 or stride < 2 or not blocked or \
            weight_bytes > ROW_BAND_MAX_WEIGHT_BYTES:
        return 1
    return ROW_BANDS if rows >= 2 * ROW_BANDS and rows % ROW_BANDS == 0 else 1


def conv_tile_columns(ow: int, vectors: int, lanes: int) -> int:
    """Output columns per register tile: the largest divisor of ``ow`` whose tile of ``vectors`` vector
    registers per column fits the accumulator budget (7 × 2 zmm for ResNet's 56/28/14/7-wide maps)."""
    budget = max(1, ACCUMULATORS.get(lanes, 12) // max(vectors, 1))
    return _divisor(ow, min(budget, MAX_TILE_COLUMNS))


class Conv2d(_Rule):
    """NCHW fp32 and int8 conv (the portable path; AVX2 int8 gets ``avx2.conv2d_int8``): tiles of ``owt``
    output columns × ``ob`` output channels held in registers, channels innermost (vectorized), reduction
    (c, ky, kx) outside the tile; bias, residual and activation and the write back to NCHW per tile (int8:
    after the convolution, as it also reads the sample's scale); parallel over (batch, output block, row,
    column tile), output block outside the rows so a block's weights stay in cache across its rows.
    Depthwise convolutions (one input channel per group) vectorize over output columns instead. A blocked
    (NCHWc, ``KernelAttrs.block_in``) input reduces a pixel's channels of a block innermost; a blocked output
    stores each accumulator register as it is (no transposing write-back)."""

    def apply(self, func, target, tunable):
        tags = KernelAttrs.of(func)
        if tags is None or tags.kernel not in ("conv2d", "conv2d_int8"):
            return None
        if tags.kernel == "conv2d_int8":
            hand = self._int8_vnni(func, tags) or self._int8_avx2(func, tags)
            if hand is not None:
                return hand
            if tags.pool[0]:  # a fused max pooling only has the VNNI micro-kernel (the lowering fuses it only there)
                return None
        elif tags.pool[0]:
            return self._fp32_pooled(func, tags)
        else:
            hand = self._fp32_bordered(func, tags)
            if hand is not None:
                return hand
        sch = s_tir.Schedule(func)
        int8 = tags.kernel == "conv2d_int8"
        if int8:  # the scales are expressions of the sample's max, read where needed
            for name in ("sample_scale", "sample_inv"):
                sch.compute_inline(sch.get_sblock(name))
        ob = tags.nb
        acc = sch.get_sblock("conv_acc")
        out = sch.get_sblock("conv_out")
        # a blocked (NCHWc) input adds its channels within a block as the innermost reduction loop
        b, y, x, o, rc, ry, rx, *rci = sch.get_loops(acc)
        ow = _int(sch.get(x).extent)
        icg = _int(sch.get(rc).extent)
        work = 1
        for loop in (b, y, x, o, rc, ry, rx, *rci):
            work *= _int(sch.get(loop).extent) or 1
        depthwise = tags.groups > 1 and icg == 1 and ob == 1
        if depthwise:  # one channel per tile: vectorize the output columns
            owt = _divisor(ow, self.lanes)
        else:
            owt = conv_tile_columns(ow, -(-ob // self.lanes), self.lanes)
        xo, xi = sch.split(x, [None, owt])
        oo, oi = sch.split(o, [None, ob])
        # a pointwise fp32 conv (ResNet's strided 1x1 shortcuts) takes every output block of a column tile in turn,
        # while the tile's input pixels are in L1 (its weights are small); others take the rows of a block in turn,
        # while the block's weights are in cache
        pointwise = POINTWISE_BLOCKS_INNER and not int8 and not depthwise and \
            (_int(sch.get(ry).extent), _int(sch.get(rx).extent)) == (1, 1)
        batch = _int(sch.get(b).extent) or 1
        bands = 1 if int8 or depthwise or pointwise else \
            row_bands(_int(sch.get(y).extent) or 1, 4 * _buffer_elements(func, 1), batch, self.lanes, tags.strides[0],
                      bool(tags.block_in))
        if bands > 1:  # a thread's share: a band of rows of every block (each block's rows in turn)
            yb, yi = sch.split(y, [bands, None])
            tiles = (yb, oo, yi, xo)
        else:
            tiles = (y, xo, oo) if pointwise else (oo, y, xo)
        sch.reorder(b, *tiles, rc, ry, rx, *rci, *((oi, xi) if depthwise else (xi, oi)))
        # fp32 with padding over a batch: parallel over samples, each sample padded under its iteration and
        # convolved while the padded copy is in cache (not the whole batch padded, written to memory and read
        # back); else parallel over (sample, block, row, column tile)
        per_sample = not int8 and batch >= PER_SAMPLE_MIN_BATCH and _sblock_or_none(sch, "conv_pad") is not None
        outer = sch.fuse(*tiles) if per_sample else sch.fuse(b, *tiles)
        if int8:  # the epilogue also reads the sample's scale: it cannot move under the tile, runs after it
            oloops = sch.get_loops(out)
            ofused = sch.fuse(*oloops[:2])
            if work >= PARALLEL_MIN_WORK:
                sch.parallel(ofused)
            if depthwise or ow % self.lanes == 0:
                _, vx = sch.split(oloops[-1], [None, self.lanes if ow % self.lanes == 0 else ow])
                sch.vectorize(vx)
        else:
            sch.reverse_compute_at(out, outer)
            sch.set_scope(acc, 0, "local")
            # the tile written back a channel at a time, its columns one vector (contiguous in NCHW): left to
            # LLVM, the channels became the vector and each store a scatter (vscatterdps; 1.1-1.3x slower at
            # batch 8 with a residual: the stem and 56x56 convs of ResNet-18); blocked (NCHWc) output: a pixel's
            # block of channels, one register stored as it is
            _vectorize_innermost(sch, out, outer)
        if work >= PARALLEL_MIN_WORK:
            sch.parallel(b if per_sample else outer)
        if depthwise:
            sch.vectorize(xi)
        else:
            sch.unroll(xi)
            sch.vectorize(oi)
        init = sch.decompose_reduction(acc, rc)
        _vectorize_innermost(sch, init, outer)
        pad = _sblock_or_none(sch, "quantize_x" if int8 else "conv_pad")
        if pad is not None and tags.block_in:  # a pixel's block of channels padded as one vector
            sch.vectorize(sch.get_loops(pad)[-1])
        if per_sample:
            sch.compute_at(pad, b)
        elif pad is not None:
            loops = sch.get_loops(pad)
            if bands > 1:  # rows outside the channels: a thread pads the rows its band of the conv reads
                sch.reorder(loops[0], loops[2], loops[1])
                loops = sch.get_loops(pad)
            pfused = sch.fuse(*loops[:2])
            if work >= PARALLEL_MIN_WORK:
                sch.parallel(pfused)
                if not int8 and ONE_LAUNCH:
                    return _one_launch(sch)
        return sch

    def _fp32_pooled(self, func, tags: KernelAttrs):
        """fp32 conv with a fused max pooling (``kernels.conv2d``'s ``pool``), parallel over samples: a sample's
        activated conv is computed in the plain conv's register tiles into a channels-last buffer (in cache),
        then pooled, each window's maximum vectorized over channels; the conv's full output never reaches
        memory."""
        sch = s_tir.Schedule(func)
        pool, rows, acc = (sch.get_sblock(name) for name in ("pool_out", "conv_rows", "conv_acc"))
        pad = _sblock_or_none(sch, "conv_pad")
        ob = tags.nb
        if tags.block_out:  # blocked output: a pixel's block of channels is the vector
            b, pco, py, px, pci = sch.get_loops(pool)
            lanes = tags.block_out
        else:
            b, po, py, px = sch.get_loops(pool)
            lanes = self.lanes if (_int(sch.get(po).extent) or 1) % self.lanes == 0 else 1
            pco, pci = sch.split(po, [None, lanes])
        sch.reorder(b, py, px, pco, pci)
        if (_int(sch.get(b).extent) or 1) > 1:
            sch.parallel(b)
        sch.compute_at(rows, b, preserve_unit_loops=True)
        y, x, o = sch.get_loops(rows)[-3:]
        owt = conv_tile_columns(_int(sch.get(x).extent), -(-ob // self.lanes), self.lanes)
        xo, xi = sch.split(x, [None, owt])
        oo, oi = sch.split(o, [None, ob])
        sch.reorder(oo, y, xo, xi, oi)
        sch.compute_at(acc, xo, preserve_unit_loops=True)
        sch.set_scope(acc, 0, "local")
        axi, aoi, rc, ry, rx, *rci = sch.get_loops(acc)[-(6 if tags.block_in else 5):]
        sch.reorder(rc, ry, rx, *rci, axi, aoi)
        sch.unroll(axi)
        sch.vectorize(aoi)
        sch.vectorize(oi)
        if lanes > 1:
            sch.vectorize(pci)
        init = sch.decompose_reduction(acc, rc)
        _vectorize_innermost(sch, init, b)
        if pad is not None:
            sch.compute_at(pad, b)
        return sch

    def _fp32_bordered(self, func, tags: KernelAttrs):
        """``blocked.conv2d`` for an fp32 conv on AVX-512 whose blocked input, output or residual carries a border
        (``KernelAttrs.halo_*``): it reads its input in place and writes its output's border itself."""
        if self.lanes != blocked.LANES or not (tags.halo_in or tags.halo_out or tags.halo_res) or \
                not blocked.conv2d_supported(tags.block_in, tags.block_out, tags.nb, tags.groups, tags.pads,
                                             tags.halo_in, tags.pool):
            return None
        shapes = _shapes(func)
        data, weight, out = shapes[0], shapes[1], shapes[-1]
        if tags.residual and len(shapes[3]) != 5:  # an NCHW residual: the TE kernel reads it
            return None
        n, cb, h, w, block = data
        work = n * out[1] * out[4] * (out[2] - 2 * tags.halo_out) * (out[3] - 2 * tags.halo_out) * cb * block * \
            weight[2] * weight[3]
        kernel = blocked.conv2d((n, cb * block, h - 2 * tags.halo_in, w - 2 * tags.halo_in), out[1] * out[4],
                                weight[-1], (weight[2], weight[3]), tags.strides, tags.pads, tags.dilations, tags.act,
                                parallel=work >= PARALLEL_MIN_WORK, residual=tags.residual, halo_in=tags.halo_in,
                                halo_out=tags.halo_out, halo_res=tags.halo_res)
        return _replacement(func, kernel)

    def _int8_vnni(self, func, tags: KernelAttrs):
        """The ``vpdpbusd`` micro-kernel (``avx512.conv2d_int8``) where the target has AVX-512 VNNI."""
        if "vnni" not in self.features:
            return None
        shapes = _shapes(func)
        data, codes, out = shapes[0], shapes[1], shapes[-2 if tags.amax_out else -1]
        if not avx512.conv2d_int8_supported(codes[4], tags.groups, tags.levels, tags.taps) or \
                (tags.pool[0] and (tags.residual or not avx512.conv2d_int8_pool_supported(tags.pool))):
            return None
        work = out[0] * out[1] * out[2] * out[3] * data[1] * codes[2] * codes[3]
        kernel = avx512.conv2d_int8(data, out[1], codes[4], (codes[2], codes[3]), tags.strides, tags.pads,
                                    tags.dilations, tags.act, parallel=work >= PARALLEL_MIN_WORK,
                                    residual=tags.residual, amax_in=shapes[4 + tags.residual][1] if tags.amax_in else 0,
                                    amax_out=tags.amax_out, pool=tags.pool)
        return _replacement(func, kernel)

    def _int8_avx2(self, func, tags: KernelAttrs):
        """The ``vpmaddwd`` micro-kernel (``avx2.conv2d_int8``) where the target has AVX2 and groups = 1."""
        if "avx2" not in self.features or len(func.params) != 5 or tags.levels not in (0, avx2.LEVELS) or tags.pool[0]:
            return None
        data, codes, _, _, out = _shapes(func)
        ob = codes[4]
        if not avx2.conv2d_int8_supported(ob, tags.groups):
            return None
        work = out[0] * out[1] * out[2] * out[3] * data[1] * codes[2] * codes[3]
        kernel = avx2.conv2d_int8(data, out[1], ob, (codes[2], codes[3]), tags.strides, tags.pads, tags.dilations,
                                  tags.act, parallel=work >= PARALLEL_MIN_WORK, taps=tags.taps)
        return _replacement(func, kernel)


def _one_launch(sch: s_tir.Schedule) -> s_tir.Schedule:
    """The scheduled function's stages, parallel loops at its root (an fp32 conv's padding, then its tiles), run in
    one parallel launch, a barrier between them (as ``avx512.conv2d_int8``): the pool's threads are woken once per
    call, not once per stage. Unchanged unless the root holds only parallel loops."""
    func = sch.mod["main"]
    realize = func.body
    root = realize.block
    stages = list(root.body) if isinstance(root.body, tirx.SeqStmt) else []
    if len(stages) < 2 or not all(isinstance(st, tirx.For) and st.kind == tirx.ForKind.PARALLEL for st in stages):
        return sch
    fenced = [tirx.AttrStmt(0, "pragma_parallel_barrier_when_finish", 1, st) for st in stages[:-1]]
    body = tirx.AttrStmt(0, "pragma_parallel_launch_point", 1, tirx.SeqStmt([*fenced, stages[-1]]))
    block = s_stmt.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, body, root.init,
                          root.alloc_buffers, root.match_buffers, root.annotations)
    return s_tir.Schedule(func.with_body(s_stmt.SBlockRealize(realize.iter_values, realize.predicate, block)))


def _vectorize_innermost(sch: s_tir.Schedule, block, outer) -> None:
    """Vectorize ``block``'s innermost loop, unless that is the (parallel) ``outer`` loop itself: a tile's
    unit loops vanish when its extents are 1, and vectorizing the outer loop instead makes one vector of
    every tile (hundreds of lanes, minutes of LLVM)."""
    loop = sch.get_loops(block)[-1]
    if sch.get(loop).same_as(sch.get(outer)) or (_int(sch.get(loop).extent) or 0) <= 1:
        return
    sch.vectorize(loop)


def _replacement(func: tirx.PrimFunc, kernel: tirx.PrimFunc) -> s_tir.Schedule:
    """A schedule of the hand-written ``kernel`` standing in for ``func``: it keeps ``func``'s attributes
    (symbol, bitpass tags), so the module sees the same function."""
    for key, value in func.attrs.items():
        kernel = kernel.with_attr(key, value)
    return s_tir.Schedule(kernel)


def _buffer_elements(func: tirx.PrimFunc, index: int) -> int:
    """Elements of the function's ``index``-th buffer parameter (static shape)."""
    elements = 1
    for d in _shapes(func)[index]:
        elements *= d
    return elements


def _sblock_or_none(sch: s_tir.Schedule, name: str):
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - no such block
        return None


def _spatial_only(sch: s_tir.Schedule, block) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


class Matmul(_Rule):
    """TVM's legalized ``matmul`` of two computed tensors (attention's Q·Kᵀ and P·V): [mt × nt] output tiles
    in registers, the columns vectorized (the right operand's rows are contiguous), the reduction outside
    the tile, parallel over batch dimensions and tiles."""

    def apply(self, func, target, tunable):
        if KernelAttrs.of(func) is not None or not _has_root(sch := s_tir.Schedule(func)):
            return None
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if len(blocks) != 1 or sch.get(blocks[0]).name_hint != "matmul":
            return None
        block = blocks[0]
        ivs = sch.get(block).iter_vars
        loops = sch.get_loops(block)
        if len(loops) != len(ivs) or len(ivs) < 3 or ivs[-1].iter_type != tirx.IterVar.CommReduce \
                or any(iv.iter_type != tirx.IterVar.DataPar for iv in ivs[:-1]):
            return None
        extents = [_int(sch.get(lp).extent) for lp in loops]
        if any(e is None for e in extents):
            return None
        *batch, i, j, k = loops
        rows, cols = extents[-3], extents[-2]
        nt = next((w for w in (2 * self.lanes, self.lanes) if cols % w == 0), _divisor(cols, self.lanes))
        mt = _divisor(rows, max(1, ACCUMULATORS.get(self.lanes, 12) // max(1, nt // self.lanes)) if nt >= self.lanes
                      else 4)
        io, ii = sch.split(i, [None, mt])
        jo, ji = sch.split(j, [None, nt])
        sch.reorder(*batch, io, jo, k, ii, ji)
        acc = sch.cache_write(block, 0, "local")
        outer = sch.fuse(*batch, io, jo)
        sch.reverse_compute_at(acc, outer)
        work = 1
        for e in extents:
            work *= e
        if work >= PARALLEL_MIN_WORK:
            sch.parallel(outer)
        sch.unroll(ii)
        sch.vectorize(ji)
        init = sch.decompose_reduction(block, k)
        _vectorize_innermost(sch, init, outer)
        _vectorize_innermost(sch, acc, outer)
        return sch


class Pool(_Rule):
    """TVM's legalized max pooling (NCHW): parallel over (batch, channel), each channel plane padded under that
    loop while it is in cache, not the whole padded input written and read back (ResNet-18's max pooling at
    batch 32: 1.7x faster; batch 1 unchanged)."""

    def apply(self, func, target, tunable):
        if KernelAttrs.of(func) is not None:
            return None
        sch = s_tir.Schedule(func)
        if not _has_root(sch):
            return None
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        names = [sch.get(b).name_hint for b in blocks]
        if names not in (["pool_max"], ["pad_temp", "pool_max"]):
            return None
        block = blocks[-1]
        ivs = sch.get(block).iter_vars
        loops = sch.get_loops(block)
        kinds = "".join("S" if iv.iter_type == tirx.IterVar.DataPar else "R" for iv in ivs)
        extents = [_int(sch.get(lp).extent) for lp in loops]
        if kinds != "SSSSRR" or len(loops) != 6 or any(e is None for e in extents):
            return None
        n, c, y, x, ry, rx = loops
        outer = sch.fuse(n, c)
        if len(blocks) == 2:  # one channel plane padded at a time, while it is in cache
            sch.compute_at(blocks[0], outer)
        work = 1
        for e in extents:
            work *= e
        if work >= PARALLEL_MIN_WORK:
            sch.parallel(outer)
        sch.unroll(ry)
        sch.unroll(rx)
        return sch


class Elementwise(_Rule):
    """Functions whose blocks are all spatial (LegalizeOps' injective ops, chains fused by TVM's operator
    fusion): every block but the last inlined into its consumer where it can be (one pass over memory), then
    each remaining block's loops fused, split into a parallel outer part and a vectorized inner part (not
    for booleans, which TIR cannot store as vectors)."""

    def apply(self, func, target, tunable):
        if KernelAttrs.of(func) is not None:
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []
        if not blocks or not all(_spatial_only(sch, blk) for blk in blocks):
            return None
        for blk in blocks[:-1]:
            try:
                sch.compute_inline(blk)
            except Exception:  # noqa: BLE001 - e.g. read at other indices by a broadcast: stays a stage
                pass
        booleans = '"bool"' in func.script()  # a boolean buffer anywhere (parameters or intermediates)
        for blk in sch.get_child_blocks(sch.get_sblock("root")):
            loops = sch.get_loops(blk)
            if not loops:
                continue
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            extent = _int(sch.get(fused).extent)
            if extent is None:
                continue
            if extent % self.lanes == 0 and extent >= self.lanes and not booleans:
                outer, inner = sch.split(fused, [None, self.lanes])
                sch.vectorize(inner)
            else:
                outer = fused
            if extent >= PARALLEL_MIN_WORK:
                sch.parallel(outer)
        return sch


class Reduction(_Rule):
    """Anything else with a leading spatial loop on every root block (softmax, layer norm, pooling,
    means): parallel over that loop when the function is big enough."""

    def apply(self, func, target, tunable):
        if KernelAttrs.of(func) is not None:
            return None
        sch = s_tir.Schedule(func)
        if not _has_root(sch):
            return None
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        changed = False
        for blk in blocks:
            loops = sch.get_loops(blk)
            if not loops:
                continue
            ivs = sch.get(blk).iter_vars
            spatial = [lp for lp, iv in zip(loops, ivs) if iv.iter_type == tirx.IterVar.DataPar]
            if len(loops) != len(ivs) or not spatial or spatial[0] != loops[0]:
                continue
            work = 1
            for lp in loops:
                work *= _int(sch.get(lp).extent) or 1
            # the leading spatial loops (batch, channels, ...) fused until there are enough iterations: at
            # batch 1 the batch loop alone is one, and the reduction ran on one thread
            lead = 0
            while lead < len(loops) - 1 and ivs[lead + 1].iter_type == tirx.IterVar.DataPar and \
                    (_int(sch.get(loops[lead]).extent) or 0) < PARALLEL_MIN_ITERATIONS:
                lead += 1
            outer = sch.fuse(*loops[:lead + 1]) if lead else loops[0]
            if work >= PARALLEL_MIN_WORK and (_int(sch.get(outer).extent) or 0) > 1:
                sch.parallel(outer)
                changed = True
        return sch if changed else None


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
    except Exception:  # noqa: BLE001
        return False
    return True


def rules_for(features: Iterable[str]) -> list[dlight.ScheduleRule]:
    """The rule list for a target with ``features`` (first applicable rule wins)."""
    features = frozenset(features)
    lanes = vector_lanes(features)
    return [Dense(lanes, features), Conv2d(lanes, features), Matmul(lanes), Pool(lanes), Elementwise(lanes),
            Reduction(lanes)]


def apply_rules(mod, target: Target):
    """Schedule every PrimFunc of ``mod`` (legalized) for ``target`` with bitpass's rules."""
    rules = rules_for(features_of(target))
    with target:
        return dlight.ApplyDefaultSchedule(*rules)(mod)
