"""Samplers of docs/METHOD.md §7 on hand-made problem maps."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weighted_mtp.base.errors import UserError
from weighted_mtp.config import SamplingConfig
from weighted_mtp.data.sampling import (
    NotEnoughSamples,
    all_lines,
    correct_of_pairs,
    correct_solutions,
    difficulty_weighted_pairs,
    length_balanced_pairs,
    length_bin_label,
    sample,
    shard_for_rank,
)

ALL = {"all": (0, 28)}
ONE = {"all": 1.0}


def build_map(spec, with_lengths=True):
    """``spec``: ``{pid: (difficulty, n_correct, n_incorrect)}`` or with explicit length lists
    ``(difficulty, correct_lengths, incorrect_lengths)``; lines are numbered consecutively."""
    pmap, line = {}, 0
    for pid, (difficulty, correct, incorrect) in spec.items():
        c_len = correct if isinstance(correct, list) else [10 * (k + 1) for k in range(correct)]
        i_len = (
            incorrect if isinstance(incorrect, list) else [10 * (k + 1) for k in range(incorrect)]
        )
        c_idx = list(range(line, line + len(c_len)))
        i_idx = list(range(line + len(c_len), line + len(c_len) + len(i_len)))
        line += len(c_len) + len(i_len)
        pmap[pid] = {
            "difficulty": difficulty,
            "correct_indices": c_idx,
            "incorrect_indices": i_idx,
            "correct_token_lengths": c_len if with_lengths else None,
            "incorrect_token_lengths": i_len if with_lengths else None,
        }
    return pmap


SPEC = {
    "p0": (1, 5, 3),  # 3 pairs
    "p1": (2, 2, 9),  # 2 pairs
    "p2": (7, 10, 10),  # capped at 4
    "p3": (8, 4, 0),  # no incorrect: no pairs
    "p4": (None, 3, 3),  # no difficulty: dropped
    "p5": (12, 1, 1),  # 1 pair
}
PMAP = build_map(SPEC)
CAP = 4
N_PAIRS = 3 + 2 + 4 + 1


def test_every_solution_used_at_most_once_and_per_problem_count():
    pairs = difficulty_weighted_pairs(PMAP, N_PAIRS, ALL, ONE, CAP, seed=1)
    assert len(pairs) == N_PAIRS
    counts = Counter(p.problem_id for p in pairs)
    assert counts == {"p0": 3, "p1": 2, "p2": 4, "p5": 1}  # min(|C|, |I|, cap)
    assert len({p.correct_idx for p in pairs}) == N_PAIRS
    assert len({p.incorrect_idx for p in pairs}) == N_PAIRS
    for p in pairs:
        assert p.correct_idx in PMAP[p.problem_id]["correct_indices"]
        assert p.incorrect_idx in PMAP[p.problem_id]["incorrect_indices"]


def test_error_when_short_says_how_many_were_available():
    with pytest.raises(NotEnoughSamples, match=rf"only {N_PAIRS} .*{N_PAIRS} available") as err:
        difficulty_weighted_pairs(PMAP, N_PAIRS + 1, ALL, ONE, CAP, seed=1)
    assert "\n" not in str(err.value)
    fewer = difficulty_weighted_pairs(PMAP, N_PAIRS + 1, ALL, ONE, CAP, seed=1, allow_fewer=True)
    assert len(fewer) == N_PAIRS


def test_quota_limited_bin_makes_the_draw_short():
    # 9 of 10 pairs are asked of a bin holding 3: upstream errors rather than refilling.
    pmap = build_map({"a": (1, 3, 3), "b": (20, 50, 50)})
    bins, weights = {"lo": (0, 5), "hi": (6, 28)}, {"lo": 0.9, "hi": 0.1}
    with pytest.raises(NotEnoughSamples, match="only 4 could be drawn"):
        difficulty_weighted_pairs(pmap, 10, bins, weights, 60, seed=0)
    got = difficulty_weighted_pairs(pmap, 10, bins, weights, 60, seed=0, allow_fewer=True)
    assert Counter(p.problem_id for p in got) == {"a": 3, "b": 1}


def test_zero_weight_bins_are_dropped():
    bins = {"easy": (0, 5), "hard": (6, 28)}
    pairs = difficulty_weighted_pairs(PMAP, 5, bins, {"easy": 0.0, "hard": 1.0}, CAP, seed=3)
    assert {p.problem_id for p in pairs} <= {"p2", "p5"}
    assert len(pairs) == 5


def test_quotas_follow_weights_and_remainder_goes_to_the_largest_bin():
    spec = {f"a{k}": (1, 10, 10) for k in range(3)}  # bin a: 30 pairs
    spec |= {f"b{k}": (10, 10, 10) for k in range(2)}  # bin b: 20 pairs
    spec |= {f"c{k}": (20, 10, 10) for k in range(4)}  # bin c: 40 pairs
    pmap = build_map(spec)
    bins = {"a": (0, 5), "b": (6, 15), "c": (16, 28)}

    def per_bin(pairs):
        return Counter(p.problem_id[0] for p in pairs)

    pairs = difficulty_weighted_pairs(pmap, 10, bins, {"a": 0.7, "b": 0.3, "c": 0.0}, 60, 0)
    assert per_bin(pairs) == {"a": 7, "b": 3}
    # 1/3 each of 10: floor 3 + 3 + 3, the remaining 1 to c (most pairs available).
    pairs = difficulty_weighted_pairs(pmap, 10, bins, {"a": 1, "b": 1, "c": 1}, 60, 0)
    assert per_bin(pairs) == {"a": 3, "b": 3, "c": 4}
    # remainder 2: round-robin c then a.
    pairs = difficulty_weighted_pairs(pmap, 11, bins, {"a": 1, "b": 1, "c": 1}, 60, 0)
    assert per_bin(pairs) == {"a": 4, "b": 3, "c": 4}
    assert sum(per_bin(pairs).values()) == 11


def test_deterministic_and_independent_of_the_global_rng():
    first = difficulty_weighted_pairs(PMAP, 8, ALL, ONE, CAP, seed=42)
    random.seed(123)
    random.random()
    second = difficulty_weighted_pairs(PMAP, 8, ALL, ONE, CAP, seed=42)
    assert first == second
    other = difficulty_weighted_pairs(PMAP, 8, ALL, ONE, CAP, seed=43)
    assert other != first


def test_sampler_does_not_touch_the_global_rng():
    random.seed(7)
    expected = random.Random(7).random()
    difficulty_weighted_pairs(PMAP, 8, ALL, ONE, CAP, seed=42)
    length_balanced_pairs(PMAP, 3, ALL, [0, 100], CAP, seed=42)
    assert random.random() == expected


def test_codeforces_letters_t_to_v_kept_when_bins_include_them():
    pmap = build_map({"t": (26, 2, 2), "v": (28, 1, 1), "a": (7, 1, 1)})
    kept = difficulty_weighted_pairs(pmap, 4, {"all": (0, 28)}, ONE, 60, 0)
    assert {p.problem_id for p in kept} == {"t", "v", "a"}
    with pytest.raises(NotEnoughSamples):  # the upstream [1, 25] bin silently drops them
        difficulty_weighted_pairs(pmap, 4, {"all": (1, 25)}, ONE, 60, 0)


def test_correct_of_pairs_is_the_correct_side_of_the_pairs():
    pairs = difficulty_weighted_pairs(PMAP, 9, ALL, ONE, CAP, seed=5)
    pointwise = correct_of_pairs(PMAP, 9, ALL, ONE, CAP, seed=5)
    assert [s.correct_idx for s in pointwise] == [p.correct_idx for p in pairs]
    assert all(s.incorrect_idx is None and s.is_correct for s in pointwise)


def test_length_bin_labels():
    bins = [0, 100, 150, 200, 300, 500, 1000, 2000]
    assert length_bin_label(0, bins) == "0-100"
    assert length_bin_label(99, bins) == "0-100"
    assert length_bin_label(100, bins) == "100-150"
    assert length_bin_label(1999, bins) == "1000-2000"
    assert length_bin_label(2000, bins) == "2000+"
    assert length_bin_label(50_000, bins) == "2000+"
    assert length_bin_label(10, [50, 100]) == "50-100"  # below the first boundary: first bin
    assert length_bin_label(7, [0]) == "0+"


def test_length_balanced_pairs_match_length_bins():
    pmap = build_map(
        {
            "x": (3, [10, 20, 120, 130, 2500], [15, 125, 140, 3000, 160]),
            "y": (9, [50, 60, 70], [55, 210]),
            "z": (30, [10], [10]),  # outside the difficulty bins
        }
    )
    length_bins = [0, 100, 150, 2000]
    bins = {"lo": (0, 20)}
    pairs = length_balanced_pairs(pmap, 5, bins, length_bins, 60, seed=0)
    lengths = {}
    for entry in pmap.values():
        lengths |= dict(zip(entry["correct_indices"], entry["correct_token_lengths"], strict=True))
        lengths |= dict(
            zip(entry["incorrect_indices"], entry["incorrect_token_lengths"], strict=True)
        )
    for p in pairs:
        assert length_bin_label(lengths[p.correct_idx], length_bins) == p.length_bin
        assert length_bin_label(lengths[p.incorrect_idx], length_bins) == p.length_bin
    # x: 0-100 x1, 100-150 x2, 2000+ x1 ; y: 0-100 x1 ; z filtered out.
    assert Counter(p.problem_id for p in pairs) == {"x": 4, "y": 1}
    assert Counter(p.length_bin for p in pairs) == {"0-100": 2, "100-150": 2, "2000+": 1}
    assert len({p.correct_idx for p in pairs}) == len({p.incorrect_idx for p in pairs}) == 5
    with pytest.raises(NotEnoughSamples, match="only 5"):
        length_balanced_pairs(pmap, 6, bins, length_bins, 60, seed=0)


def test_length_balanced_cap_and_no_bins_keeps_all():
    pmap = build_map({"x": (3, [10] * 8, [20] * 8), "z": (30, [10], [10])})
    pairs = length_balanced_pairs(pmap, 4, None, [0, 100], 3, seed=0)
    assert Counter(p.problem_id for p in pairs) == {"x": 3, "z": 1}


def test_length_balanced_requires_token_lengths():
    with pytest.raises(UserError, match="no token lengths"):
        length_balanced_pairs(build_map(SPEC, with_lengths=False), 1, ALL, [0, 100], 4, 0)


def test_correct_mode_draws_from_correct_indices_with_cap_and_filter():
    bins = {"easy": (0, 5), "mid": (6, 10)}
    got = correct_solutions(PMAP, 9, bins, {"easy": 1.0, "mid": 0.5}, 3, seed=0)
    assert len(got) == 9 and len({s.correct_idx for s in got}) == 9
    # p3 has no incorrect solution but counts; p4 (no difficulty) and p5 (no bin) do not.
    all_of = correct_solutions(PMAP, 11, bins, {"easy": 1.0, "mid": 0.5}, 3, seed=0)
    assert Counter(s.problem_id for s in all_of) == {"p0": 3, "p1": 2, "p2": 3, "p3": 3}
    for s in all_of:
        assert s.correct_idx in PMAP[s.problem_id]["correct_indices"]
    assert len({s.correct_idx for s in all_of}) == 11
    only_easy = correct_solutions(PMAP, 5, bins, {"easy": 1.0, "mid": 0.0}, 3, seed=0)
    assert {s.problem_id for s in only_easy} == {"p0", "p1"}
    with pytest.raises(NotEnoughSamples, match="11 available"):
        correct_solutions(PMAP, 12, bins, None, 3, seed=0)


def test_all_mode_returns_every_line_once():
    got = all_lines(PMAP, 10_000, seed=0, allow_fewer=True)
    n_lines = sum(len(e["correct_indices"]) + len(e["incorrect_indices"]) for e in PMAP.values())
    assert sorted(s.index for s in got) == list(range(n_lines))
    assert Counter(s.is_correct for s in got) == {True: 25, False: 26}
    unlabelled = {str(k): {"difficulty": None, "correct_indices": [], "incorrect_indices": [],
                           "indices": [k], "token_lengths": [5]} for k in range(7)}  # fmt: skip
    got = all_lines(unlabelled, 4, seed=0)
    assert len(got) == 4 and all(s.is_correct is None for s in got)
    assert len({s.index for s in got}) == 4
    with pytest.raises(NotEnoughSamples, match="7 available"):
        all_lines(unlabelled, 8, seed=0)
    with pytest.raises(NotEnoughSamples, match="use mode 'all'"):
        difficulty_weighted_pairs(unlabelled, 1, ALL, ONE, 4, 0)


def test_sample_entry_point_dispatches_on_mode():
    index = {"problem_index_map": PMAP, "stats": {}}
    config = SamplingConfig(mode="pairwise", n_samples=6, max_pairs_per_problem=CAP, seed=9)
    assert sample(index, config) == difficulty_weighted_pairs(PMAP, 6, ALL, ONE, CAP, 9)
    assert sample(PMAP, config, n_samples=2) == difficulty_weighted_pairs(PMAP, 2, ALL, ONE, CAP, 9)
    config.mode = "correct_of_pairs"
    assert sample(index, config) == correct_of_pairs(PMAP, 6, ALL, ONE, CAP, 9)
    config.mode = "length_balanced_pairs"
    got = sample(index, config, n_samples=3)
    assert len(got) == 3 and all(p.length_bin in ("0-100", "100-150") for p in got)
    config.mode = "correct"
    assert len(sample(index, config, n_samples=50, allow_fewer=True)) == 4 + 2 + 4 + 4 + 1
    config.mode = "all"
    assert len(sample(index, config, n_samples=5)) == 5
    with pytest.raises(ValueError, match="unknown sampling mode"):
        sample(index, SimpleNamespace(**{**config.model_dump(), "mode": "bogus"}))


def test_unknown_weight_names_fail():
    with pytest.raises(UserError, match="unknown bins"):
        difficulty_weighted_pairs(PMAP, 1, ALL, {"typo": 1.0}, CAP, 0)


def test_shard_for_rank_partitions_the_list():
    items = list(range(11))
    shards = [shard_for_rank(items, r, 3) for r in range(3)]
    assert shards[1] == [1, 4, 7, 10]
    assert sorted(x for shard in shards for x in shard) == items
    with pytest.raises(ValueError):
        shard_for_rank(items, 3, 3)


problem_spec = st.tuples(
    st.one_of(st.none(), st.integers(0, 28)), st.integers(0, 6), st.integers(0, 6)
)


@settings(max_examples=60, deadline=None)
@given(
    spec=st.dictionaries(st.text("abc", min_size=1, max_size=3), problem_spec, max_size=8),
    cap=st.integers(1, 5),
    seed=st.integers(0, 2**32),
)
def test_pairs_property(spec, cap, seed):
    pmap = build_map(spec)
    expected = {
        pid: min(c, i, cap) for pid, (d, c, i) in spec.items() if d is not None and min(c, i) > 0
    }
    total = sum(expected.values())
    if total == 0:
        with pytest.raises(NotEnoughSamples):
            difficulty_weighted_pairs(pmap, 1, ALL, ONE, cap, seed)
        return
    pairs = difficulty_weighted_pairs(pmap, total, ALL, ONE, cap, seed)
    assert Counter(p.problem_id for p in pairs) == {k: v for k, v in expected.items() if v}
    assert len({p.correct_idx for p in pairs}) == len({p.incorrect_idx for p in pairs}) == total
    assert pairs == difficulty_weighted_pairs(pmap, total, ALL, ONE, cap, seed)
