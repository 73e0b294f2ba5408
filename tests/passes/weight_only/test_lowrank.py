"""Low-rank compensation of rounding error (LoRC), plain and activation-aware."""

from __future__ import annotations

import numpy as np
import pytest

from bitpass.passes.weight_only.gptq import hessian
from bitpass.passes.weight_only.grid import output_error, rtn
from bitpass.passes.weight_only.lowrank import low_rank_bytes, low_rank_compensation


@pytest.fixture
def layer():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 96)) * rng.lognormal(0, 1, 96)
    w = rng.standard_normal((96, 64)).astype(np.float32)
    return w, rtn(w, 3, 32).dequantize(), hessian(x)


def test_plain_lorc_is_the_truncated_svd_of_the_error(layer):
    w, q, _ = layer
    a, b = low_rank_compensation(w, q, 8)
    singular = np.linalg.svd(w - q, compute_uv=False)
    assert np.linalg.norm(w - q - a @ b) == pytest.approx(np.sqrt((singular[8:] ** 2).sum()), rel=1e-4)


def test_activation_aware_lorc_lowers_output_error_more_than_plain(layer):
    w, q, h = layer
    plain = q + np.matmul(*low_rank_compensation(w, q, 8))
    aware = q + np.matmul(*low_rank_compensation(w, q, 8, h))
    assert output_error(w, aware, h) < output_error(w, plain, h) < output_error(w, q, h)


def test_rank_is_checked_and_bytes_are_counted(layer):
    w, q, _ = layer
    with pytest.raises(ValueError, match="rank 0"):
        low_rank_compensation(w, q, 0)
    assert low_rank_bytes(96, 64, 8) == 8 * 160 * 4
