"""Scaffolding the x86 micro-kernels (``avx2.py``, ``avx512.py``) share, so an ISA module holds only its
multiply-add steps and register tiling.

Both ISAs quantize activations the same way (``kernels.quantize_blocks``, per-sample absmax for the conv),
clamp in the same epilogue and run the 4-bit dense with the same loop nest; only the instructions that
sum the integer products differ. The pieces here are TIR macros (expanded where they are called, so the
generated code is what an inline copy would give) and plain Python helpers for tile sizes.
"""

from __future__ import annotations

from collections.abc import Callable

from tvm import tirx
from tvm.script import tirx as T

#: the smallest absmax a quantization scale divides by (an all-zero row or block)
ABSMAX_FLOOR = 1e-12


def floor(act: str) -> float:
    """The epilogue's lower clamp: ReLU is max(v, 0); no activation is max(v, -FLT_MAX)."""
    return 0.0 if act == "relu" else -3.4028234663852886e38


def loop(parallel: bool):
    """``T.parallel`` or ``T.serial``: small kernels run on one thread (waking the pool costs more)."""
    return T.parallel if parallel else T.serial


def divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (at least 1): a tile that splits ``n`` evenly."""
    return next(d for d in range(max(1, min(n, limit)), 0, -1) if n % d == 0)


def taking(func: tirx.PrimFunc, keep: tuple[bool, ...]) -> tirx.PrimFunc:
    """``func`` with only the parameters ``keep`` marks: a micro-kernel written once with every optional
    parameter of its TE kernel takes exactly the TE kernel's (its body must not read the ones dropped)."""
    params = [p for p, kept in zip(func.params, keep, strict=True) if kept]
    return tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)


def simd_lanes(count: int, lanes: int) -> int:
    """``lanes`` where they divide ``count`` (vectorized reductions), else 1."""
    return lanes if count % lanes == 0 else 1


@T.macro
def absmax_scale(src, start, count, lanes, levels, lane_max, amax, sx, b):
    """``amax[0]``: the absmax of ``count`` values of the flat ``src`` from ``start`` (kept per lane over
    ``lanes``-wide vectors in ``lane_max``, then reduced), and ``sx[b]`` = amax / ``levels``: a sample's
    activation scale."""
    for v in T.vectorized(lanes):
        lane_max[v] = T.float32(0)
    for r in range(count // lanes):
        for v in T.vectorized(lanes):
            lane_max[v] = T.max(lane_max[v], T.fabs(src[start + r * lanes + v]))
    amax[0] = T.float32(ABSMAX_FLOOR)
    for v in range(lanes):
        amax[0] = T.max(amax[0], lane_max[v])
    sx[b] = amax[0] / T.float32(levels)


def dense_int4(m: int, k: int, n: int, nb: int, block_size: int, act: str, parallel: bool, lanes: int,
               accumulate: Callable) -> tirx.PrimFunc:
    """The 4-bit dense (``kernels.dense_int4``) around an ISA's multiply-adds: activations quantized per
    block of ``block_size`` k to int8 (as ``kernels.quantize_blocks``), then per output tile ``t`` and row
    ``i`` the macro ``accumulate(part, flat, xq, t, i, b)`` adds block ``b``'s integer dot products of the
    codes (nibble + 8, the 8·Σ x_q taken back here) to the int32 ``part``, which is scaled per block."""
    bs = block_size
    blocks, nkb, kg = n // nb, k // bs, k // 8
    clamp = floor(act)
    outer = loop(parallel)
    amax_lanes = simd_lanes(bs, lanes)

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((m, k), "float32"), codes: T.Buffer((blocks, kg, nb, 4), "uint8"),
               scales: T.Buffer((blocks, nkb, nb), "float16"), bias: T.Buffer((n,), "float32"),
               out: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        flat = T.decl_buffer((blocks * kg * nb * 4,), "uint8", data=codes.data)
        sx = T.alloc_buffer((m * nkb,), "float32")
        xsum8 = T.alloc_buffer((m * nkb,), "int32")
        xq = T.alloc_buffer((m * k,), "int8")
        for i, b in T.grid(m, nkb):  # per-block int8 activations, as kernels.quantize_blocks
            lane_max = T.alloc_buffer((amax_lanes,), "float32", scope="local")
            amax = T.alloc_buffer((1,), "float32", scope="local")
            lane_sum = T.alloc_buffer((amax_lanes,), "int32", scope="local")
            total = T.alloc_buffer((1,), "int32", scope="local")
            for v in T.vectorized(amax_lanes):
                lane_max[v] = T.float32(0)
                lane_sum[v] = 0
            for r in range(bs // amax_lanes):
                for v in T.vectorized(amax_lanes):
                    lane_max[v] = T.max(lane_max[v], T.fabs(x[i, b * bs + r * amax_lanes + v]))
            amax[0] = T.float32(ABSMAX_FLOOR)
            for v in range(amax_lanes):
                amax[0] = T.max(amax[0], lane_max[v])
            sx[i * nkb + b] = amax[0] / T.float32(127)
            for r in range(bs // amax_lanes):
                for v in T.vectorized(amax_lanes):
                    xq[i * k + b * bs + r * amax_lanes + v] = T.Cast(
                        "int8", T.round(x[i, b * bs + r * amax_lanes + v] * (T.float32(127) / amax[0])))
                    lane_sum[v] = lane_sum[v] + T.Cast("int32", xq[i * k + b * bs + r * amax_lanes + v])
            total[0] = 0
            for v in range(amax_lanes):
                total[0] = total[0] + lane_sum[v]
            xsum8[i * nkb + b] = total[0] * 8
        for t in outer(blocks):
            for i in range(m):
                acc = T.alloc_buffer((nb,), "float32", scope="local")
                for j in T.vectorized(nb):
                    acc[j] = T.float32(0)
                for b in range(nkb):
                    part = T.alloc_buffer((nb,), "int32", scope="local")
                    for j in T.vectorized(nb):
                        part[j] = 0
                    accumulate(part, flat, xq, t, i, b)
                    for j in T.vectorized(nb):
                        acc[j] = acc[j] + T.Cast("float32", part[j] - xsum8[i * nkb + b]) * (
                            sx[i * nkb + b] * T.Cast("float32", scales[t, b, j]))
                for j in T.vectorized(nb):
                    out[i, t * nb + j] = T.max(acc[j] + bias[t * nb + j], T.float32(clamp))

    return kernel
