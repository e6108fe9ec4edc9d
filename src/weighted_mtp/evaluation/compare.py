"""Comparing two arms of an experiment on the same problems (docs/EVALUATION.md §5).

Every arm of a study is scored on the same problems, so arms are compared *paired*: per
problem, not as two independent means. Two tests, one for each kind of outcome:

* ``paired_bootstrap``: per-problem scores (the fraction of a problem's samples that pass, an
  unbiased pass@1 estimate) of arm and baseline; problems are resampled with replacement and
  the mean difference is recomputed; the 95% interval is the 2.5th-97.5th percentile of those
  differences.
* ``mcnemar``: per-problem pass/fail of one sample each (greedy decoding); the exact two-sided
  binomial test on the discordant problems (passed by one arm only).

``verdict`` turns a test into "better", "worse" or "not distinguishable".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Comparison:
    """One arm against the baseline on the problems both were scored on."""

    arm: str
    baseline: str
    problems: int
    mean_arm: float
    mean_baseline: float
    difference: float  # arm - baseline
    low: float  # the interval of the difference
    high: float
    p_value: float
    test: str  # "paired bootstrap" or "McNemar (exact)"
    verdict: str


def bootstrap_interval(
    scores: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-problem scores and its percentile interval."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no problems to average")
    _, low, high = _resampled_means(values, resamples, seed)
    return float(values.mean()), low, high


def _resampled_means(
    values: np.ndarray, resamples: int, seed: int
) -> tuple[np.ndarray, float, float]:
    """The means of ``resamples`` draws of ``values`` with replacement (numpy's PCG64 seeded
    with ``seed``) and their percentile interval."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, values.size, size=(resamples, values.size))
    means = values[index].mean(axis=1)
    low, high = np.quantile(means, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return means, float(low), float(high)


def paired_bootstrap(
    arm: Sequence[float],
    baseline: Sequence[float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float, float]:
    """(difference, low, high, p): the mean per-problem difference arm - baseline, its
    percentile interval, and a two-sided p-value (twice the share of resampled differences on
    the far side of zero, at most 1)."""
    a = np.asarray(arm, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired scores need the same, non-zero number of problems")
    diff = a - b
    means, low, high = _resampled_means(diff, resamples, seed)
    observed = float(diff.mean())
    if observed == 0 and not diff.any():
        return 0.0, 0.0, 0.0, 1.0
    tail = np.mean(means <= 0) if observed > 0 else np.mean(means >= 0)
    return observed, low, high, float(min(1.0, 2 * tail))


def mcnemar(arm: Sequence[bool], baseline: Sequence[bool]) -> tuple[int, int, float]:
    """(only_arm, only_baseline, p): the discordant counts and the exact two-sided p-value
    of McNemar's test (binomial with p = 1/2 on the discordant problems)."""
    if len(arm) != len(baseline):
        raise ValueError("paired outcomes need the same number of problems")
    only_arm = sum(1 for x, y in zip(arm, baseline, strict=True) if x and not y)
    only_base = sum(1 for x, y in zip(arm, baseline, strict=True) if y and not x)
    n = only_arm + only_base
    if n == 0:
        return 0, 0, 1.0
    k = min(only_arm, only_base)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return only_arm, only_base, min(1.0, 2 * tail)


def verdict(difference: float, p_value: float) -> str:
    """ "better" or "worse" (by the sign of arm - baseline) when the test rejects equality at
    the 95% level, else "not distinguishable"."""
    if p_value < 1 - CONFIDENCE and difference != 0:
        return "better" if difference > 0 else "worse"
    return "not distinguishable"


def compare_arms(
    results: Mapping[str, Mapping[str, Sequence[bool]]],
    baseline: str,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> list[Comparison]:
    """Every arm against ``baseline``: ``results[arm][task_id]`` holds the pass/fail of each
    sample. With one sample per problem in both arms, McNemar's exact test (its interval is
    the bootstrap's); otherwise the paired bootstrap of per-problem pass rates. Only problems
    scored in both arms count."""
    base = results[baseline]
    rows = []
    for name, arm in results.items():
        if name == baseline:
            continue
        shared = sorted(set(arm) & set(base))
        if not shared:
            raise ValueError(f"arm {name!r} shares no problem with {baseline!r}")
        a = [sum(arm[t]) / len(arm[t]) for t in shared]
        b = [sum(base[t]) / len(base[t]) for t in shared]
        diff, low, high, p = paired_bootstrap(a, b, resamples, seed)
        test = "paired bootstrap"
        if all(len(arm[t]) == 1 and len(base[t]) == 1 for t in shared):
            _, _, p = mcnemar([arm[t][0] for t in shared], [base[t][0] for t in shared])
            test = "McNemar (exact)"
        mean_a, mean_b = float(np.mean(a)), float(np.mean(b))
        stats = (diff, low, high, p, test, verdict(diff, p))
        rows.append(Comparison(name, baseline, len(shared), mean_a, mean_b, *stats))
    return rows
