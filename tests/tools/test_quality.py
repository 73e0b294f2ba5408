"""The quality gate's parts: tolerances as users write them, output kinds, the repair search."""

from __future__ import annotations

import numpy as np
import pytest

from bitpass.frontend import from_arrays
from bitpass.frontend.errors import UsageError
from bitpass.frontend.model import TensorSpec
from bitpass.tools import quality
from bitpass.tools.quality import Search, Tolerance, parse_tolerance


@pytest.mark.parametrize("text, metric, threshold", [
    ("accuracy-drop=1", "accuracy-drop", 1.0), ("agreement=99%", "agreement", 0.99),
    ("cosine=0.995", "cosine", 0.995), ("Cosine = 0.9", "cosine", 0.9)])
def test_tolerances_are_written_as_metric_equals_value(text, metric, threshold):
    assert parse_tolerance(text) == Tolerance(metric, pytest.approx(threshold))


@pytest.mark.parametrize("text", ["cosine", "speed=2", "cosine=high", "agreement=150%", "accuracy-drop=-1"])
def test_a_malformed_tolerance_is_a_usage_error(text):
    with pytest.raises(UsageError, match="--tolerance"):
        parse_tolerance(text)


def test_accuracy_drop_is_an_upper_bound_and_the_others_lower_bounds():
    assert Tolerance("accuracy-drop", 1.0).met(0.8) and not Tolerance("accuracy-drop", 1.0).met(1.2)
    assert Tolerance("cosine", 0.99).met(0.995) and not Tolerance("cosine", 0.99).met(0.5)
    assert not Tolerance("cosine", 0.99).met(float("nan"))


def test_output_kinds():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 10))
    unit = logits / np.linalg.norm(logits, axis=1, keepdims=True)
    assert quality.output_kind([logits], ["out"], np.zeros(8, np.int64)) == "classification"
    assert quality.output_kind([logits], ["logits"], None) == "logits"
    assert quality.output_kind([logits], ["output"], None) == "embedding"  # unknown meaning: compared by cosine
    assert quality.output_kind([unit], ["sentence_embedding"], None) == "embedding"
    assert quality.output_kind([rng.standard_normal((8, 4, 64))], ["last_hidden_state"], None) == "embedding"
    # logits with a sequence axis are a language model's: per-token KL (issue #14), labels per token
    assert quality.output_kind([rng.standard_normal((8, 4, 64))], ["logits"], None) == "lm"
    assert quality.output_kind([rng.standard_normal((8, 4, 64))], ["logits"], np.zeros((8, 4), np.int64)) == "lm"


def test_agreement_is_per_position_for_sequence_logits():
    reference = np.zeros((2, 4, 5))
    reference[..., 0] = 1.0
    candidate = reference.copy()
    candidate[0, 0, 3] = 2.0  # one token of eight changes its argmax
    assert quality.agreement(reference, candidate) == pytest.approx(7 / 8)


def test_tied_reference_maxima_count_as_agreement():
    zero = np.zeros((3, 4))
    assert quality.agreement(zero, np.eye(3, 4) * 1e-7) == 1.0  # dead outputs: any class agrees
    assert quality.agreement(np.eye(3, 4), np.eye(3, 4)[[1, 1, 2]]) == pytest.approx(2 / 3)
    near = np.array([[1.0, 0.9995, -1.0], [1.0, 0.99, -1.0]])  # a gap of 0.025 % and 0.5 % of the score range
    assert quality.agreement(near, near[:, [1, 0, 2]]) == pytest.approx(1 / 2)


def test_hold_back_keeps_the_tail_of_a_calibration_set_for_the_gate():
    data = from_arrays({"x": np.arange(50, dtype=np.float32)[:, None]}, [TensorSpec("x", (None, 1), np.dtype("float32"))])
    calibrate, held = quality.hold_back(data)
    assert len(calibrate) == 40 and len(held) == 10
    assert held.inputs["x"][0, 0] == 40 and calibrate.sha256 != data.sha256
    small = from_arrays({"x": np.ones((5, 1), np.float32)}, [TensorSpec("x", (None, 1), np.dtype("float32"))])
    assert quality.hold_back(small) == (small, None)


@pytest.mark.parametrize("needed, expected_tries", [(1, [1]), (3, [1, 2, 4, 3]), (5, [1, 2, 4, 8, 6, 5]),
                                                    (10, [1, 2, 4, 8, 10, 9])])
def test_search_finds_the_fewest_layers_with_few_rebuilds(needed, expected_tries):
    tried = []

    def evaluate(k: int) -> float:
        tried.append(k)
        return 1.0 if k >= needed else 0.5

    search = Search([f"l{i}" for i in range(10)], Tolerance("cosine", 0.99), evaluate)
    assert search.run() == needed
    assert tried == expected_tries
    assert search.steps[-1]["fp32_layers"] == [f"l{i}" for i in range(tried[-1])]


