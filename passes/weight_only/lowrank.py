"""Low-rank compensation of the rounding error (ZeroQuant-V2's LoRC), optionally activation-aware.

``W ~ Q + A B`` with ``A (K, r)`` and ``B (r, N)`` kept in floating point: a rank-r correction of
``E = W - Q``. Plain LoRC takes the top singular vectors of ``E``; the activation-aware form minimizes
the layer's output error ``tr((E - AB)^T H (E - AB))`` instead: with ``H = L L^T``, the best rank-r
``L^T A B`` is the truncated SVD of ``L^T E`` (Eckart-Young), so ``A = L^-T U_r S_r``, ``B = V_r^T``.
It pays where a few directions carry most of the error: compare its bytes with a wider grid's
(``rank * (K + N)`` floats against the extra code bits).
"""

from __future__ import annotations

import numpy as np


def low_rank_compensation(weight: np.ndarray, approx: np.ndarray, rank: int, h: np.ndarray | None = None, *,
                          damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` float32 with ``approx + A @ B`` closest to ``weight`` (in output error when ``h`` is given)."""
    error = np.asarray(weight, np.float64) - np.asarray(approx, np.float64)
    k, n = error.shape
    if not 0 < rank <= min(k, n):
        raise ValueError(f"rank {rank} must lie in 1..{min(k, n)} for a {k}x{n} weight")
    if h is None:
        u, s, vt = np.linalg.svd(error, full_matrices=False)
        return (u[:, :rank] * s[:rank]).astype(np.float32), vt[:rank].astype(np.float32)
    h = np.array(h, np.float64)
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h))) + 1e-12
    lower = np.linalg.cholesky(h)
    u, s, vt = np.linalg.svd(lower.T @ error, full_matrices=False)
    a = np.linalg.solve(lower.T, u[:, :rank] * s[:rank])
    return a.astype(np.float32), vt[:rank].astype(np.float32)


def low_rank_bytes(k: int, n: int, rank: int, float_bytes: int = 4) -> int:
    """Bytes of the two factors."""
    return rank * (k + n) * float_bytes
