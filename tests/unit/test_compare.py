"""Paired comparisons of arms (docs/EVALUATION.md §5), checked against independent computations."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from weighted_mtp.evaluation.compare import (
    SIGN_FLIP_DRAWS,
    bootstrap_interval,
    compare_arms,
    default_contrasts,
    detectable_difference,
    holm,
    holm_adjust,
    mcnemar,
    paired_bootstrap,
    sign_flip_interval,
    sign_flip_test,
    verdict,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("arm", "base"),
    [
        ([1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 0, 1], [0, 1, 0, 0, 1, 0, 0, 1, 1, 0, 0, 1]),
        ([1, 0] * 20, [0, 1] * 20),
        ([1] * 30 + [0] * 10, [1] * 22 + [0] * 18),
    ],
)
def test_mcnemar_matches_scipys_exact_binomial_test(arm: list[int], base: list[int]) -> None:
    stats = pytest.importorskip("scipy.stats")
    only_arm, only_base, p = mcnemar([bool(x) for x in arm], [bool(x) for x in base])
    assert only_arm == sum(1 for x, y in zip(arm, base, strict=True) if x and not y)
    assert only_base == sum(1 for x, y in zip(arm, base, strict=True) if y and not x)
    expected = stats.binomtest(only_arm, only_arm + only_base, 0.5).pvalue
    assert p == pytest.approx(expected, rel=1e-12)


def test_paired_bootstrap_matches_a_plain_loop_with_the_same_draws() -> None:
    """The vectorised resampling against a brute-force loop over the same index draws."""
    rng = random.Random(3)
    arm = [rng.random() for _ in range(25)]
    base = [min(1.0, x + rng.uniform(-0.3, 0.1)) for x in arm]
    diff, low, high, p = paired_bootstrap(arm, base, resamples=2000, seed=11)
    draws = np.random.default_rng(11).integers(0, 25, size=(2000, 25))
    means = sorted(sum(arm[i] - base[i] for i in row) / 25 for row in draws)
    observed = sum(a - b for a, b in zip(arm, base, strict=True)) / 25
    assert diff == pytest.approx(observed)
    # numpy's default quantile: linear interpolation between order statistics
    for q, got in ((0.025, low), (0.975, high)):
        pos = q * (len(means) - 1)
        lo, frac = math.floor(pos), pos - math.floor(pos)
        assert got == pytest.approx(means[lo] + frac * (means[lo + 1] - means[lo]))
    far = sum(m <= 0 for m in means) if observed > 0 else sum(m >= 0 for m in means)
    assert p == pytest.approx(min(1.0, 2 * far / len(means)))


def test_paired_bootstrap_interval_agrees_with_scipys_bootstrap() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    base = rng.uniform(0, 1, 60)
    arm = np.clip(base + rng.normal(0.08, 0.2, 60), 0, 1)
    _, low, high, _ = paired_bootstrap(arm, base, resamples=20_000, seed=1)
    ref = stats.bootstrap(
        (arm - base,), np.mean, n_resamples=20_000, confidence_level=0.95,
        method="percentile", random_state=2,
    ).confidence_interval  # fmt: skip
    assert low == pytest.approx(ref.low, abs=0.006)
    assert high == pytest.approx(ref.high, abs=0.006)


def test_verdicts() -> None:
    assert verdict(0.1, 0.01) == "better"
    assert verdict(-0.1, 0.01) == "worse"
    assert verdict(0.1, 0.2) == "not distinguishable"
    assert verdict(0.0, 0.0) == "not distinguishable"


def test_compare_arms_pairs_by_problem_and_picks_the_test() -> None:
    tasks = [f"t{i}" for i in range(40)]
    base = {t: [i % 4 == 0] for i, t in enumerate(tasks)}
    better = {t: [True] for t in tasks}
    same = dict(base)
    sampled = {t: [True, i % 2 == 0, False] for i, t in enumerate(tasks)}
    rows = {r.arm: r for r in compare_arms(
        {"baseline": base, "better": better, "same": same, "sampled": sampled}, "baseline"
    )}  # fmt: skip
    assert rows["better"].test == "McNemar (exact)" and rows["better"].verdict == "better"
    assert rows["better"].difference == pytest.approx(0.75)
    assert (rows["better"].arm_better, rows["better"].baseline_better) == (30, 0)
    assert rows["same"].verdict == "not distinguishable" and rows["same"].p_value == 1.0
    assert rows["same"].p_adjusted == 1.0 and rows["same"].detectable is None
    assert rows["sampled"].test == "sign-flip (100,000 random patterns)"  # 40 non-zero problems
    assert rows["sampled"].problems == rows["sampled"].clusters == 40
    mean, low, high = bootstrap_interval([1.0, 0.0, 1.0, 1.0], resamples=500)
    assert mean == 0.75 and 0.0 <= low <= mean <= high <= 1.0


# ---- the paired sign-flip test, Holm, the detectable difference, Wilson ----


def test_four_of_a_hundred_gained_in_one_seed_of_two_is_not_distinguishable() -> None:
    """The issue's case: 4 of 100 problems pass in one of two seeds of the arm, never in the
    baseline, every other problem tied. The bootstrap called it "better" (p ~ 0.03); the exact
    sign-flip test gives 2 / 2^4 = 0.125."""
    stats = pytest.importorskip("scipy.stats")
    tasks = [f"t{i:03d}" for i in range(100)]
    base = {t: [False, False] for t in tasks}
    arm = {t: [i < 4, False] for i, t in enumerate(tasks)}
    scores = [sum(arm[t]) / 2 for t in tasks]
    assert paired_bootstrap(scores, [0.0] * 100)[3] < 0.05  # what the old verdict rested on
    (row,) = compare_arms({"baseline": base, "arm": arm}, "baseline")
    assert row.p_value == 0.125 == stats.binomtest(4, 4, 0.5).pvalue
    assert row.p_adjusted == 0.125 and row.test == "sign-flip (exact)"
    assert row.verdict == "not distinguishable"
    assert (row.arm_better, row.baseline_better) == (4, 0)
    assert (row.problems_arm_better, row.problems_baseline_better) == (4, 0)
    assert row.difference == pytest.approx(0.02) and row.low <= 0 <= row.high
    # the detectable difference by hand: sd of 4 x 0.5 and 96 x 0 (ddof 1), over sqrt(100)
    sd = math.sqrt((4 * (0.5 - 0.02) ** 2 + 96 * 0.02**2) / 99)
    expected = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * sd / 10
    assert row.detectable == pytest.approx(expected, rel=1e-9)
    assert row.statement == (
        f"not distinguishable; this study could see a difference of {expected:.2f} or more"
    )


def _scipy_sign_flip(stats, values: list[float], **kwargs) -> float:
    """SciPy's paired permutation test (each pair's two members swapped = a sign flip)."""
    x = np.asarray(values, dtype=np.float64)
    return stats.permutation_test(
        (x, np.zeros_like(x)), lambda a, b, axis: np.mean(a - b, axis=axis), vectorized=True,
        permutation_type="samples", alternative="two-sided", **kwargs,
    ).pvalue  # fmt: skip


@pytest.mark.parametrize(
    "values",
    [
        [0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, -1, 0, 0],
        [1 / 3, 2 / 3, -1 / 3, 1, 1 / 3, 0, 2 / 3, -2 / 3, 1 / 3, 1 / 3, 0.5, -0.1],
        [0.2, -0.1, 0.05, 0.3, 0.15, -0.05, 0.1, 0.1, 0.4, -0.2, 0.25],
        [0.1, 0.0],
    ],
)
def test_sign_flip_test_matches_scipys_exact_permutation_test(values: list[float]) -> None:
    stats = pytest.importorskip("scipy.stats")
    p, exact = sign_flip_test(values)
    assert exact
    assert p == pytest.approx(_scipy_sign_flip(stats, values), rel=1e-12)


def test_sign_flip_test_samples_patterns_past_twenty_clusters() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    values = list(np.round(rng.normal(0.04, 0.2, 30), 3))
    p, exact = sign_flip_test(values)
    assert not exact and p == sign_flip_test(values)[0]  # fixed seed: reproducible
    assert p >= 1 / (SIGN_FLIP_DRAWS + 1)
    reference = _scipy_sign_flip(stats, values, n_resamples=200_000, random_state=9)
    assert p == pytest.approx(reference, abs=0.006)  # two Monte Carlo estimates, s.e. ~0.002
    strong = [0.3, 0.1] * 13  # 26 clusters, every one gained: the draws' floor
    assert sign_flip_test(strong) == (pytest.approx(1 / (SIGN_FLIP_DRAWS + 1)), False)


@pytest.mark.parametrize(("positive", "m"), [(25, 25), (18, 30), (15, 30), (3, 41), (260, 500)])
def test_differences_of_one_size_are_the_exact_binomial_tail_at_any_count(
    positive: int, m: int
) -> None:
    """m differences of one size (+-0.25: a gain or loss of 5 of 20 samples), ``positive`` of
    them above 0, plus zeros: the sign-flip null of their sum is Binomial(m, 1/2), so the
    p-value is exact past ``EXACT_LIMIT`` too (SciPy's binomtest)."""
    stats = pytest.importorskip("scipy.stats")
    values = [0.25] * positive + [-0.25] * (m - positive) + [0.0] * 7
    p, exact = sign_flip_test(values)
    assert exact
    assert p == pytest.approx(stats.binomtest(positive, m, 0.5).pvalue, rel=1e-9)


def _brute_p(values: list[float], delta: float) -> float:
    """Every sign pattern of ``values - delta`` by itertools: the two-sided p-value."""
    shifted = [v - delta for v in values]
    observed = abs(sum(shifted))
    patterns = list(itertools.product((1, -1), repeat=len(shifted)))
    hits = sum(abs(sum(s * v for s, v in zip(signs, shifted, strict=True))) >= observed - 1e-9
               for signs in patterns)  # fmt: skip
    return hits / len(patterns)


def test_sign_flip_interval_is_the_inverted_test() -> None:
    values = [0.5, 0.0, 0.25, 1.0, 0.5, -0.25, 0.75, 0.0, 0.5, 0.25]
    low, high = sign_flip_interval(values)
    assert -1 < low < np.mean(values) < high < 1
    assert _brute_p(values, low + 1e-6) >= 0.05 and _brute_p(values, low - 1e-6) < 0.05
    assert _brute_p(values, high - 1e-6) >= 0.05 and _brute_p(values, high + 1e-6) < 0.05
    assert low > 0 and sign_flip_test(values)[0] < 0.05  # excludes 0 exactly when p < 0.05
    # five clusters can never reach p < 0.05 (2 / 2^5): the interval is every difference
    assert sign_flip_interval([0.2, 0.3, 0.1, 0.4, 0.2]) == (-1.0, 1.0)


def _holm_step_down(p_values: list[float], alpha: float) -> set[int]:
    """Holm's procedure as written: reject the smallest while p_(j) <= alpha / (m - j)."""
    m, rejected = len(p_values), set()
    for j, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        if p_values[i] > alpha / (m - j):
            break
        rejected.add(i)
    return rejected


@pytest.mark.parametrize(
    "p_values",
    [[0.01, 0.04, 0.03, 0.005], [0.2], [0.001, 0.001, 0.5, 0.02, 0.3, 0.011, 0.049, 0.6, 1.0],
     [0.03125, 1.0]],
)  # fmt: skip
def test_holm_adjusted_p_values_reject_what_the_step_down_procedure_rejects(
    p_values: list[float],
) -> None:
    adjusted = holm(p_values)
    assert all(p <= a <= 1 for p, a in zip(p_values, adjusted, strict=True))
    # every level below 1 (at 1 the cap makes every adjusted p 'reject')
    levels = sorted({a for a in adjusted if a < 1} | {0.001, 0.01, 0.05, 0.1, 0.5, 0.999})
    for alpha in levels + [x * (1 - 1e-9) for x in levels]:
        assert {i for i, a in enumerate(adjusted) if a <= alpha} == _holm_step_down(p_values, alpha)


def test_holm_by_hand() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_verdicts_use_the_holm_adjusted_p_value() -> None:
    """Six of ten problems gained (one seed): p = 2 / 64 = 0.031 alone is "better"; beside a
    second contrast with p = 1, Holm doubles it to 0.0625: "not distinguishable"."""
    tasks = [f"t{i}" for i in range(10)]
    base = {t: [False] for t in tasks}
    arm = {t: [i < 6] for i, t in enumerate(tasks)}
    alone = compare_arms({"baseline": base, "arm": arm}, "baseline")
    assert alone[0].p_value == pytest.approx(2 / 64) and alone[0].verdict == "better"
    assert alone[0].statement == "better (adjusted p 0.0312)"
    both = compare_arms({"baseline": base, "arm": arm, "same": dict(base)}, "baseline")
    assert both[0].p_value == pytest.approx(2 / 64) and both[0].p_adjusted == pytest.approx(2 / 32)
    assert both[0].verdict == "not distinguishable"


def test_clusters_are_the_unit_and_seeds_average_inside_them() -> None:
    stats = pytest.importorskip("scipy.stats")
    # 12 problems in 4 clusters of 3, two seeds each
    rng = np.random.default_rng(8)
    tasks = [f"t{i:02d}" for i in range(12)]
    clusters = {t: f"c{i // 3}" for i, t in enumerate(tasks)}
    arm = {t: [bool(x) for x in rng.random(2) < 0.7] for t in tasks}
    base = {t: [bool(x) for x in rng.random(2) < 0.4] for t in tasks}
    (row,) = compare_arms({"b": base, "a": arm}, "b", clusters=clusters)
    by_hand = [
        np.mean([(sum(arm[t]) - sum(base[t])) / 2 for t in tasks if clusters[t] == c])
        for c in ("c0", "c1", "c2", "c3")
    ]
    assert row.clusters == 4 and row.problems == 12 and row.test == "sign-flip (exact)"
    assert row.p_value == pytest.approx(_scipy_sign_flip(stats, by_hand), rel=1e-12)
    assert row.arm_better == sum(d > 0 for d in by_hand)
    assert row.baseline_better == sum(d < 0 for d in by_hand)
    assert row.statement == "not distinguishable; with 4 clusters no result can reach p < 0.05"
    # one sample per problem but several problems per cluster: not McNemar
    (one,) = compare_arms({"b": {t: v[:1] for t, v in base.items()},
                           "a": {t: v[:1] for t, v in arm.items()}}, "b", clusters=clusters)  # fmt: skip
    assert one.test == "sign-flip (exact)"


def test_contrasts_default_to_the_baseline_and_each_weightings_shuffled_control() -> None:
    arms = {
        "baseline": ("baseline", "none"), "ntp": ("ntp", "none"),
        "verifiable": ("verifiable", "none"), "verifiable_shuffled": ("verifiable", "shuffled"),
        "verifiable_random_matched": ("verifiable", "random_matched"),
        "rho1": ("rho1", "none"), "rho1_shuffled": ("rho1", "shuffled"),
    }  # fmt: skip
    pairs = default_contrasts(arms, "baseline")
    assert pairs == [(a, "baseline") for a in arms if a != "baseline"] + [
        ("verifiable", "verifiable_shuffled"), ("rho1", "rho1_shuffled"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no results of arm 'nope'"):
        compare_arms({"baseline": {"t": [True]}}, "baseline", [("nope", "baseline")])


def test_detectable_difference_is_the_normal_power_formula() -> None:
    stats = pytest.importorskip("scipy.stats")
    values = [0.1, -0.2, 0.3, 0.0, 0.05, 0.2, -0.1, 0.15]
    expected = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * np.std(values, ddof=1) / math.sqrt(8)
    assert detectable_difference(values) == pytest.approx(expected, rel=1e-9)
    assert detectable_difference([0.0] * 10) is None and detectable_difference([0.3]) is None


@pytest.mark.parametrize(("k", "n"), [(0, 10), (10, 10), (3, 40), (57, 100), (1, 1), (99, 100)])
def test_wilson_interval_matches_scipy_and_stays_in_the_unit_interval(k: int, n: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(ref.low, abs=1e-12) and high == pytest.approx(ref.high, abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0
    fractional = wilson_interval(k / 2, n)  # a mean over two seeds
    assert 0.0 <= fractional[0] <= k / 2 / n <= fractional[1] <= 1.0
    with pytest.raises(ValueError):
        wilson_interval(n + 1, n)


def test_one_sample_per_problem_the_sign_flip_test_is_mcnemars() -> None:
    arm = [True] * 9 + [False] * 3 + [True] * 5
    base = [False] * 9 + [True] * 3 + [True] * 5
    assert sign_flip_test([x - y for x, y in zip(arm, base, strict=True)])[0] == pytest.approx(
        mcnemar(arm, base)[2], rel=1e-12
    )


# ---- estimated pass rates (n samples per problem) ----


def test_compare_arms_takes_per_seed_pass_rates_and_matches_scipy() -> None:
    """Each problem's values are per-seed pass rates (passes of 20 samples / 20): the p-value
    is SciPy's exact paired permutation test on the per-problem means over seeds."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(21)
    tasks = [f"t{i}" for i in range(12)]
    base = {t: [float(x) / 20 for x in rng.binomial(20, 0.4, 2)] for t in tasks}
    arm = {t: [float(x) / 20 for x in rng.binomial(20, 0.55, 2)] for t in tasks}
    (row,) = compare_arms({"b": base, "a": arm}, "b")
    per_problem = [np.mean(arm[t]) - np.mean(base[t]) for t in tasks]
    ref = stats.permutation_test(
        (np.asarray(per_problem), np.zeros(12)), lambda x, y, axis: np.mean(x - y, axis=axis),
        vectorized=True, permutation_type="samples", alternative="two-sided", n_resamples=np.inf,
    ).pvalue  # fmt: skip
    assert row.test == "sign-flip (exact)" and row.p_value == pytest.approx(ref, rel=1e-9)
    assert row.difference == pytest.approx(np.mean(per_problem), abs=1e-12)
    assert row.cluster_difference == pytest.approx(row.difference, abs=1e-12)
    expected = detectable_difference(per_problem)
    assert expected is not None and row.detectable == pytest.approx(expected)
    assert row.low <= row.difference <= row.high


def test_mcnemar_needs_pass_fail_and_rates_stay_in_the_unit_interval() -> None:
    tasks = [f"t{i}" for i in range(30)]
    flags = {"b": {t: [False] for t in tasks}, "a": {t: [i < 25] for i, t in enumerate(tasks)}}
    (mc,) = compare_arms(flags, "b")
    assert mc.test == "McNemar (exact)"
    # the same numbers as rates of several samples: no 2 x 2 table, the same exact p-value
    rates = {arm: {t: [float(v[0])] for t, v in by.items()} for arm, by in flags.items()}
    (sf,) = compare_arms(rates, "b")
    assert sf.test == "sign-flip (exact)" and sf.p_value == pytest.approx(mc.p_value, rel=1e-12)
    with pytest.raises(ValueError, match="pass rate outside"):
        compare_arms({"b": {"t": [0.5]}, "a": {"t": [1.5]}}, "b")


def test_holm_adjust_over_comparisons_made_apart_equals_one_call() -> None:
    """Two datasets compared in two calls, then adjusted together, give what one call over all
    contrasts gives: Holm over the union (the study's family is contrasts x datasets)."""
    rng = np.random.default_rng(5)
    tasks = [f"t{i}" for i in range(16)]
    data = {arm: {t: [bool(x) for x in rng.random(2) < p] for t in tasks}
            for arm, p in (("b", 0.3), ("a", 0.7), ("c", 0.35))}  # fmt: skip
    first = compare_arms(data, "b", [("a", "b")])
    second = compare_arms(data, "b", [("c", "b"), ("a", "c")])
    together = holm_adjust([*first, *second])
    once = compare_arms(data, "b", [("a", "b"), ("c", "b"), ("a", "c")])
    assert together == once
    assert [r.p_adjusted for r in together] == pytest.approx(
        holm([r.p_value for r in [*first, *second]])
    )
    assert first[0].p_adjusted == first[0].p_value <= together[0].p_adjusted