def test_search_gives_up_after_every_layer():
    search = Search(["a", "b", "c"], Tolerance("cosine", 0.99), lambda k: 0.5)
    assert search.run() is None and [len(s["fp32_layers"]) for s in search.steps] == [1, 2, 3]


@pytest.mark.parametrize("tolerance, samples, units, needed", [
    ("agreement=0.99", 12, None, 100),  # one disagreement in 12 is 8.3 %: 99 % cannot be told from 92 %
    ("agreement=0.99", 64, None, 100),
    ("accuracy-drop=1", 50, None, 100),  # one sample is 2 points of accuracy
    ("cosine=0.99", 12, None, 32),  # a lowest cosine over 12 samples says little about the next input
    ("kl=0.03", 8, 8 * 64, 32),  # 512 positions, but from 8 windows
    ("agreement=0.99", 12, 12 * 16, 32),  # per-token agreement: positions resolve 1 %, the samples are too few
])
def test_a_gate_on_too_few_samples_says_so_in_one_line(tolerance, samples, units, needed):
    warning = quality.too_few_samples(parse_tolerance(tolerance), samples, units)
    assert warning is not None and "\n" not in warning
    assert warning.startswith("quality gate measured on ") and "too few to resolve" in warning
    assert parse_tolerance(tolerance).describe() in warning
    assert warning.endswith(f"pass --eval with at least {needed} held-out samples")


@pytest.mark.parametrize("tolerance, samples, units", [
    ("agreement=0.99", 128, None), ("accuracy-drop=1", 100, None), ("cosine=0.99", 32, None),
    ("kl=0.03", 32, 32 * 16, ), ("agreement=0.99", 40, 40 * 4), ("agreement=0.9", 32, None),
    ("accuracy-drop=5", 32, None), ("agreement=1.0", 32, None)])
def test_a_gate_on_enough_samples_says_nothing(tolerance, samples, units):
    assert quality.too_few_samples(parse_tolerance(tolerance), samples, units) is None


def test_samples_needed_follows_the_tolerance():
    assert quality.samples_needed(Tolerance("agreement", 0.99)) == 100
    assert quality.samples_needed(Tolerance("agreement", 0.995)) == 200
    assert quality.samples_needed(Tolerance("accuracy-drop", 0.5)) == 200
    assert quality.samples_needed(Tolerance("agreement", 0.9)) == quality.MIN_GATE_SAMPLES
    assert quality.samples_needed(Tolerance("cosine", 0.999)) == quality.MIN_GATE_SAMPLES


def test_gate_units_count_what_the_metric_averages_over():
    sequence_logits, hidden = np.zeros((4, 6, 10)), np.zeros((4, 6, 8))
    mask = np.ones((4, 6), bool)
    mask[:, 4:] = False
    assert quality.gate_units(Tolerance("agreement", 0.99), sequence_logits, None) == 24
    assert quality.gate_units(Tolerance("kl", 0.03), sequence_logits, None) == 24
    assert quality.gate_units(Tolerance("cosine", 0.99), hidden, None, mask) == 16
    assert quality.gate_units(Tolerance("cosine", 0.99), hidden, None) == 4
    assert quality.gate_units(Tolerance("agreement", 0.99), np.zeros((4, 10)), None) == 4


def test_the_cosine_of_hidden_states_is_per_real_token_with_an_attention_mask():
    """One token of 24 ruined: a per-sample cosine over the flattened sequence hides it, a per-token one does not;
    padded positions carry no meaning and are left out."""
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((4, 8, 16))
    mask = np.ones((4, 8), np.int64)
    mask[:, 6:] = 0
    candidate = hidden.copy()
    candidate[0, 2] = rng.standard_normal(16)  # a real token, unrelated to fp32
    candidate[:, 6:] = rng.standard_normal((4, 2, 16))  # padding: anything
    found = quality.token_mask({"input_ids": mask, "attention_mask": mask}, hidden)
    assert found is not None and found.dtype == bool and found.sum() == 24
    per_token = quality.score(Tolerance("cosine", 0.99), [hidden], [candidate], None, found)
    per_sample = quality.score(Tolerance("cosine", 0.99), [hidden], [candidate], None)
    assert per_token < 0.5 < per_sample < 0.9
    clean = candidate.copy()
    clean[0, 2] = hidden[0, 2]
    assert quality.score(Tolerance("cosine", 0.99), [hidden], [clean], None, found) == pytest.approx(1.0)


def test_token_mask_is_only_for_hidden_states_of_the_masked_batch():
    mask = np.ones((4, 8), np.int64)
    assert quality.token_mask({"attention_mask": mask}, np.zeros((4, 16))) is None  # pooled: per sample
    assert quality.token_mask({"attention_mask": mask}, np.zeros((4, 7, 16))) is None  # another sequence axis
    assert quality.token_mask({"input_ids": mask}, np.zeros((4, 8, 16))) is None
