"""Group-wise mixed widths (SliM-LLM style) under an average-bits budget."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bitpass.passes.weight_only.gptq import gptq, hessian
from bitpass.passes.weight_only.grid import output_error, rtn
from bitpass.passes.weight_only.mixed import allocate_widths, allocate_widths_greedy, mixed_quantize, slice_errors


def salient_layer(k: int = 256, n: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Input features whose scales span two orders of magnitude: some K-slices matter far more."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3000, k)) * rng.lognormal(0, 1.2, k)
    return rng.standard_normal((k, n)).astype(np.float32), hessian(x)


def brute_force(errors, widths, average):
    feasible = (c for c in itertools.product(range(len(widths)), repeat=len(errors))
                if sum(widths[j] for j in c) <= average * len(errors))
    return min(sum(errors[i, j] for i, j in enumerate(c)) for c in feasible)


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_optimal_on_small_problems_and_meets_the_budget(seed):
    rng = np.random.default_rng(seed)
    errors = -np.sort(-rng.random((6, 3)), axis=1)
    average = float(rng.uniform(2.5, 6.0))
    chosen = allocate_widths(errors, (2, 4, 8), average)
    assert chosen.sum() <= average * 6 + 1e-9
    got = sum(errors[i, (2, 4, 8).index(b)] for i, b in enumerate(chosen))
    assert got == pytest.approx(brute_force(errors, (2, 4, 8), average))


def test_greedy_allocation_meets_a_fractional_budget_with_sizes():
    rng = np.random.default_rng(0)
    errors = -np.sort(-rng.random((400, 4)), axis=1)
    sizes = rng.integers(1, 5, 400).astype(float)
    chosen = allocate_widths_greedy(errors, (2, 3, 4, 8), 3.5, sizes)
    assert (chosen * sizes).sum() <= 3.5 * sizes.sum() + 1e-9
    assert (chosen * sizes).sum() >= 3.4 * sizes.sum()


def test_the_most_salient_slices_get_the_wider_codes():
    w, h = salient_layer()
    chosen = allocate_widths(slice_errors(w, h, (2, 4, 8), 32), (2, 4, 8), 5.0)
    salience = np.array([np.trace(h[i * 32:(i + 1) * 32, i * 32:(i + 1) * 32]) for i in range(8)])
    assert sorted(chosen.tolist()) == [4, 4, 4, 4, 4, 4, 8, 8]
    assert set(np.flatnonzero(chosen == 8)) == set(np.argsort(-salience)[:2])


def test_mixed_widths_at_a_fractional_budget_beat_a_per_layer_mixture_of_three_and_four_bits():
    w, h = salient_layer(seed=1)
    mixed = mixed_quantize(w, h, 3.5, widths=(2, 3, 4, 8), group_size=32)
    assert mixed.average_bits == pytest.approx(3.5, abs=1e-9)
    halves = rtn(w, np.array([3, 3, 3, 3, 4, 4, 4, 4]), 32)  # same bytes, widths not chosen by salience
    uniform3 = gptq(w, h, 3, 32)
    assert output_error(w, mixed.dequantize(), h) < output_error(w, uniform3.dequantize(), h)
    assert output_error(w, mixed.dequantize(), h) < output_error(w, halves.dequantize(), h)


def test_a_budget_outside_the_widths_is_refused():
    with pytest.raises(ValueError, match="outside the widths"):
        allocate_widths(np.ones((4, 2)), (2, 4), 5.0)


def test_one_model_wide_budget_gives_the_sensitive_layer_more_bits():
    from bitpass.passes.weight_only.mixed import global_slice_widths

    quiet_w, quiet_h = salient_layer(seed=2)
    loud_w, loud_h = salient_layer(seed=3)
    chosen = global_slice_widths({"quiet": quiet_w, "loud": loud_w}, {"quiet": quiet_h, "loud": 100 * loud_h},
                                 (2, 4), 3.0)
    assert chosen["loud"].mean() > chosen["quiet"].mean()
    assert (chosen["loud"].sum() + chosen["quiet"].sum()) * 32 * 96 <= 3.0 * 2 * 256 * 96


@pytest.mark.parametrize("proxy", ["rtn", "gptq"])
def test_slice_errors_shrink_with_width_under_either_proxy(proxy):
    w, h = salient_layer(k=128, n=32)
    errors = slice_errors(w, h, (2, 4, 8), 32, proxy=proxy)
    assert errors.shape == (4, 3) and np.all(np.diff(errors, axis=1) < 0)


def test_layer_mixtures_widen_the_most_salient_slices_first_and_lower_the_measured_error():
    from bitpass.passes.weight_only.mixed import layer_mixtures, upgrade_order

    w, h = salient_layer(k=128, n=48)
    order = upgrade_order(w, h, 3, 4, 32)
    mixtures = layer_mixtures(w, h, 3, 4, steps=4, group_size=32)
    assert [bits for bits, _, _ in mixtures] == [3.0, 3.25, 3.5, 3.75, 4.0]
    assert mixtures[1][1].bits[order[0]] == 4 and int(np.sum(mixtures[1][1].bits == 4)) == 1
    errors = [error for _, _, error in mixtures]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    # the error is GPTQ's at exactly those widths, absolute (not relative to the layer's output)
    exact = gptq(w, h, mixtures[2][1].bits, 32)
    e = w.astype(np.float64) - exact.dequantize()
    assert errors[2] == pytest.approx(float(np.einsum("kn,kj,jn->", e, h, e)))


def test_two_level_widths_meet_the_average_and_do_no_worse_than_whole_layers_on_their_objective():
    from bitpass.passes.weight_only.mixed import hierarchical_widths

    layers = {f"l{i}": salient_layer(k=128, n=32, seed=i) for i in range(3)}
    weights = {i: w for i, (w, _) in layers.items()}
    hessians = {i: h for i, (_, h) in layers.items()}

    def summed_error(chosen):
        total = 0.0
        for i, q in chosen.items():
            e = weights[i].astype(np.float64) - q.dequantize()
            total += float(np.einsum("kn,kj,jn->", e, hessians[i], e))
        return total

    two_level = hierarchical_widths(weights, hessians, 3.5, 3, 4, steps=4)
    whole = hierarchical_widths(weights, hessians, 3.5, 3, 4, steps=1)
    size = sum(w.size for w in weights.values())
    for chosen in (two_level, whole):
        assert sum(np.mean(q.bits) * weights[i].size for i, q in chosen.items()) <= 3.5 * size + 1e-9
    assert all(set(np.unique(q.bits)) <= {3, 4} for q in whole.values())
    assert all(len(np.unique(q.bits)) == 1 for q in whole.values())
    # whole layers are among the two-level options (0 and 4 quarters), so its optimum is no worse
    assert summed_error(two_level) <= summed_error(whole) * (1 + 1e-9)


def test_a_score_in_place_of_the_layer_error_decides_which_layer_gets_the_wide_codes():
    from bitpass.passes.weight_only.mixed import hierarchical_widths

    layers = {f"l{i}": salient_layer(k=64, n=32, seed=i) for i in range(2)}
    weights = {i: w for i, (w, _) in layers.items()}
    hessians = {i: h for i, (_, h) in layers.items()}

    def only_l1_matters(layer_id, codes):  # as if l1's output errors reached the model's output and l0's did not
        return (100.0 if layer_id == "l1" else 1.0) * float(np.sum(codes.bits == 3))

    chosen = hierarchical_widths(weights, hessians, 3.5, 3, 4, steps=2, score=only_l1_matters)
    assert set(chosen["l1"].bits) == {4} and set(chosen["l0"].bits) == {3}


def test_a_layer_with_fewer_slices_than_steps_has_fewer_mixtures_and_still_takes_part():
    from bitpass.passes.weight_only.mixed import hierarchical_widths, layer_mixtures

    small, big = salient_layer(k=64, n=32, seed=1), salient_layer(k=256, n=32, seed=2)
    assert [bits for bits, _, _ in layer_mixtures(*small, 3, 4, steps=8)] == [3.0, 3.5, 4.0]
    chosen = hierarchical_widths({"small": small[0], "big": big[0]}, {"small": small[1], "big": big[1]}, 3.5, 3, 4,
                                 steps=8)
    total = sum(np.mean(chosen[i].bits) * w.size for i, w in (("small", small[0]), ("big", big[0])))
    assert total <= 3.5 * (small[0].size + big[0].size) + 1e-9


def test_two_level_widths_budget_the_bytes_matmulnbits_stores_a_mixed_layer_in():
    from bitpass.passes.weight_only.mixed import hierarchical_widths

    layers = {f"l{i}": salient_layer(k=128, n=32, seed=i) for i in range(3)}
    weights = {i: w for i, (w, _) in layers.items()}
    hessians = {i: h for i, (_, h) in layers.items()}
    midpoint = sum((gptq(w, hessians[i], 3, 32).nbytes() + gptq(w, hessians[i], 4, 32).nbytes()) / 2
                   for i, w in weights.items())
    chosen = hierarchical_widths(weights, hessians, 3.5, 3, 4, steps=4)
    assert sum(q.nbytes() for q in chosen.values()) <= midpoint
    by_bits = hierarchical_widths(weights, hessians, 3.5, 3, 4, steps=4, cost="bits")
    assert sum(np.mean(q.bits) * weights[i].size for i, q in by_bits.items()) <= 3.5 * sum(
        w.size for w in weights.values()) + 1e-9
