"""Placement metrics (docs/METHOD.md §6, "Where the weight goes") on hand-made solutions with known answers, and the
character-span -> token mapping on a tiny tokenizer."""

from __future__ import annotations

import pytest
import torch

from weighted_mtp.data.alpaca import format_prompt
from weighted_mtp.data.collate import IGNORE_INDEX, Batch, encode_with_span, span_tokens
from weighted_mtp.models.tokenizer import Tokenizer
from weighted_mtp.train.objectives import HeadCoefficients, MTPObjective
from weighted_mtp.train.placement import (
    GRID,
    Solution,
    TokenScores,
    bootstrap,
    collect,
    decisive_hit,
    length_only_hits,
    length_only_weights,
    placement_metrics,
)
from weighted_mtp.train.weighting import Rho1, Uniform, Verifiable


def inside(n: int, lo: int, hi: int) -> torch.Tensor:
    flags = torch.zeros(n, dtype=torch.bool)
    flags[lo:hi] = True
    return flags


def solutions(scores: list[torch.Tensor], spans: list[tuple[int, int]], weights=None):
    return [
        Solution({"s": s}, None if weights is None else weights[i], inside(s.numel(), *spans[i]))
        for i, s in enumerate(scores)
    ]


def test_a_score_peaking_inside_the_span_hits_every_time():
    torch.manual_seed(0)
    spans = [(3, 5), (0, 2), (7, 8), (4, 9)]
    scores = []
    for lo, _ in spans:
        s = torch.rand(10)
        s[lo] = 5.0  # the peak is in the span
        scores.append(s)
    m = placement_metrics(solutions(scores, spans), resamples=200)
    assert m["n"] == 4
    assert m["s/hit"] == m["s/hit_lo"] == m["s/hit_hi"] == 1.0
    expected = sum((hi - lo) / 10 for lo, hi in spans) / 4  # the shuffled expectation: k / n
    assert m["s/hit_shuffled"] == pytest.approx(expected)
    assert m["token_frac_in"] == pytest.approx(expected)
    assert m["s/gain_shuffled"] == pytest.approx(1 - expected)
    assert m["s/gain_shuffled_lo"] > 0  # every solution gains: the interval excludes 0


def test_a_score_peaking_outside_misses_and_ties_share_the_credit():
    assert decisive_hit(torch.tensor([0.0, 9.0, 1.0, 2.0]), inside(4, 2, 4)) == 0.0
    assert decisive_hit(torch.tensor([0.0, 3.0, 3.0, 3.0]), inside(4, 2, 4)) == pytest.approx(2 / 3)


def test_a_constant_score_gets_exactly_the_shuffled_control():
    spans = [(0, 1), (2, 5), (1, 2)]
    scores = [torch.ones(4), torch.ones(10), torch.full((5,), 0.3)]
    m = placement_metrics(solutions(scores, spans), resamples=100)
    assert m["s/hit"] == pytest.approx(m["s/hit_shuffled"])
    assert m["s/hit"] == pytest.approx((1 / 4 + 3 / 10 + 1 / 5) / 3)
    assert m["s/gain_shuffled"] == pytest.approx(0.0, abs=1e-12)


def test_the_shuffled_expectation_matches_many_permutations():
    """The exact control (k / n per solution) equals the mean over random permutations."""
    generator = torch.Generator().manual_seed(1)
    scores = [torch.randn(12, generator=generator), torch.randn(7, generator=generator)]
    spans = [(2, 5), (6, 7)]
    exact = placement_metrics(solutions(scores, spans), resamples=50)["s/hit_shuffled"]
    trials, total = 4000, 0.0
    for _ in range(trials):
        for s, (lo, hi) in zip(scores, spans, strict=True):
            permuted = s[torch.randperm(s.numel(), generator=generator)]
            total += decisive_hit(permuted, inside(s.numel(), lo, hi)) / len(scores)
    assert total / trials == pytest.approx(exact, abs=0.02)
    assert exact == pytest.approx((3 / 12 + 1 / 7) / 2)


def test_length_only_baseline_finds_the_usual_place_leave_one_out():
    # Spans always in the last fifth of the response: the others point there.
    insides = [inside(n, int(0.8 * n), n) for n in (10, 20, 15, 30)]
    assert length_only_hits(insides).tolist() == [1.0, 1.0, 1.0, 1.0]
    # One solution whose span is elsewhere: the others still point to the end -> a miss.
    odd = [*insides, inside(10, 0, 2)]
    assert length_only_hits(odd).tolist()[-1] == 0.0
    # Alone, every grid position ties: the credit is the share of the grid in the span.
    alone = length_only_hits([inside(10, 0, 5)])
    assert alone.item() == pytest.approx(sum(1 for j in range(GRID) if (j + 0.5) / GRID < 0.5)
                                         / GRID)  # fmt: skip


