"""The redundancy maths against hand-computed values and brute force."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saescope import SaescopeError
from saescope.apps.redundancy.metrics import (
    FeatureSets,
    coverage_curves,
    kendall_tau,
    overlap,
    partial_corr,
    performance_curve,
    permutation_pvalue,
    r_hat,
    r_perf,
    size_matched_overlaps,
    spearman,
    symmetric_overlap,
)


def _sets(lists, d_sae=10):
    return FeatureSets.from_lists([np.array(x, dtype=np.int32) for x in lists], d_sae)


def test_coverage_of_a_hand_example():
    # prompts {0,1}, {1,2}, {3}: |F(D)| = 4. n=1: mean of 2,2,1 over 4 = 5/12; n=2: pairs give 3,3,3 -> 3/4; n=3: 1.
    fs = _sets([[0, 1], [1, 2], [3]])
    curves = coverage_curves(fs, n_repeats=3000, seed=0)
    assert np.allclose(curves.mean(0), [5 / 12, 3 / 4, 1.0], atol=0.01)
    assert r_hat(curves).mean() == pytest.approx((5 / 12 + 3 / 4 + 1) / 3, abs=0.01)
    assert np.all(curves[:, -1] == 1.0)


def test_identical_prompts_are_maximally_redundant():
    fs = _sets([[2, 5, 7]] * 6)
    assert np.all(coverage_curves(fs, n_repeats=5) == 1.0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 11), max_size=4), min_size=1, max_size=6))
def test_coverage_equals_brute_force_expectation_over_all_subsets(lists):
    fs = _sets(lists, 12)
    total = len(set().union(*map(set, lists)))
    if total == 0:
        return
    n = len(lists)
    exact = [np.mean([len(set().union(*(set(lists[i]) for i in s))) / total for s in itertools.combinations(range(n), m)])
             for m in range(1, n + 1)]
    # every order gives a non-decreasing curve ending at 1, and the average over many orders is the expectation
    curves = coverage_curves(fs, n_repeats=4000, seed=1)
    assert np.all(np.diff(curves, axis=1) >= 0) and np.allclose(curves[:, -1], 1.0)
    assert np.allclose(curves.mean(0), exact, atol=0.03)


def test_union_and_overlaps():
    a, b = _sets([[0, 1], [2]]), _sets([[1, 2, 3, 4, 5]])
    fa, fb = a.union(), b.union()
    assert overlap(fa, fb) == pytest.approx(2 / 3) and overlap(fb, fa) == pytest.approx(2 / 5)
    assert symmetric_overlap(fa, fb) == pytest.approx(2 / 3)
    assert a.union(np.array([1])).nonzero()[0].tolist() == [2]


def test_size_matched_overlap_removes_the_size_advantage():
    rng = np.random.default_rng(0)
    # both benchmarks draw prompts from the same distribution; B has 10x more prompts
    a = _sets([rng.choice(200, 5, replace=False) for _ in range(20)], 200)
    b = _sets([rng.choice(200, 5, replace=False) for _ in range(200)], 200)
    raw_a_in_b, raw_b_in_a = overlap(a.union(), b.union()), overlap(b.union(), a.union())
    m = size_matched_overlaps(a, b, n_repeats=30)
    assert raw_a_in_b > 0.9 and raw_b_in_a < 0.5  # raw: the small set looks "inside" the big one by size alone
    assert abs(m["a_in_b"].mean() - m["b_in_a"].mean()) < 0.05  # matched: symmetric, as the content is


def test_kendall_tau_b_hand_values():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert kendall_tau(x, x)[0] == pytest.approx(1.0)
    assert kendall_tau(x, -x)[0] == pytest.approx(-1.0)
    # one swapped pair of 6: (5 - 1) / 6
    assert kendall_tau(x, np.array([2.0, 1.0, 3.0, 4.0]))[0] == pytest.approx(4 / 6)
    # ties in y: concordant 5, discordant 0, 1 pair tied in y -> 5 / sqrt(6 * 5)
    assert kendall_tau(x, np.array([1.0, 1.0, 3.0, 4.0]))[0] == pytest.approx(5 / np.sqrt(30))
    assert np.isnan(kendall_tau(x, np.ones(4))[0])


def test_performance_curve_reaches_one_and_needs_three_models():
    rng = np.random.default_rng(0)
    skill = np.array([0.2, 0.5, 0.8, 0.9])
    correct = (rng.random((4, 300)) < skill[:, None]).astype(float)
    sizes, tau = performance_curve(correct, n_repeats=20)
    assert tau[:, -1] == pytest.approx(1.0)  # the full set ranks models as the full set does
    assert tau[:, :5].mean() < tau[:, 100:].mean()  # small subsets rank worse
    r = r_perf(sizes, tau)
    assert 0.5 < r.mean() < 1.0
    sub_sizes, sub_tau = performance_curve(correct, n_repeats=20, sizes=np.array([1, 50, 150, 300]))
    assert r_perf(sub_sizes, sub_tau).mean() == pytest.approx(r.mean(), abs=0.05)  # interpolated grid ~ full grid
    with pytest.raises(SaescopeError, match="at least 3 models"):
        performance_curve(correct[:2])


def test_spearman_partial_correlation_and_permutation_p():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, np.array([1.0, 1.0, 2.0, 2.0, 3.0])) == pytest.approx(0.9486832980505138)  # scipy's value
    rng = np.random.default_rng(0)
    z = rng.normal(size=500)
    a, b = z + 0.1 * rng.normal(size=500), z + 0.1 * rng.normal(size=500)
    assert spearman(a, b) > 0.9 and abs(partial_corr(a, b, z)) < 0.15  # all shared variance is z's
    assert permutation_pvalue(x, x, n_perm=2000) < 0.03  # 2/120 orders are as extreme
    assert permutation_pvalue(x, np.array([3.0, 1.0, 5.0, 2.0, 4.0]), n_perm=2000) > 0.3
    # a correlation that does not exist is NaN, never a confident number
    flat, holed = np.full(5, 0.5), np.array([1.0, np.nan, 0.0, 2.0, 3.0])
    assert np.isnan(spearman(flat, x)) and np.isnan(spearman(holed, x)) and np.isnan(permutation_pvalue(flat, x, n_perm=50))
