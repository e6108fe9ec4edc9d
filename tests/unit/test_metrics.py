"""pass@k (docs/EVALUATION.md §3, with its golden values) and accuracy."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weighted_mtp.evaluation.metrics import (
    accuracy,
    default_ks,
    mean_and_stderr,
    mean_pass_at_k,
    pass_at_k,
)


def test_golden_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # 1 - C(7,5)/C(10,5) = 1 - 21/252; the upstream docstring said 0.833, which is wrong.
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert round(pass_at_k(10, 3, 5), 4) == 0.9167


def test_edge_cases():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 10) == 1.0
    assert pass_at_k(10, 6, 5) == 1.0  # n - c < k
    assert pass_at_k(1, 1, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 0, 5)  # k > n is undefined, even for c = 0 (human-eval#35)
    for n, c, k in ((0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 1, 0)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_large_n_does_not_overflow():
    value = pass_at_k(2000, 1000, 1000)
    assert 0.999 < value <= 1.0


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_matches_binomial_formula(data):
    n = data.draw(st.integers(1, 60))
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_default_ks():
    assert default_ks(20) == [1, 5, 10, 20]
    assert default_ks(10) == [1, 5, 10]
    assert default_ks(7) == [1, 5]
    assert default_ks(1) == [1]


def test_mean_pass_at_k_and_stderr():
    scores = mean_pass_at_k({"a": (10, 3), "b": (10, 0), "c": (10, 10)})
    assert set(scores) == {1, 5, 10}
    mean1, se1 = scores[1]
    assert mean1 == pytest.approx((0.3 + 0 + 1) / 3)
    values = [0.3, 0.0, 1.0]
    sd = math.sqrt(sum((v - mean1) ** 2 for v in values) / 2)
    assert se1 == pytest.approx(sd / math.sqrt(3))
    assert scores[10] == (pytest.approx(2 / 3), pytest.approx(math.sqrt(1 / 3) / math.sqrt(3)))


def test_mean_pass_at_k_drops_k_above_smallest_n():
    # One problem with only 4 samples: pass@5 and pass@10 are dropped, never substituted.
    scores = mean_pass_at_k([(10, 3), (4, 1)], ks=[1, 5, 10])
    assert list(scores) == [1]
    assert scores[1][0] == pytest.approx((0.3 + 0.25) / 2)


def test_mean_pass_at_k_rejects_empty():
    with pytest.raises(ValueError):
        mean_pass_at_k([])


def test_accuracy():
    mean, se = accuracy([True, False, True, True])
    assert mean == 0.75
    assert se == pytest.approx(math.sqrt(0.25 / 4))  # sample variance 0.25 (ddof 1)
    assert accuracy([True]) == (1.0, 0.0)
    assert mean_and_stderr([2.0, 2.0]) == (2.0, 0.0)
