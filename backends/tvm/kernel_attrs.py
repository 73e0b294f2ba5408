"""The attributes a bitpass kernel's PrimFunc carries: one typed schema for the lowering that writes them
(``lower.py``, the benchmarks and tests that build kernels directly) and the schedule rules that read them
(``schedules.py``). The raw ``bitpass.*`` attribute names appear only here.

A rule never guesses what a function is from its body: the attributes say which kernel it is, its output
tile, its fused epilogue and, for convolutions, the geometry a hand-written micro-kernel needs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

#: PrimFunc attribute names are ``PREFIX + field name``
PREFIX = "bitpass."

#: the kernels ``kernels.py`` defines, and the fp32 conv computed by Winograd's algorithm (``winograd.conv2d``)
KINDS = ("dense", "dense_int8", "dense_int4", "conv2d", "conv2d_int8", "conv2d_winograd")
#: fused activations of a kernel's epilogue
ACTIVATIONS = ("none", "relu")


@dataclass(frozen=True)
class KernelAttrs:
    """What a scheduled bitpass kernel is. ``nb``: outputs per register tile (the weight layout's block);
    ``act``: the fused activation; ``residual``: the epilogue adds one more input of the output's shape
    (a skip connection) before the activation; ``taps``: a single-channel int8 conv packs a row of taps per
    32-bit lane (``kernels.conv_int8_taps``); ``levels``: the int8 kernels' code range (±levels); the rest is
    a convolution's geometry (``pads``: top, left, bottom, right); ``amax_in`` / ``amax_out``: an int8 conv reads
    its input's per-sample absmax from one more input (after the residual) instead of computing it / returns
    its output's per-sample absmax as a second output (``kernels.conv2d_int8``); ``pool``: a max pooling
    (kernel, stride, pad; kernel 0: none) fused after a conv's activation, its output the pooled one;
    ``block_in`` / ``block_out``: the fp32 conv's input / output is blocked NCHW{block}c (0: NCHW); ``halo_in`` /
    ``halo_out`` / ``halo_res``: its blocked input / output / residual carries a border of zeros that many pixels
    wide (``kernels.conv2d``)."""

    kernel: str
    nb: int
    act: str = "none"
    residual: bool = False
    taps: int = 0
    levels: int = 0
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    groups: int = 1
    amax_in: bool = False
    amax_out: bool = False
    pool: tuple[int, int, int] = (0, 0, 0)
    block_in: int = 0
    block_out: int = 0
    halo_in: int = 0
    halo_out: int = 0
    halo_res: int = 0

    def __post_init__(self) -> None:
        if self.kernel not in KINDS:
            raise ValueError(f"kernel {self.kernel!r} is not one of {', '.join(KINDS)}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"activation {self.act!r} is not one of {', '.join(ACTIVATIONS)}")
        if (self.amax_in or self.amax_out) and self.kernel != "conv2d_int8":
            raise ValueError(f"only the int8 conv carries a per-sample absmax, not {self.kernel!r}")
        if self.pool[0] and not self.kernel.startswith("conv2d"):
            raise ValueError(f"only a conv fuses a max pooling, not {self.kernel!r}")
        if (self.block_in or self.block_out) and self.kernel not in ("conv2d", "conv2d_winograd"):
            raise ValueError(f"only the fp32 conv reads or writes blocked (NCHWc) activations, not {self.kernel!r}")
        if (self.halo_in and not self.block_in) or (self.halo_out and not self.block_out):
            raise ValueError("only a blocked (NCHWc) input or output carries a border")
        if self.nb < 1:
            raise ValueError(f"output tile nb={self.nb} must be positive")

    @property
    def is_conv(self) -> bool:
        return self.kernel.startswith("conv2d")

    def to_func_attrs(self) -> dict[str, Any]:
        """The attribute dict for ``PrimFunc.with_attr`` / ``emit_te(primfunc_attrs=...)``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[PREFIX + f.name] = list(value) if isinstance(value, tuple) else (int(value) if isinstance(value, bool)
                                                                                  else value)
        return out

    def tag(self, func):  # (tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc
        """``func`` carrying these attributes."""
        return func.with_attr(self.to_func_attrs())

    @classmethod
    def of(cls, func) -> KernelAttrs | None:
        """The attributes of a PrimFunc the lowering tagged, or None for any other function."""
        attrs = func.attrs
        if attrs is None or PREFIX + "kernel" not in attrs:
            return None
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = PREFIX + f.name
            if key not in attrs:
                continue
            raw = attrs[key]
            if f.name in ("kernel", "act"):
                values[f.name] = str(raw)
            elif f.name in ("residual", "amax_in", "amax_out"):
                values[f.name] = bool(int(raw))
            elif f.name in ("strides", "pads", "dilations", "pool"):
                values[f.name] = tuple(int(v) for v in raw)
            else:
                values[f.name] = int(raw)
        return cls(**values)
