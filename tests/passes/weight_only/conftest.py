"""Shared fixtures of the weight-only tests: a tiny GPT-2 decoder with calibration and held-out token windows."""

from __future__ import annotations

import numpy as np
import pytest

from bitpass.frontend import from_arrays
from bitpass.frontend.decoder import complete_lm_inputs


@pytest.fixture(scope="module")
def decoder(tiny_gpt2_64):
    """(model, spec, calibration Dataset, held-out feeds) of a 64-wide, 2-layer GPT-2 with a KV cache (exported
    once per session: ``tests/conftest.py``)."""
    model, spec = tiny_gpt2_64
    rng = np.random.default_rng(0)
    feeds, _ = complete_lm_inputs({"input_ids": rng.integers(0, 256, (12, 24))}, spec)
    calibration = from_arrays(feeds, model.inputs)
    feeds, _ = complete_lm_inputs({"input_ids": rng.integers(0, 256, (4, 24))}, spec)
    return model, spec, calibration, feeds
