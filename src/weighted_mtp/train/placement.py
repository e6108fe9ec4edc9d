"""Where the weight goes: token scores and weights on incorrect solutions against their
mutation spans (docs/METHOD.md §6, "Where the weight goes").

A weighting that ranks tokens (``Verifiable``, ``Rho1``) returns ``TokenScores`` for a batch:
one or more *rankings* (the decisive token of a solution is the argmax of a ranking over its
response tokens) and the token *weights* it would train with. ``collect`` cuts a batch into
one ``Solution`` per row (response tokens only, with the in-span flags), and
``placement_metrics`` compares, over the solutions:

* the hit rate (the decisive token lies in the span; ties share the credit), the fraction of
  the weight mass inside the span and the ratio of the mean weight inside to outside;
* the shuffled control, exactly: a random permutation of a row's scores puts its maximum on
  each response token with probability ``1/n``, so the expected hit is ``k/n`` (``k`` span
  tokens of ``n``), the expected mass inside is ``k/n`` and the expected sums inside and
  outside are ``k * mean`` and ``(n - k) * mean``;
* a length-only baseline that sees positions and lengths only, fitted leave-one-out on the
  other solutions: for the hit rate, the relative position (of ``GRID`` grid points) that hits
  the other solutions' spans most often; for the weights, the other solutions' mean weight at
  the same relative position (``BINS`` bins).

Every rate comes with a 95% percentile bootstrap interval over solutions (``RESAMPLES``
resamples, a fixed generator), and the paired differences hit - control with theirs. Pure
tensor code, no model, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

GRID = 20
BINS = 10
RESAMPLES = 2000


@dataclass
class TokenScores:
    """What a weighting says about where its weight goes in a batch, ``[B, L]`` tensors
    indexed like the labels (target-indexed)."""

    rankings: dict[str, Tensor]
    """name -> score; a solution's decisive token is the argmax over its response tokens."""
    weights: Tensor | None = None
    """The weight each token would get (before any control arm); None: no weights to place."""


@dataclass
class Solution:
    """One incorrect solution's response tokens: their ranking scores and weights (1-D) and
    whether each lies in the mutation span."""

    rankings: dict[str, Tensor]
    weights: Tensor | None
    inside: Tensor


def collect(scores: TokenScores, mask: Tensor, span: Tensor) -> list[Solution]:
    """One ``Solution`` per row with at least one response token in the span.

    ``mask``: ``[B, L]`` response tokens (the labels that are not ignored); ``span``: ``[B, L]``
    nonzero on the tokens that overlap the mutation span.
    """
    mask, span = mask.to(torch.bool).cpu(), span.to(torch.bool).cpu()
    out = []
    for row in range(mask.shape[0]):
        keep = mask[row]
        inside = span[row][keep]
        if not bool(inside.any()):
            continue
        rankings = {k: v[row].detach().float().cpu()[keep] for k, v in scores.rankings.items()}
        weights = scores.weights
        w = None if weights is None else weights[row].detach().float().cpu()[keep]
        out.append(Solution(rankings, w, inside))
    return out


def decisive_hit(score: Tensor, inside: Tensor) -> float:
    """The share of the score's maxima that lie in the span (1 or 0 without ties)."""
    top = score == score.max()
    return float((top & inside).sum()) / float(top.sum())


def relative_positions(n: int) -> Tensor:
    """Token ``t`` of a response of ``n`` tokens sits at ``(t + 0.5) / n`` in ``(0, 1)``."""
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


def grid_hits(inside: Tensor, grid: int = GRID) -> Tensor:
    """``[grid]``: whether the token at relative position ``(j + 0.5) / grid`` is in the span."""
    n = inside.numel()
    index = ((torch.arange(grid, dtype=torch.float64) + 0.5) / grid * n).long().clamp(max=n - 1)
    return inside[index].double()


def length_only_hits(insides: list[Tensor], grid: int = GRID) -> Tensor:
    """Per solution, the hit of the grid position that hits the OTHER solutions' spans most
    often (ties share the credit); with no other solution every position ties."""
    hits = torch.stack([grid_hits(inside, grid) for inside in insides])  # [R, grid]
    others = hits.sum(0, keepdim=True) - hits
    best = others == others.max(dim=1, keepdim=True).values
    return (hits * best).sum(1) / best.sum(1)


def length_only_weights(weights: list[Tensor], bins: int = BINS) -> list[Tensor]:
    """Per solution, each token's weight replaced by the other solutions' mean weight in its
    relative-position bin (their overall mean where they have no token in that bin)."""
    index = [(relative_positions(w.numel()) * bins).long().clamp(max=bins - 1) for w in weights]
    sums = torch.stack([torch.zeros(bins, dtype=torch.float64).index_add_(0, i, w.double())
                        for i, w in zip(index, weights, strict=True)])  # fmt: skip
    counts = torch.stack([torch.bincount(i, minlength=bins).double() for i in index])
    out = []
    for r, i in enumerate(index):
        other_sum, other_count = sums.sum(0) - sums[r], counts.sum(0) - counts[r]
        overall = other_sum.sum() / other_count.sum() if other_count.sum() > 0 else 1.0
        profile = torch.where(
            other_count > 0, other_sum / other_count.clamp(min=1), torch.as_tensor(overall)
        )
        out.append(profile[i])
    return out


class _Resampled(dict):
    """The columns under bootstrap resampling, each resampled on first use (``[resamples, R]``)."""

    def __init__(self, columns: dict[str, Tensor], index: Tensor) -> None:
        super().__init__()
        self.columns, self.index = columns, index

    def __missing__(self, key: str) -> Tensor:
        self[key] = self.columns[key][self.index]
        return self[key]


