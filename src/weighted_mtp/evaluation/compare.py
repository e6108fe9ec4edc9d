"""Comparing arms of an experiment on the same problems (docs/EVALUATION.md §5).

Every arm of a study is scored on the same problems, so arms are compared *paired*. The unit
of the test is a *cluster*: by default one problem, or a group of problems that are not
independent of one another (problems of one task family). Runs (seeds) are a second level
inside it: a problem's value in an arm is its *estimated pass rate*, the fraction of its
samples that passed, averaged over the seeds (with one greedy sample per run: the mean over
seeds of pass/fail), and a cluster's difference is the mean over its problems of arm -
reference.

* ``sign_flip_test``: under "no difference" each cluster's difference is as likely to have
  either sign, so the p-value is the share of the 2^n sign patterns whose mean difference is
  at least as far from zero as the observed one (two-sided). Exact (every pattern) with at most
  ``EXACT_LIMIT`` non-zero clusters, else ``SIGN_FLIP_DRAWS`` random patterns with a fixed seed
  and the +1 correction ((1 + hits) / (1 + draws)), never below what the draws can support.
  When every non-zero difference has the same size the sum only counts signs, so the null is
  Binomial(m, 1/2) and the p-value is its exact two-sided tail at any m. With one sample per
  problem and one problem per cluster the differences are +-1 and the test *is* McNemar's
  exact test, which ``compare_arms`` then names so.
* ``sign_flip_interval``: the shifts delta of the difference that the same test does not reject
  on the differences minus delta (the test inverted), so it excludes 0 when the test does.
* ``holm``: Holm's step-down adjustment over all contrasts of a study; verdicts use it.
  ``holm_adjust`` applies it to comparisons made apart (a study's datasets).
* ``detectable_difference``: the smallest difference the study could see at 80% power.
* ``wilson_interval``: the Wilson score interval of a pass rate, always inside [0, 1].

``compare_arms`` runs the declared contrasts and returns one ``Comparison`` each.
``bootstrap_interval`` gives an arm's pass@1 interval when its per-problem values are pass
rates rather than pass/fail (docs/EVALUATION.md §5); ``paired_bootstrap`` and ``mcnemar``
remain as plain tools.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
POWER = 0.8
BOOTSTRAP_RESAMPLES = 10_000
EXACT_LIMIT = 20
"""Up to this many non-zero clusters every sign pattern is enumerated (2^20 = 1,048,576)."""
SIGN_FLIP_DRAWS = 100_000
"""Random sign patterns past ``EXACT_LIMIT`` (numpy's PCG64 with a fixed seed)."""
_CHUNK = 10_000


@dataclass(frozen=True)
class Comparison:
    """One contrast: ``arm`` against ``baseline`` (the contrast's reference arm: the study's
    baseline or the arm's own shuffled control) on the problems both were scored on."""

    arm: str
    baseline: str
    problems: int
    clusters: int
    mean_arm: float
    mean_baseline: float
    difference: float  # arm - baseline, the mean over problems
    cluster_difference: float  # the mean over clusters of their mean differences (the test's)
    low: float  # the 95% interval of the difference (the sign-flip test inverted)
    high: float
    arm_better: int  # clusters whose mean difference is > 0
    baseline_better: int  # clusters whose mean difference is < 0
    problems_arm_better: int  # problems whose score (mean over seeds) is higher in the arm
    problems_baseline_better: int
    p_value: float  # the raw two-sided p-value of the contrast
    p_adjusted: float  # Holm-adjusted over every contrast of the study
    detectable: float | None  # the difference seen at 80% power, alpha 0.05 (None: no spread)
    test: str
    verdict: str  # "better", "worse" or "not distinguishable", from ``p_adjusted``
    statement: str  # the verdict in words, with the detectable difference


def wilson_interval(
    successes: float, trials: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The Wilson score interval of the rate ``successes / trials``, inside [0, 1].
    ``successes`` may be fractional (a mean over seeds of pass/fail times the problems)."""
    if trials <= 0:
        raise ValueError("a pass rate needs at least one trial")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes {successes} outside 0..{trials}")
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    p, n = successes / trials, trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends, no rounding off
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def _null(values: np.ndarray, draws: int, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(A, B, exact): per sign pattern s, A = s . values and B = s . 1; every pattern when
    there are at most ``EXACT_LIMIT`` values, else ``draws`` random ones."""
    if values.size <= EXACT_LIMIT:
        a, b = np.zeros(1), np.zeros(1)
        for v in values:  # doubling: the patterns of the first k values, each with +v and -v
            a, b = np.concatenate((a + v, a - v)), np.concatenate((b + 1, b - 1))
        return a, b, True
    rng = np.random.default_rng(seed)
    a_parts, b_parts = [], []
    for start in range(0, draws, _CHUNK):
        size = min(_CHUNK, draws - start)
        signs = rng.integers(0, 2, size=(size, values.size), dtype=np.int8) * 2 - 1
        a_parts.append(signs @ values)
        b_parts.append(signs.sum(axis=1, dtype=np.float64))
    return np.concatenate(a_parts), np.concatenate(b_parts), False


def _p_shifted(
    values: np.ndarray, a: np.ndarray, b: np.ndarray, exact: bool, delta: float
) -> float:
    """The two-sided sign-flip p-value of the differences ``values - delta``."""
    observed = abs(float(values.sum()) - values.size * delta)
    tol = 1e-9 * max(1.0, float(np.abs(values).sum()) + values.size * abs(delta))
    hits = int(np.count_nonzero(np.abs(a - delta * b) >= observed - tol))
    return hits / a.size if exact else (hits + 1) / (a.size + 1)


def sign_flip_test(
    differences: Sequence[float], draws: int = SIGN_FLIP_DRAWS, seed: int = 0
) -> tuple[float, bool]:
    """(p, exact): the two-sided sign-flip test of per-cluster differences against 0. Zero
    differences are left out (their sign changes nothing)."""
    values = np.asarray(differences, dtype=np.float64)
    values = values[values != 0]
    if values.size == 0:
        return 1.0, True
    size = np.abs(values)
    if float(size.max() - size.min()) <= 1e-12 * float(size.max()):
        return _binomial_two_sided(int(np.count_nonzero(values > 0)), values.size), True
    a, b, exact = _null(values, draws, seed)
    return min(1.0, _p_shifted(values, a, b, exact, 0.0)), exact


def _binomial_two_sided(k: int, m: int) -> float:
    """P(|2X - m| >= |2k - m|) for X ~ Binomial(m, 1/2): the sign-flip p-value of m differences
    of one size, k of them positive (McNemar's exact test on k and m - k)."""
    low = min(k, m - k)
    if 2 * low == m:
        return 1.0
    return min(1.0, 2 * sum(math.comb(m, i) for i in range(low + 1)) / 2**m)


def sign_flip_interval(
    differences: Sequence[float],
    draws: int = SIGN_FLIP_DRAWS,
    seed: int = 0,
    bounds: tuple[float, float] = (-1.0, 1.0),
) -> tuple[float, float]:
    """The 95% interval of the mean difference: the shifts delta (within ``bounds``, where a
    difference of pass rates lives) at which the sign-flip test of ``differences - delta`` has
    p >= 0.05, found by bisection from the observed mean outwards."""
    values = np.asarray(differences, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no clusters to compare")
    a, b, exact = _null(values, draws, seed)
    mean = float(values.mean())

    def accepted(delta: float) -> bool:
        return _p_shifted(values, a, b, exact, delta) >= ALPHA

    ends = []
    for far in bounds:
        if accepted(far):
            ends.append(far)
            continue
        inside, outside = mean, far
        for _ in range(50):
            middle = (inside + outside) / 2
            inside, outside = (middle, outside) if accepted(middle) else (inside, middle)
        ends.append(inside)
    return round(ends[0], 9) + 0.0, round(ends[1], 9) + 0.0  # no -0.0 from the bisection


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: sorted ascending, the i-th
    smallest (from 0) becomes max over j <= i of min(1, (m - j) * p_(j))."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def detectable_difference(differences: Sequence[float]) -> float | None:
    """The minimum detectable difference at 80% power, two-sided alpha 0.05, of a mean of
    the per-cluster ``differences``: (z_0.975 + z_0.8) * sd / sqrt(n), sd their sample
    standard deviation (ddof 1). None when it cannot be estimated (fewer than 2 clusters or
    no spread at all)."""
    values = np.asarray(differences, dtype=np.float64)
    if values.size < 2:
        return None
    sd = float(values.std(ddof=1))
    if sd == 0:
        return None
    z = NormalDist()
    return (z.inv_cdf(1 - ALPHA / 2) + z.inv_cdf(POWER)) * sd / math.sqrt(values.size)


def verdict(difference: float, p_value: float) -> str:
    """ "better" or "worse" (by the sign of arm - baseline) when the test rejects equality at
    the 95% level, else "not distinguishable"."""
    if p_value < ALPHA and difference != 0:
        return "better" if difference > 0 else "worse"
    return "not distinguishable"


def describe(word: str, p_adjusted: float, detectable: float | None, clusters: int) -> str:
    """The verdict in words: a difference found, or what the study could have seen."""
    if word != "not distinguishable":
        return f"{word} (adjusted p {p_adjusted:.3g})"
    if clusters <= EXACT_LIMIT and 2.0 ** (1 - clusters) >= ALPHA:
        return f"not distinguishable; with {clusters} clusters no result can reach p < 0.05"
    if detectable is None:
        return "not distinguishable; no cluster differed, so the detectable difference is unknown"
    return f"not distinguishable; this study could see a difference of {detectable:.2f} or more"


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
    the far side of zero, at most 1). Not used for verdicts: with few discordant problems its
    p-value is far too small (docs/EVALUATION.md §5)."""
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


def default_contrasts(arms: Mapping[str, tuple[str, str]], baseline: str) -> list[tuple[str, str]]:
    """Every arm against ``baseline``, then every arm without a control against each arm of
    the same recipe with the ``shuffled`` control. ``arms[name]`` is (recipe, control)."""
    out = [(name, baseline) for name in arms if name != baseline]
    seen = {frozenset(pair) for pair in out}
    for name, (recipe, control) in arms.items():
        if control != "none":
            continue
        for other, (other_recipe, other_control) in arms.items():
            pair = frozenset((name, other))
            if other_recipe == recipe and other_control == "shuffled" and pair not in seen:
                out.append((name, other))
                seen.add(pair)
    return out


Rates = Sequence[bool] | Sequence[float]
"""One problem's values in one arm, one per seed: a pass rate in [0, 1] (a bool: the pass/fail
of a single sample)."""


def _is_pass_fail(values: Rates) -> bool:
    return all(isinstance(v, bool | np.bool_) for v in values)


def _rate(name: str, task: str, values: Rates) -> float:
    if len(values) == 0:
        raise ValueError(f"arm {name!r}, problem {task!r}: no values")
    mean = sum(float(v) for v in values) / len(values)
    if not all(0.0 <= float(v) <= 1.0 for v in values):
        raise ValueError(f"arm {name!r}, problem {task!r}: a pass rate outside [0, 1]")
    return mean


def _contrast(
    name: str,
    reference: str,
    arm: Mapping[str, Rates],
    base: Mapping[str, Rates],
    clusters: Mapping[str, str] | None,
    draws: int,
    seed: int,
) -> Comparison:
    shared = sorted(set(arm) & set(base))
    if not shared:
        raise ValueError(f"arm {name!r} shares no problem with {reference!r}")
    a = {t: _rate(name, t, arm[t]) for t in shared}
    b = {t: _rate(reference, t, base[t]) for t in shared}
    groups: dict[str, list[float]] = {}
    for t in shared:
        key = clusters.get(t, t) if clusters is not None else t
        groups.setdefault(key, []).append(a[t] - b[t])
    diffs = [sum(v) / len(v) for v in groups.values()]
    p, exact = sign_flip_test(diffs, draws, seed)
    low, high = sign_flip_interval(diffs, draws, seed)
    one_each = all(len(arm[t]) == 1 and len(base[t]) == 1 for t in shared)
    pass_fail = all(_is_pass_fail(arm[t]) and _is_pass_fail(base[t]) for t in shared)
    if one_each and pass_fail and len(groups) == len(shared):
        # +-1 per discordant problem: the sign-flip null is Binomial(n, 1/2), exact at any n
        p = mcnemar([arm[t][0] for t in shared], [base[t][0] for t in shared])[2]
        test = "McNemar (exact)"
    else:
        test = "sign-flip (exact)" if exact else f"sign-flip ({draws:,} random patterns)"
    mean_a = sum(a.values()) / len(shared)
    mean_b = sum(b.values()) / len(shared)
    return Comparison(
        arm=name, baseline=reference, problems=len(shared), clusters=len(groups),
        mean_arm=mean_a, mean_baseline=mean_b, difference=mean_a - mean_b,
        cluster_difference=float(np.mean(diffs)), low=low, high=high,
        arm_better=sum(d > 0 for d in diffs), baseline_better=sum(d < 0 for d in diffs),
        problems_arm_better=sum(a[t] > b[t] for t in shared),
        problems_baseline_better=sum(a[t] < b[t] for t in shared),
        p_value=p, p_adjusted=p, detectable=detectable_difference(diffs), test=test,
        verdict="", statement="",
    )  # fmt: skip


def holm_adjust(rows: Sequence[Comparison]) -> list[Comparison]:
    """``rows`` with Holm's adjustment over all of them (from their raw ``p_value``) and the
    verdicts and statements that follow: the family is every row given, so comparisons made
    apart (one call per dataset) are adjusted together (docs/EVALUATION.md §5)."""
    adjusted = holm([row.p_value for row in rows])
    out = []
    for row, p_adj in zip(rows, adjusted, strict=True):
        word = verdict(row.cluster_difference, p_adj)
        text = describe(word, p_adj, row.detectable, row.clusters)
        out.append(replace(row, p_adjusted=p_adj, verdict=word, statement=text))
    return out


def compare_arms(
    results: Mapping[str, Mapping[str, Rates]],
    baseline: str,
    contrasts: Sequence[tuple[str, str]] | None = None,
    clusters: Mapping[str, str] | None = None,
    draws: int = SIGN_FLIP_DRAWS,
    seed: int = 0,
) -> list[Comparison]:
    """Every contrast (arm, reference): ``results[arm][task_id]`` holds one value per seed, the
    problem's estimated pass rate in that run (a bool: one sample's pass/fail). ``contrasts``
    defaults to every arm against ``baseline``; ``clusters[task_id]`` names a problem's cluster
    (default: the problem itself). Only problems scored in both arms count. The verdicts use
    Holm's adjustment over all the contrasts returned."""
    if contrasts is None:
        contrasts = [(name, baseline) for name in results if name != baseline]
    rows = []
    for name, reference in contrasts:
        for key in (name, reference):
            if key not in results:
                raise ValueError(f"contrast {name} - {reference}: no results of arm {key!r}")
        rows.append(_contrast(name, reference, results[name], results[reference], clusters,
                              draws, seed))  # fmt: skip
    return holm_adjust(rows)