def test_gain_length_is_the_paired_difference_from_the_position_only_predictor():
    """The quickstart's TD target reads ``gain_length_lo`` (docs/METHOD.md §6): per solution,
    hit minus position-only hit, with its own bootstrap interval."""
    # Spans at the end of every response: the position-only predictor always finds them.
    spans = [(8, 10), (16, 20), (12, 15), (24, 30)]
    lengths = [10, 20, 15, 30]
    early = [torch.arange(n, 0, -1).float() for n in lengths]  # peaks at the first token
    late = [torch.arange(n).float() for n in lengths]  # peaks at the last token
    sols = [Solution({"early": e, "late": t}, None, inside(n, *span))
            for e, t, n, span in zip(early, late, lengths, spans, strict=True)]  # fmt: skip
    m = placement_metrics(sols, resamples=200)
    assert m["early/hit_length"] == m["late/hit_length"] == 1.0
    assert m["early/gain_length"] == m["early/gain_length_hi"] == -1.0  # below: interval < 0
    assert m["late/gain_length"] == m["late/gain_length_lo"] == m["late/gain_length_hi"] == 0.0
    # One solution whose span the others do not predict: the difference is paired per solution.
    odd = [*sols, Solution({"early": torch.arange(10, 0, -1).float(),
                            "late": torch.arange(10).float()}, None, inside(10, 0, 2))]  # fmt: skip
    m = placement_metrics(odd, resamples=200)
    assert m["early/gain_length"] == pytest.approx(m["early/hit"] - m["early/hit_length"])
    assert m["early/hit"] == pytest.approx(1 / 5) and m["early/hit_length"] == pytest.approx(4 / 5)
    assert m["early/gain_length_lo"] <= m["early/gain_length"] <= m["early/gain_length_hi"] < 0.5