def bootstrap(
    columns: dict[str, Tensor],
    statistic: Callable[[dict[str, Tensor]], Tensor],
    resamples: int = RESAMPLES,
    seed: int = 0,
    draws: _Resampled | None = None,
) -> tuple[float, float, float]:
    """``(value, low, high)``: ``statistic`` of per-solution ``columns`` and its 95% percentile
    bootstrap interval over solutions. ``statistic`` maps columns of shape ``[..., R]`` to
    ``[...]`` (it is applied to all resamples at once); ``draws`` shares one set of resamples
    (and its resampled columns) between statistics."""
    value = float(statistic(columns))
    if draws is None:
        n = next(iter(columns.values())).shape[0]
        generator = torch.Generator().manual_seed(seed)
        draws = _Resampled(columns, torch.randint(n, (resamples, n), generator=generator))
    stats = statistic(draws).double()
    stats = stats[torch.isfinite(stats)]
    if stats.numel() == 0:
        return value, float("nan"), float("nan")
    low, high = torch.quantile(stats, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return value, float(low), float(high)


def _mean(key: str) -> Callable[[dict[str, Tensor]], Tensor]:
    return lambda c: c[key].mean(-1)


def _ratio(prefix: str) -> Callable[[dict[str, Tensor]], Tensor]:
    """Pooled mean weight per span token over mean weight per other token."""

    def ratio(c: dict[str, Tensor]) -> Tensor:
        inside = c[f"{prefix}in"].sum(-1) / c["k"].sum(-1)
        outside = c[f"{prefix}out"].sum(-1) / (c["n"] - c["k"]).sum(-1)
        return inside / outside

    return ratio


def _put(out: dict[str, float], name: str, triple: tuple[float, float, float]) -> None:
    out[name], out[f"{name}_lo"], out[f"{name}_hi"] = triple


def placement_metrics(
    solutions: list[Solution], resamples: int = RESAMPLES, seed: int = 0
) -> dict[str, float]:
    """The placement metrics of docs/METHOD.md §6, "Where the weight goes" over ``solutions`` (see the module
    docstring); empty without solutions. Keys (each rate with ``_lo``/``_hi``):

    ``n`` solutions, ``token_frac_in`` the mean share of response tokens in the span; per
    ranking ``<name>/hit``, ``<name>/hit_shuffled``, ``<name>/hit_length``,
    ``<name>/gain_shuffled`` and ``<name>/gain_length`` (paired differences); for the weights
    ``weight/mass_in`` (mean share of a solution's weight mass in its span),
    ``weight/mass_in_shuffled``, ``weight/mass_in_length``, and ``weight/ratio`` (pooled
    mean weight per span token / per other token), ``weight/ratio_shuffled``,
    ``weight/ratio_length``.
    """
    if not solutions:
        return {}
    insides = [s.inside for s in solutions]
    n = torch.tensor([float(i.numel()) for i in insides], dtype=torch.float64)
    k = torch.tensor([float(i.sum()) for i in insides], dtype=torch.float64)
    cols: dict[str, Tensor] = {"n": n, "k": k, "frac": k / n}
    out: dict[str, float] = {"n": float(len(solutions))}
    generator = torch.Generator().manual_seed(seed)
    draws = _Resampled(cols, torch.randint(len(solutions), (resamples, len(solutions)),
                                           generator=generator))  # fmt: skip

    def interval(statistic: Callable[[dict[str, Tensor]], Tensor]) -> tuple[float, float, float]:
        return bootstrap(cols, statistic, draws=draws)

    _put(out, "token_frac_in", interval(_mean("frac")))
    cols["length_hit"] = length_only_hits(insides)
    for name in solutions[0].rankings:
        hits = [decisive_hit(s.rankings[name], s.inside) for s in solutions]
        cols["hit"] = torch.tensor(hits, dtype=torch.float64)
        cols["gain_shuffled"] = cols["hit"] - cols["frac"]
        cols["gain_length"] = cols["hit"] - cols["length_hit"]
        for key in ("hit", "gain_shuffled", "gain_length"):  # new values: resample again
            draws.pop(key, None)
        for key, column in (("hit", "hit"), ("hit_shuffled", "frac"),
                            ("hit_length", "length_hit"), ("gain_shuffled", "gain_shuffled"),
                            ("gain_length", "gain_length")):  # fmt: skip
            _put(out, f"{name}/{key}", interval(_mean(column)))
    if solutions[0].weights is None:
        return out
    weights = [s.weights.double() for s in solutions]
    for prefix, ws in (("", weights), ("len_", length_only_weights(weights))):
        cols[f"{prefix}in"] = torch.stack([(w * i).sum() for w, i in zip(ws, insides, strict=True)])
        cols[f"{prefix}out"] = torch.stack([w.sum() for w in ws]) - cols[f"{prefix}in"]
        cols[f"{prefix}mass"] = cols[f"{prefix}in"] / (cols[f"{prefix}in"] + cols[f"{prefix}out"])
    mean = (cols["in"] + cols["out"]) / n  # the shuffled control's expected sums
    cols["shuf_in"], cols["shuf_out"] = k * mean, (n - k) * mean
    _put(out, "weight/mass_in", interval(_mean("mass")))
    _put(out, "weight/mass_in_shuffled", interval(_mean("frac")))
    _put(out, "weight/mass_in_length", interval(_mean("len_mass")))
    _put(out, "weight/ratio", interval(_ratio("")))
    _put(out, "weight/ratio_shuffled", interval(_ratio("shuf_")))
    _put(out, "weight/ratio_length", interval(_ratio("len_")))
    return out
