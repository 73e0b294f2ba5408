"""Group-wise affine integer grids for weight-only quantization, in ONNX Runtime's MatMulNBits layout.

A weight is a MatMul's ``(K, N)`` matrix (input features x output features; a torch ``nn.Linear`` weight
transposed, an HF ``Conv1D`` weight as is). A *group* is ``group_size`` consecutive rows of K within one
output column: each group has its own scale and zero point, as MatMulNBits blocks do. Codes are unsigned,
``0 .. 2**bits - 1``; ``w ~ (code - zero) * scale``. The range of each group includes 0 (as ORT's RTN
does), so an exact zero stays exact. Widths may differ between K-slices (``bits`` per group row), the
form group-wise mixed precision takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GroupQuantized:
    """Codes, scales and zero points of one quantized ``(K, N)`` weight."""

    codes: np.ndarray  # uint8 (K, N)
    scales: np.ndarray  # float32 (K // group_size, N)
    zeros: np.ndarray  # uint8 (K // group_size, N), zero-point codes
    bits: np.ndarray  # int (K // group_size,): the width of each K-slice of groups
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape  # type: ignore[return-value]

    def dequantize(self) -> np.ndarray:
        """The weight the codes stand for, float32 ``(K, N)``."""
        scales = np.repeat(self.scales, self.group_size, axis=0)
        zeros = np.repeat(self.zeros.astype(np.float32), self.group_size, axis=0)
        return ((self.codes.astype(np.float32) - zeros) * scales).astype(np.float32)

    @property
    def average_bits(self) -> float:
        """Mean code width over the weight's elements (scales and zero points not counted)."""
        return float(np.mean(self.bits))

    def nbytes(self, scale_bytes: int = 4) -> int:
        """Bytes as MatMulNBits stores them (one node per width): packed codes, one scale per group, and
        zero points packed per output column."""
        n, total = self.shape[1], 0
        for bits in np.unique(self.bits):
            slices = int(np.sum(self.bits == bits))
            total += n * (slices * -(-self.group_size * int(bits) // 8) + slices * scale_bytes
                          + -(-slices * int(bits) // 8))
        return total


def check_groups(k: int, group_size: int) -> None:
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group size {group_size} does not divide the {k} input features of the weight")


def group_params(w: np.ndarray, bits: int | np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Min-max scales and zero points ``(K // group_size, N)`` of the groups of ``w`` (range includes 0)."""
    k, n = w.shape
    check_groups(k, group_size)
    blocks = w.reshape(k // group_size, group_size, n)
    low = np.minimum(blocks.min(axis=1), 0.0)
    high = np.maximum(blocks.max(axis=1), 0.0)
    levels = (2.0 ** np.broadcast_to(np.asarray(bits), (k // group_size,)) - 1)[:, None]
    scales = (high - low) / levels
    scales = np.where(scales > 0, scales, 1.0)
    zeros = np.clip(np.round(-low / scales), 0, levels)
    return scales.astype(np.float32), zeros.astype(np.uint8)


def quantize_codes(w: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int | np.ndarray,
                   group_size: int) -> np.ndarray:
    """Round ``w`` to the nearest code of the given grids (uint8 ``(K, N)``)."""
    k = w.shape[0]
    top = np.repeat((2 ** np.broadcast_to(np.asarray(bits), (k // group_size,)) - 1)[:, None], group_size, axis=0)
    s = np.repeat(scales, group_size, axis=0)
    z = np.repeat(zeros.astype(np.float32), group_size, axis=0)
    return np.clip(np.round(w / s + z), 0, top).astype(np.uint8)


def rtn(w: np.ndarray, bits: int | np.ndarray, group_size: int) -> GroupQuantized:
    """Round-to-nearest on min-max grids: the baseline every error-compensating method is measured against."""
    w = np.asarray(w, dtype=np.float32)
    check_groups(w.shape[0], group_size)
    bits_per_slice = np.broadcast_to(np.asarray(bits, dtype=np.int64), (w.shape[0] // group_size,)).copy()
    scales, zeros = group_params(w, bits_per_slice, group_size)
    codes = quantize_codes(w, scales, zeros, bits_per_slice, group_size)
    return GroupQuantized(codes, scales, zeros, bits_per_slice, group_size)


#: output columns per block of ``quadratic_form``: the ``H @ E`` block stays tens of MB on a 50k-wide head
QUADRATIC_BLOCK = 4096


def quadratic_form(e: np.ndarray, hessian: np.ndarray) -> float:
    """``tr(E^T H E)`` of a ``(K, N)`` matrix ``E`` in float64, as ``sum(E * (H @ E))`` one block of columns at
    a time: a BLAS product and ``K x block`` of scratch. (``np.einsum("kn,kj,jn->", ...)`` over the three
    operands runs a plain loop without BLAS: 25-100 s on one GPT-2 layer, most of a compile.)"""
    h = np.asarray(hessian, np.float64)
    total = 0.0
    for start in range(0, e.shape[1], QUADRATIC_BLOCK):
        block = np.asarray(e[:, start:start + QUADRATIC_BLOCK], np.float64)
        total += float(np.sum(block * (h @ block)))
    return total


def output_error(w: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    """Layer-local objective: ``tr(E^T H E) / tr(W^T H W)`` with ``E = W - approx`` and ``H = X^T X / n``:
    the relative mean squared error of the layer's outputs on its calibration inputs (block by block of
    output columns, as ``quadratic_form``: no float64 copy of the whole weight)."""
    h = np.asarray(hessian, np.float64)
    error = reference = 0.0
    for start in range(0, w.shape[1], QUADRATIC_BLOCK):
        columns = slice(start, start + QUADRATIC_BLOCK)
        block = np.asarray(w[:, columns], np.float64)
        reference += quadratic_form(block, h)
        error += quadratic_form(block - np.asarray(approx[:, columns], np.float64), h)
    return error / max(reference, 1e-30)
