"""The pruning benchmark's verdicts: a difference is a WIN or LOSS only where it is significant on the
same held-out samples (exact McNemar on accuracy, Wilcoxon on cosine)."""

from __future__ import annotations

import numpy as np

from bitpass.tools.bench_pruning import paired_verdict


def test_one_sample_out_of_497_is_a_tie():
    best = np.ones(497)
    mine = best.copy()
    mine[3] = 0
    assert paired_verdict(mine, best, binary=True)[0] == "TIE"


def test_identical_scores_are_an_exact_tie():
    scores = np.linspace(0.9, 1.0, 50)
    assert paired_verdict(scores, scores, binary=False) == ("TIE", 1.0)


def test_a_consistent_difference_is_significant_both_ways():
    best = np.zeros(497)
    mine = best.copy()
    mine[:20] = 1  # right on 20 samples the other gets wrong, wrong on none it gets right
    verdict, p = paired_verdict(mine, best, binary=True)
    assert verdict == "WIN" and p < 1e-5
    assert paired_verdict(best, mine, binary=True)[0] == "LOSS"
    rng = np.random.default_rng(0)
    base = rng.uniform(0.9, 1.0, 200)
    assert paired_verdict(base + 0.01, base, binary=False)[0] == "WIN"
    assert paired_verdict(base + rng.normal(0, 1e-3, 200), base, binary=False)[0] == "TIE"
