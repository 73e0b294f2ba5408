"""Greedy generation, LM fidelity per token, speed and memory of a KV-cache decoder in ONNX Runtime."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from onnx import numpy_helper

from bitpass.backends.onnxruntime import generate as gen
from bitpass.frontend import BitpassError, UsageError, from_proto
from bitpass.tools import decoders


@pytest.fixture(scope="module")
def exported(tiny_gpt2_64):
    """(transformers module, Model, spec): the session's tiny GPT-2 export (``tests/conftest.py``)."""
    model, spec = tiny_gpt2_64
    return model.torch_module, model, spec


@pytest.fixture(scope="module")
def decoder(exported):
    return gen.DecoderSession.load(exported[1])


@pytest.fixture(scope="module")
def windows():
    return np.random.default_rng(0).integers(32, 127, (6, 33))


def test_greedy_generation_with_the_cache_equals_recomputing_the_whole_sequence(exported, decoder):
    lm = exported[0]
    tokens = gen.generate(decoder, b"def main(", 10)
    ids = torch.tensor([list(b"def main(")])
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, lm(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    np.testing.assert_array_equal(tokens[0], ids[0, 9:].numpy())


def test_bits_per_byte_is_the_teacher_forced_cross_entropy_in_bits(exported, decoder, windows):
    assert gen.bits_per_byte(decoder, windows, batch=4) == pytest.approx(
        decoders.bits_per_byte(exported[0], windows), rel=1e-5)


def perturbed(model, scale: float):
    """The same graph with the lm_head weight multiplied by ``scale``."""
    proto = model.to_proto()
    head = model.layer("lm_head").weight.name
    for tensor in proto.graph.initializer:
        if tensor.name == head:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * scale, head))
    return from_proto(proto)


def test_fidelity_is_per_token_kl_and_per_token_agreement(exported, decoder, windows):
    _, model, _ = exported
    other = gen.DecoderSession.load(perturbed(model, 1.7))
    got = gen.lm_fidelity(other, decoder, windows, batch=4)
    p = np.concatenate([lp for lp in gen.teacher_forced(decoder, windows)])
    q = np.concatenate([lp for lp in gen.teacher_forced(other, windows)])
    per_token_kl = (np.exp(p) * (p - q)).sum(-1)
    assert got.tokens == windows[:, 1:].size == per_token_kl.size
    assert got.kl == pytest.approx(per_token_kl.mean(), rel=1e-9)
    assert got.top1_agreement == pytest.approx((p.argmax(-1) == q.argmax(-1)).mean())
    assert got.reference_bits_per_byte == pytest.approx(gen.bits_per_byte(decoder, windows))
    assert got.kl > 0 and got.bits_per_byte != got.reference_bits_per_byte


def test_a_model_is_perfectly_faithful_to_itself(decoder, windows):
    same = gen.lm_fidelity(decoder, decoder, windows)
    assert same.kl == 0.0 and same.top1_agreement == 1.0 and same.bits_per_byte_increase == 0.0


def test_decode_and_prefill_timings_are_measured(decoder):
    step = gen.decode_step_seconds(decoder, past_length=16, repeats=3)
    prefill = gen.prefill_seconds(decoder, length=16, repeats=2)
    assert 0 < step < 1 and 0 < prefill < 1 and math.isfinite(step + prefill)


def test_session_memory_is_measured_in_a_fresh_process(exported, tmp_path):
    _, model, spec = exported
    model.save(tmp_path / "model.onnx")
    memory = gen.session_memory(tmp_path / "model.onnx", spec)
    assert 0 < memory.loaded_rss <= memory.peak_rss


def test_a_sequence_past_the_position_limit_is_refused(decoder):
    with pytest.raises(UsageError, match="exceed the model's 128"):
        gen.generate(decoder, b"x" * 120, 20)


def test_a_graph_without_the_specs_inputs_is_refused(mlp_model, exported):
    with pytest.raises(BitpassError, match="not the decoder graph its spec describes"):
        gen.DecoderSession.load(mlp_model.to_bytes(), exported[2])
