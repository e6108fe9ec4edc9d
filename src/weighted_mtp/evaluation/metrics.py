"""pass@k and accuracy with standard errors (docs/EVALUATION.md §3).

Scores are means over problems; the standard error is the sample standard deviation of the
per-problem scores (ddof = 1) over sqrt(number of problems), the same estimator lm-eval uses for
mean metrics, so pass@k and GSM8K accuracy are reported with comparable error bars.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

# (n samples, c correct) for one problem.
Counts = tuple[int, int]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem, ``1 - C(n-c, k) / C(n, k)``, in the product form.

    The product form never builds big binomials (C(2000, 1000) overflows a double).
    ``k > n`` is undefined and raises; callers drop that k instead (see :func:`mean_pass_at_k`).
    """
    if n < 1 or k < 1 or not 0 <= c <= n:
        raise ValueError(f"pass@k needs n >= 1, k >= 1 and 0 <= c <= n, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass@{k} is undefined with only n={n} samples")
    # c = 0 is checked first: human-eval returned 1.0 for c = 0 with k > n (issue #35).
    if c == 0:
        return 0.0
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def default_ks(n: int) -> list[int]:
    """The k values reported for ``n`` samples per problem (docs/EVALUATION.md §3), k > n skipped."""
    ks = [1, 5, 10, 20] if n >= 20 else [1, 5, 10]
    return [k for k in ks if k <= n]


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0.0 for a single value)."""
    if not values:
        raise ValueError("no values to average")
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def normal_interval(mean: float, stderr: float, z: float = 1.96) -> tuple[float, float]:
    """The 95% normal interval ``mean +- z * stderr`` (docs/EVALUATION.md §3)."""
    return mean - z * stderr, mean + z * stderr


def _as_counts(results: Mapping[str, Counts] | Iterable[Counts]) -> list[Counts]:
    items = list(results.values() if isinstance(results, Mapping) else results)
    if not items:
        raise ValueError("no problems to score")
    return [(int(n), int(c)) for n, c in items]


def mean_pass_at_k(
    results: Mapping[str, Counts] | Iterable[Counts], ks: Sequence[int] | None = None
) -> dict[int, tuple[float, float]]:
    """``{k: (mean pass@k over problems, standard error)}``.

    ``results`` holds one ``(n, c)`` per problem (n may differ between problems). A k larger
    than some problem's n is dropped, as human-eval, evalplus and bigcode do (docs/EVALUATION.md §3):
    never substituted. ``ks`` defaults to :func:`default_ks` of the smallest n.
    """
    counts = _as_counts(results)
    n_min = min(n for n, _ in counts)
    ks = default_ks(n_min) if ks is None else [k for k in ks if k <= n_min]
    return {k: mean_and_stderr([pass_at_k(n, c, k) for n, c in counts]) for k in ks}


def accuracy(correct: Iterable[bool]) -> tuple[float, float]:
    """Fraction correct and its standard error (GSM8K accuracy; failures count as wrong)."""
    return mean_and_stderr([1.0 if ok else 0.0 for ok in correct])