def test_length_only_weights_are_the_other_solutions_positional_profile():
    # Weight 3 on the first half, 1 on the second, in every solution.
    weights = [torch.cat([torch.full((n // 2,), 3.0), torch.ones(n // 2)]) for n in (10, 20, 40)]
    out = length_only_weights(weights, bins=2)
    for w, profile in zip(weights, out, strict=True):
        assert torch.allclose(profile, w.double())
    # A solution's own weights never enter its baseline.
    changed = [weights[0] * 100, *weights[1:]]
    assert torch.allclose(length_only_weights(changed, bins=2)[0], out[0])


def test_weight_mass_inside_outside_and_controls():
    spans = [(0, 2), (0, 2)]
    w = [torch.tensor([3.0, 3.0, 1.0, 1.0]), torch.tensor([3.0, 3.0, 1.0, 1.0, 1.0, 1.0])]
    scores = [x.clone() for x in w]
    m = placement_metrics(solutions(scores, spans, w), resamples=200)
    assert m["weight/mass_in"] == pytest.approx((6 / 8 + 6 / 10) / 2)
    assert m["weight/mass_in_shuffled"] == pytest.approx((2 / 4 + 2 / 6) / 2)
    assert m["weight/ratio"] == pytest.approx(3.0)  # 3 per span token, 1 per other token
    # Shuffled: expected sums k * mean and (n - k) * mean, pooled.
    inside_mean = (2 * 2 + 2 * (10 / 6)) / 4
    outside_mean = (2 * 2 + 4 * (10 / 6)) / 6
    assert m["weight/ratio_shuffled"] == pytest.approx(inside_mean / outside_mean)
    assert m["weight/mass_in_lo"] <= m["weight/mass_in"] <= m["weight/mass_in_hi"]


def test_length_only_weights_follow_position_not_the_span():
    # Weight 3 on the first half of every response; spans on the first half in two
    # solutions and on the second half in the third.
    lengths, spans = (20, 40, 20), [(0, 10), (0, 20), (10, 20)]
    w = [torch.cat([torch.full((n // 2,), 3.0), torch.ones(n // 2)]) for n in lengths]
    m = placement_metrics(solutions([x.clone() for x in w], spans, w), resamples=50)
    # The length-only weights equal the real ones (same positional profile everywhere).
    assert m["weight/mass_in_length"] == pytest.approx(m["weight/mass_in"])
    assert m["weight/ratio_length"] == pytest.approx(m["weight/ratio"])
    assert m["weight/mass_in"] == pytest.approx((0.75 + 0.75 + 0.25) / 3)


def test_bootstrap_interval_covers_the_mean_and_is_reproducible():
    values = torch.tensor([0.0, 1.0] * 50, dtype=torch.float64)
    one = bootstrap({"x": values}, lambda c: c["x"].mean(-1), resamples=500, seed=3)
    two = bootstrap({"x": values}, lambda c: c["x"].mean(-1), resamples=500, seed=3)
    assert one == two
    value, low, high = one
    assert value == 0.5 and 0.38 < low < 0.5 < high < 0.62  # about +- 1.96 * 0.05


def test_collect_keeps_response_tokens_of_rows_with_a_span():
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    span = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])  # row 2: no span token
    scores = TokenScores({"s": torch.arange(10.0).view(2, 5)}, torch.ones(2, 5))
    out = collect(scores, mask, span)
    assert len(out) == 1
    assert out[0].rankings["s"].tolist() == [1.0, 2.0, 3.0]
    assert out[0].inside.tolist() == [False, True, False]
    assert placement_metrics([]) == {}


def test_span_to_tokens_on_a_tiny_tokenizer(small_tokenizer):
    tokenizer = Tokenizer(small_tokenizer)
    instruction, output = "Add two numbers.", "a = int(input())\nprint(a + 1)\n"
    start = output.index("+ 1")
    example, positions = encode_with_span(tokenizer, instruction, "", output, (start, start + 3),
                                          4096)  # fmt: skip
    assert positions and all(example.labels[p] != IGNORE_INDEX for p in positions)
    text = format_prompt(instruction) + output
    ids, starts = tokenizer.encode_with_offsets(text)
    pieces = tokenizer.decode(ids[p - 1] for p in positions)
    assert "+" in pieces and "1" in pieces  # the tokens cover the span's characters
    # Only overlapping tokens: neighbours on both sides stay out.
    before, after = positions[0] - 1, positions[-1] + 1
    boundary = len(format_prompt(instruction))
    lo, hi = boundary + start, boundary + start + 3
    ends = [*starts[1:], len(text)]
    assert ends[before - 1] <= lo and starts[after - 1] >= hi
    # A span in the prompt region maps to no response token.
    assert span_tokens(starts, len(text), boundary, 0, 5) == []
    # A too-long example is dropped, as encode_example drops it.
    assert encode_with_span(tokenizer, instruction, "", output, (0, 1), 5) is None


def span_batch(values: list[float], labels_from: int) -> Batch:
    n = len(values)
    tokens = torch.arange(n).view(1, n)
    labels = tokens.clone()
    labels[:, :labels_from] = IGNORE_INDEX
    return Batch(tokens, labels, torch.ones(1, n, dtype=torch.long),
                 {"values": torch.tensor([values])})  # fmt: skip


def test_critic_scores_rank_the_value_drop():
    """A critic whose value falls at token 5 (the span): the one-step drop and the most
    negative advantage (lambda = 0) sit there, and its TD weight is the smallest."""
    from weighted_mtp.config import VerifiableConfig

    weighting = Verifiable(VerifiableConfig(td_lambda=0.0))
    batch = span_batch([0.5, 0.6, 0.6, 0.7, 0.7, 0.2, 0.25, 0.3, 0.3], labels_from=2)
    scores = weighting.token_scores(batch)
    mask = batch.labels != IGNORE_INDEX
    span = torch.zeros(1, 9)
    span[0, 5] = 1
    (solution,) = collect(scores, mask, span)
    for name in ("delta_min", "adv_min", "adv_abs"):
        assert decisive_hit(solution.rankings[name], solution.inside) == 1.0, name
    assert int(solution.weights.argmin()) == int(solution.inside.nonzero())
    assert placement_metrics([solution], resamples=10)["delta_min/hit"] == 1.0


def test_rho1_scores_rank_the_excess_loss_and_select_per_row():
    from weighted_mtp.config import Rho1Config

    weighting = Rho1(Rho1Config(k_percent=0.5))
    batch = span_batch([0.0] * 6, labels_from=2)
    batch.extras["ref_ce"] = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 1.0]])
    policy_ce = torch.tensor([[0.0, 0.0, 1.5, 4.0, 1.2, 0.9]])
    scores = weighting.token_scores(batch, policy_ce)
    assert torch.allclose(scores.rankings["excess"], torch.tensor([[0, 0, 0.5, 3.0, 0.2, -0.1]]))
    assert scores.weights.tolist() == [[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]]  # top half of the row


def test_a_weighting_that_does_not_rank_tokens_scores_nothing():
    objective = MTPObjective(Uniform(), 2, HeadCoefficients((0.5, 0.5)))
    assert not objective.scores_tokens
    assert objective.token_scores(torch.nn.Identity(), span_batch([0.0] * 4, 1)) is None
