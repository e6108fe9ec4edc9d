"""Paired comparisons of arms (docs/EVALUATION.md §5), checked against independent computations."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from weighted_mtp.evaluation.compare import (
    bootstrap_interval,
    compare_arms,
    mcnemar,
    paired_bootstrap,
    verdict,
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
    assert rows["same"].verdict == "not distinguishable" and rows["same"].p_value == 1.0
    assert rows["sampled"].test == "paired bootstrap"
    assert rows["sampled"].problems == 40
    mean, low, high = bootstrap_interval([1.0, 0.0, 1.0, 1.0], resamples=500)
    assert mean == 0.75 and 0.0 <= low <= mean <= high <= 1.0
