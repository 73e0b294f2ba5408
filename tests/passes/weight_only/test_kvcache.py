"""KV-cache quantization (per-channel keys, per-token values) inside the exported decode graph."""

from __future__ import annotations

import numpy as np
import pytest

from bitpass.backends.onnxruntime.generate import DecoderSession, generate, lm_fidelity
from bitpass.frontend.decoder import export_decoder
from bitpass.passes.weight_only.kvcache import cache_bytes, key_scales, packed_cache_bytes
from bitpass.tools import decoders

WINDOWS = np.random.default_rng(0).integers(32, 127, (8, 41))


@pytest.fixture(scope="module")
def sessions(tiny_gpt2_64):
    """Decoder sessions of one GPT-2 with a float, an int8 and an int4 cache (the float one: the session's export)."""
    float_model, float_spec = tiny_gpt2_64
    lm = float_model.torch_module
    scales = key_scales(lm, WINDOWS)
    exported = {bits: export_decoder(lm, kv_bits=bits, key_scales=scales if bits == 8 else key_scales(lm, WINDOWS, 4))
                for bits in (8, 4)}
    exported[32] = (float_model, float_spec)
    return {bits: DecoderSession.load(model, spec) for bits, (model, spec) in exported.items()}, scales


def test_key_scales_are_per_layer_head_and_channel_and_cover_the_calibration_keys(sessions):
    _, scales = sessions
    assert scales.shape == (2, 2, 32) and np.all(scales > 0)


def test_an_int8_cache_holds_about_a_quarter_of_the_float_bytes(sessions):
    by_bits, _ = sessions
    _, float_cache = by_bits[32].prefill(WINDOWS[:1, :40])
    _, int8_cache = by_bits[8].prefill(WINDOWS[:1, :40])
    assert int8_cache["past_key_values.0.key"].dtype == np.int8
    # codes 1 byte instead of 4, plus one fp32 value scale per token and head: (2*32 + 4) / (2*32*4)
    assert cache_bytes(int8_cache) / cache_bytes(float_cache) == pytest.approx(68 / 256)
    assert packed_cache_bytes(int8_cache, 4) < cache_bytes(int8_cache)


def test_old_entries_keep_their_codes_as_new_ones_are_appended(sessions):
    session = sessions[0][8]
    _, past = session.prefill(WINDOWS[:2, :20])
    _, after = session.forward(WINDOWS[:2, 20:21], past)
    for name, codes in past.items():
        np.testing.assert_array_equal(after[name][:, :, :20], codes)


def test_decoding_from_an_int8_cache_stays_close_and_int4_costs_more(sessions):
    by_bits, _ = sessions
    int8 = lm_fidelity(by_bits[8], by_bits[32], WINDOWS, batch=4, decode_after=8)
    int4 = lm_fidelity(by_bits[4], by_bits[32], WINDOWS, batch=4, decode_after=8)
    assert int8.tokens == 8 * 33
    assert int8.kl < 1e-3 and int8.top1_agreement > 0.97
    assert int4.kl > int8.kl
    np.testing.assert_array_equal(generate(by_bits[8], b"import os\n", 12), generate(by_bits[32], b"import os\n", 12))


def test_a_quantized_cache_needs_calibrated_key_scales():
    with pytest.raises(ValueError, match="needs key_scales"):
        export_decoder(decoders.tiny_gpt2(layers=1), kv_bits=8)
    with pytest.raises(ValueError, match="not offered"):
        export_decoder(decoders.tiny_gpt2(layers=1), kv_bits=6)
