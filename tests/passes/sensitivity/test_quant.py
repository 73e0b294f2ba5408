from __future__ import annotations

import numpy as np
import pytest

from bitpass.passes.sensitivity.quant import channel_axis, fake_quantize, quantization_error


def test_representable_weights_are_unchanged():
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.01, 1.0, size=(5, 1, 1, 1)).astype(np.float32)
    ints = rng.integers(-7, 8, size=(5, 3, 2, 2))
    ints[:, 0, 0, 0] = 7  # each channel reaches the top of the 4-bit grid
    w = (ints * scale).astype(np.float32)
    np.testing.assert_allclose(fake_quantize(w, 4), w, rtol=1e-6)
    assert quantization_error(w, 4) < 1e-10


def test_error_is_at_most_half_a_step_per_channel():
    w = np.random.default_rng(1).standard_normal((4, 50)).astype(np.float32)
    for bits in (2, 3, 4, 8):
        q = fake_quantize(w, bits, axis=0)
        step = np.abs(w).max(axis=1, keepdims=True) / (2 ** (bits - 1) - 1)
        assert np.all(np.abs(q - w) <= step / 2 + 1e-6)
        assert q.dtype == np.float32 and q.shape == w.shape
        assert len(np.unique(q[0])) <= 2 ** bits - 1


def test_two_bits_is_ternary_and_axis_matters():
    w = np.array([[1.0, -0.2, 0.6], [10.0, 4.0, -6.0]])
    np.testing.assert_allclose(fake_quantize(w, 2, axis=0), [[1, 0, 1], [10, 0, -10]])
    np.testing.assert_allclose(fake_quantize(w, 2, axis=None), [[0, 0, 0], [10, 0, -10]])
    np.testing.assert_allclose(fake_quantize(w, 2, axis=1), [[0, 0, 0], [10, 4, -6]])


def test_zero_channel_stays_zero_and_bad_bits_fail():
    w = np.zeros((2, 3), dtype=np.float16)
    assert np.all(fake_quantize(w, 4) == 0) and fake_quantize(w, 4).dtype == np.float16
    with pytest.raises(ValueError):
        fake_quantize(w, 1)


def test_channel_axes():
    assert channel_axis("Conv") == 0 and channel_axis("ConvTranspose") == 1
    assert channel_axis("Gemm", trans_b=True) == 0 and channel_axis("Gemm", trans_b=False) == 1
    assert channel_axis("MatMul") == 1 and channel_axis("Gather") == 0
