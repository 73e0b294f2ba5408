"""Floating-point and normal-float weight formats as group-wise codebooks: FP4 (E2M1), NF4 and FP8 (E4M3).

Integer grids (``grid.py``) space their levels evenly. These formats space them unevenly — densest near zero,
where most weights are — so at the same bytes they may round a bell-shaped weight more closely:

* ``fp4``: the 16 values of OCP's E2M1 (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6), as in LLM-FP4 and MXFP4.
* ``nf4``: QLoRA's NormalFloat, the quantiles of a standard normal scaled to [-1, 1], with an exact zero.
* ``fp8``: every finite value of E4M3 (``float8_e4m3fn``, 448 at most), as FP8 inference uses.

Each group (``group_size`` consecutive input features of one output column, as MatMulNBits groups) has one
absmax scale, so its largest weight lands on the codebook's largest value; a code is the index of the nearest
value. ``codebook_gptq`` rounds with GPTQ's error compensation onto the same codebook. The result stores like
an integer grid of the same width (codes plus one fp32 scale per group, no zero point), so comparisons at equal
bytes are direct. No CPU runtime computes with these codes: an artifact widens them at load (see
``emit.codebook_weight``), so they are a storage format with fp32 compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import ml_dtypes
import numpy as np

from bitpass.passes.weight_only.gptq import compensated_sweep, upper_inverse_cholesky
from bitpass.passes.weight_only.grid import check_groups

#: the NF4 levels of QLoRA (Dettmers et al., 2023): normal quantiles, asymmetric so that 0 is exact
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
#: E2M1's magnitudes (OCP Microscaling formats spec); the sign bit makes 16 codes (+0 and -0 both decode to 0)
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

FORMATS = ("fp4", "nf4", "fp8")
BITS = {"fp4": 4, "nf4": 4, "fp8": 8}


@cache
def codebook(name: str) -> np.ndarray:
    """The format's values in code order (float32); a code is an index into this table."""
    if name == "nf4":
        return np.asarray(_NF4, np.float32)
    if name == "fp4":
        return np.asarray([v for v in _E2M1] + [-v for v in _E2M1], np.float32)
    if name == "fp8":
        values = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        return np.where(np.isfinite(values), values, 0.0).astype(np.float32)  # the two NaN codes decode to 0
    raise ValueError(f"unknown codebook format {name!r}: use one of {', '.join(FORMATS)}")


@dataclass(frozen=True)
class CodebookQuantized:
    """Codes (indices into the format's codebook) and one absmax scale per group of a ``(K, N)`` weight."""

    codes: np.ndarray  # uint8 (K, N)
    scales: np.ndarray  # float32 (K // group_size, N)
    format: str
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape  # type: ignore[return-value]

    @property
    def bits(self) -> np.ndarray:
        """The code width of each K-slice (one width for the whole weight)."""
        return np.full(self.shape[0] // self.group_size, BITS[self.format])

    def dequantize(self) -> np.ndarray:
        return (codebook(self.format)[self.codes] * np.repeat(self.scales, self.group_size, axis=0)).astype(np.float32)

    def nbytes(self, scale_bytes: int = 4) -> int:
        """Packed codes and one scale per group (no zero points: every format here is symmetric about 0)."""
        k, n = self.shape
        return n * (k * BITS[self.format] // 8 + (k // self.group_size) * scale_bytes)


def _sorted_book(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted values, their codes, midpoints between neighbours): nearest-value rounding by ``searchsorted``."""
    book = codebook(name)
    order = np.argsort(book, kind="stable")
    values = book[order]
    return values, order.astype(np.uint8), (values[1:] + values[:-1]) / 2


def nearest_codes(x: np.ndarray, name: str) -> np.ndarray:
    """The code of the codebook value nearest each element of ``x`` (already divided by its scale)."""
    _, codes, midpoints = _sorted_book(name)
    return codes[np.searchsorted(midpoints, x)]


def absmax_scales(w: np.ndarray, name: str, group_size: int) -> np.ndarray:
    """``(K // group_size, N)``: each group's largest magnitude over the codebook's largest magnitude."""
    k, n = w.shape
    check_groups(k, group_size)
    peak = np.abs(w.reshape(k // group_size, group_size, n)).max(axis=1)
    scales = peak / float(np.abs(codebook(name)).max())
    return np.where(scales > 0, scales, 1.0).astype(np.float32)


def codebook_rtn(weight: np.ndarray, name: str, group_size: int) -> CodebookQuantized:
    """Round-to-nearest onto the format's codebook, one absmax scale per group."""
    w = np.asarray(weight, np.float32)
    scales = absmax_scales(w, name, group_size)
    codes = nearest_codes(w / np.repeat(scales, group_size, axis=0), name)
    return CodebookQuantized(codes, scales, name, group_size)


def codebook_gptq(weight: np.ndarray, h: np.ndarray, name: str, group_size: int, *, damp: float = 0.01,
                  block: int = 128) -> CodebookQuantized:
    """GPTQ onto the format's codebook: features rounded in order, each one's error spread onto the features not
    yet rounded through the inverse Hessian (``gptq.gptq``'s update; grids fixed from the original weight)."""
    w = np.asarray(weight, np.float64)
    k, n = w.shape
    scales = absmax_scales(w, name, group_size)
    book = codebook(name).astype(np.float64)
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    work = w.T.copy()
    work[:, dead] = 0.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    upper = upper_inverse_cholesky(h)
    codes = np.zeros((n, k), np.uint8)

    def round_feature(index: int, column: np.ndarray, _rest: np.ndarray) -> np.ndarray:
        scale = scales[index // group_size].astype(np.float64)
        codes[:, index] = nearest_codes(column / scale, name)
        return book[codes[:, index]] * scale

    compensated_sweep(work, upper, round_feature, group_size, block)
    return CodebookQuantized(np.ascontiguousarray(codes.T), scales, name, group_size)
