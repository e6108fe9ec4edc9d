"""Which lines of a processed split a run trains on (docs/METHOD.md §7, "Sampling").

Every sampler reads only the ``problem_index_map`` of ``<split>_metadata.json`` (see
:mod:`weighted_mtp.data.metadata`) and returns a plain list of :class:`Sample`. Randomness
comes from a local ``random.Random(seed)``, never the global RNG, so the result depends only
on the inputs, not on the global RNG's history or the number of processes. Problems are visited in the map's insertion order, which
is the order of the metadata JSON written by the storage step (the order of the lines in
``<split>.jsonl``), hence deterministic; it is kept rather than sorted so that the draw
follows the file order.

Modes (``SamplingConfig.mode``):

* ``pairwise``: difficulty-weighted unique pairs, see docs/METHOD.md §7.
* ``length_balanced_pairs``: length-balanced unique pairs, (b); the critic's default.
* ``correct_of_pairs``: the correct side of (a). Baseline, verifiable and Rho-1 then train on
  exactly the same correct solutions (the upstream behaviour, docs/METHOD.md §7).
* ``correct``: correct solutions drawn directly from ``correct_indices`` with a per-problem
  cap, so problems without incorrect solutions count too.
* ``all``: every line (``indices`` for datasets without ``is_correct``: MBPP, GSM8K, ...).
* ``mixed``: correct and incorrect solutions in a declared proportion (``incorrect_fraction``),
  each row labelled; the positive control's data (docs/EVALUATION.md §9).

Every mode raises ``NotEnoughSamples``, a user error (one line, with the number available), when fewer than
``n_samples`` samples can be drawn, unless ``allow_fewer=True`` (e.g. validation sets).
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

from weighted_mtp.base.errors import UserError

T = TypeVar("T")
ProblemMap = Mapping[str, Mapping[str, Any]]
Bins = Mapping[str, Sequence[int]]
# A Sample as a plain tuple (correct_idx, incorrect_idx, problem_id, length_bin, is_correct).
Row = tuple[int, int | None, str, str | None, bool | None]


class Sample(NamedTuple):
    """One training example: a line (pointwise) or a pair of lines (pairwise).

    A NamedTuple: immutable, comparable and cheap to build (a run draws ~10^5 of them).

    ``correct_idx`` is the line a pointwise example reads (0-based line of ``<split>.jsonl``);
    in ``all`` mode it may hold an incorrect line, and ``is_correct`` then says which
    (``None`` when the dataset has no labels). ``incorrect_idx`` is ``None`` unless pairwise.
    """

    correct_idx: int
    incorrect_idx: int | None
    problem_id: str
    length_bin: str | None = None
    is_correct: bool | None = True

    @property
    def index(self) -> int:
        """The line a pointwise example reads."""
        return self.correct_idx


class SamplingArgs(Protocol):
    """The fields of ``config.SamplingConfig`` that :func:`sample` reads."""

    mode: str
    n_samples: int
    max_pairs_per_problem: int
    difficulty_bins: Bins
    difficulty_weights: Mapping[str, float]
    length_bins: Sequence[int]
    seed: int


class NotEnoughSamples(UserError):
    """Fewer samples are available than were asked for."""


# ---- shared helpers ----


def _check_bins(bins: Bins, weights: Mapping[str, float] | None = None) -> None:
    for name, bounds in bins.items():
        if len(bounds) != 2 or bounds[0] > bounds[1]:
            raise UserError(f"difficulty bin {name!r}: expected [lo, hi] with lo <= hi")
    unknown = sorted(set(weights or {}) - set(bins))
    if unknown:
        raise UserError(f"difficulty_weights name unknown bins {unknown}; bins: {list(bins)}")


def _first_bin(difficulty: int | None, bins: Bins) -> str | None:
    """The first bin (dict order) whose inclusive ``[lo, hi]`` contains ``difficulty``."""
    if difficulty is None:
        return None
    for name, (lo, hi) in bins.items():
        if lo <= difficulty <= hi:
            return name
    return None


def _finish(
    chosen: list[Row], n_samples: int, available: int, what: str, allow_fewer: bool
) -> list[Sample]:
    """The first ``n_samples`` rows of ``chosen`` as Samples; raise when short unless
    ``allow_fewer``. Samplers carry plain tuples until here: building a NamedTuple costs
    several times more, and only ``n_samples`` of the candidates survive."""
    if len(chosen) < n_samples and not allow_fewer:
        raise NotEnoughSamples(
            f"{what}: {n_samples} requested but only {len(chosen)} could be drawn "
            f"({available} available); lower n_samples or widen the bins"
        )
    return [Sample._make(row) for row in chosen[:n_samples]]


def _unique_pairs(
    rng: random.Random, correct: Sequence[int], incorrect: Sequence[int], limit: int
) -> list[tuple[int, int]]:
    """Shuffle both sides and pair them index by index: each solution is used at most once."""
    correct, incorrect = list(correct), list(incorrect)
    rng.shuffle(correct)
    rng.shuffle(incorrect)
    return list(zip(correct, incorrect, strict=False))[: max(0, limit)]


def _no_labels_hint(problem_index_map: ProblemMap) -> str:
    has_labels = any(entry.get("correct_indices") for entry in problem_index_map.values())
    return "" if has_labels else " (the split has no is_correct labels; use mode 'all')"


# ---- (a) difficulty-weighted unique pairs ----


def _bin_quotas(n_samples: int, weights: Mapping[str, float], sizes: Mapping[str, int]) -> dict:
    """``floor(n * w)`` per bin; the remainder round-robin to bins by available count, desc."""
    total = sum(weights.values())
    quotas = {name: int(n_samples * weights[name] / total) for name in weights}
    # sorted() is stable: bins with equal counts keep their config order.
    by_size = sorted(weights, key=lambda name: -sizes[name])
    for i in range(n_samples - sum(quotas.values())):
        quotas[by_size[i % len(by_size)]] += 1
    return quotas


def difficulty_weighted_pairs(
    problem_index_map: ProblemMap,
    n_samples: int,
    bins: Bins,
    weights: Mapping[str, float],
    max_pairs_per_problem: int,
    seed: int,
    allow_fewer: bool = False,
) -> list[Sample]:
    """Unique (correct, incorrect) pairs with per-difficulty-bin quotas, see docs/METHOD.md §7.

    Steps: bin problems having both sides and a difficulty (first matching bin); pair each
    problem's shuffled solutions, ``min(|C|, |I|, cap)`` pairs; drop bins with weight <= 0 or
    no pairs and renormalise; quota ``floor(n * w)`` plus the remainder round-robin; take
    ``min(quota, available)`` of each shuffled bin; shuffle all; raise if short.
    """
    _check_bins(bins, weights)
    rng = random.Random(seed)
    pairs: dict[str, list[Row]] = {name: [] for name in bins}
    for pid, entry in problem_index_map.items():
        correct, incorrect = entry.get("correct_indices") or [], entry.get("incorrect_indices")
        name = _first_bin(entry.get("difficulty"), bins)
        if not correct or not incorrect or name is None:
            continue
        for c, i in _unique_pairs(rng, correct, incorrect, max_pairs_per_problem):
            pairs[name].append((c, i, pid, None, True))
    live = {n: float(weights.get(n, 0.0)) for n in bins if weights.get(n, 0.0) > 0 and pairs[n]}
    available = sum(len(pairs[n]) for n in live)
    if not live:
        raise NotEnoughSamples(
            "difficulty_weighted_pairs: no pairs in any bin with a positive weight"
            + _no_labels_hint(problem_index_map)
        )
    quotas = _bin_quotas(n_samples, live, {n: len(pairs[n]) for n in live})
    chosen: list[Row] = []
    for name in live:
        rng.shuffle(pairs[name])
        chosen.extend(pairs[name][: quotas[name]])
    rng.shuffle(chosen)
    return _finish(chosen, n_samples, available, "difficulty_weighted_pairs", allow_fewer)


# ---- (b) length-balanced unique pairs ----


def _length_bin_position(length: int, length_bins: Sequence[int]) -> int:
    """Index ``j >= 1`` of the first boundary with ``length < length_bins[j]``, or
    ``len(length_bins)`` when there is none (bisect instead of a scan: millions of lines)."""
    return max(1, bisect_right(length_bins, length))


def _position_label(j: int, length_bins: Sequence[int]) -> str:
    if j == len(length_bins):
        return f"{length_bins[-1]}+"
    return f"{length_bins[j - 1]}-{length_bins[j]}"


def length_bin_label(length: int, length_bins: Sequence[int]) -> str:
    """``"{prev}-{b}"`` for the first boundary ``b`` of ``length_bins[1:]`` with ``length < b``,
    else ``"{last}+"``: with ``[0, 100, 2000]``, 99 -> ``"0-100"`` and 2000 -> ``"2000+"``."""
    return _position_label(_length_bin_position(length, length_bins), length_bins)


def _by_length_bin(
    indices: Sequence[int], lengths: Sequence[int] | None, length_bins: Sequence[int], pid: str
) -> dict[int, list[int]]:
    bad = lengths is None or len(lengths) != len(indices) or None in lengths
    if bad or (lengths and min(lengths) < 0):
        raise UserError(
            f"length_balanced_pairs: problem {pid!r} has no token lengths; rebuild the "
            "dataset metadata with a tokenizer"
        )
    groups: dict[int, list[int]] = {}
    for index, length in zip(indices, lengths, strict=True):
        # inlined _length_bin_position: this loop runs once per solution of the split
        groups.setdefault(bisect_right(length_bins, length) or 1, []).append(index)
    return groups


def _problem_length_pairs(
    rng: random.Random, pid: str, entry: Mapping[str, Any], length_bins: Sequence[int], cap: int
) -> list[Row]:
    correct = _by_length_bin(
        entry["correct_indices"], entry.get("correct_token_lengths"), length_bins, pid
    )
    incorrect = _by_length_bin(
        entry["incorrect_indices"], entry.get("incorrect_token_lengths"), length_bins, pid
    )
    out: list[Row] = []
    for j in sorted(correct.keys() & incorrect.keys()):  # ascending, so the draw order is fixed
        label = _position_label(j, length_bins)
        pairs = _unique_pairs(rng, correct[j], incorrect[j], len(correct[j]))
        out.extend((c, i, pid, label, True) for c, i in pairs)
    if len(out) > cap:
        rng.shuffle(out)
        out = out[:cap]
    return out


def length_balanced_pairs(
    problem_index_map: ProblemMap,
    n_samples: int,
    bins: Bins | None,
    length_bins: Sequence[int],
    max_pairs_per_problem: int,
    seed: int,
    allow_fewer: bool = False,
) -> list[Sample]:
    """Unique pairs whose two sides fall in the same token-length bin, see docs/METHOD.md §7.

    Difficulty bins only filter problems (none or empty: keep all); weights are not used.
    Within a problem, solutions are paired per length bin present on both sides, then capped
    at ``max_pairs_per_problem`` (shuffle and truncate). Each pair carries its ``length_bin``.
    Raises if a kept problem has no token lengths or if fewer than ``n_samples`` pairs exist.
    """
    if len(length_bins) < 1 or list(length_bins) != sorted(set(length_bins)):
        raise UserError(f"length_bins must be strictly increasing, got {list(length_bins)}")
    if bins:
        _check_bins(bins)
    rng = random.Random(seed)
    pairs: list[Row] = []
    for pid, entry in problem_index_map.items():
        if not entry.get("correct_indices") or not entry.get("incorrect_indices"):
            continue
        if bins and _first_bin(entry.get("difficulty"), bins) is None:
            continue
        pairs.extend(_problem_length_pairs(rng, pid, entry, length_bins, max_pairs_per_problem))
    rng.shuffle(pairs)
    what = "length_balanced_pairs" + ("" if pairs else _no_labels_hint(problem_index_map))
    return _finish(pairs, n_samples, len(pairs), what, allow_fewer)


# ---- pointwise modes ----


def correct_of_pairs(
    problem_index_map: ProblemMap,
    n_samples: int,
    bins: Bins,
    weights: Mapping[str, float],
    max_pairs_per_problem: int,
    seed: int,
    allow_fewer: bool = False,
) -> list[Sample]:
    """The correct side of :func:`difficulty_weighted_pairs` with the same arguments (upstream)."""
    pairs = difficulty_weighted_pairs(
        problem_index_map, n_samples, bins, weights, max_pairs_per_problem, seed, allow_fewer
    )
    return [Sample(p.correct_idx, None, p.problem_id) for p in pairs]


def correct_solutions(
    problem_index_map: ProblemMap,
    n_samples: int,
    bins: Bins,
    weights: Mapping[str, float] | None,
    max_per_problem: int,
    seed: int,
    allow_fewer: bool = False,
) -> list[Sample]:
    """Correct solutions drawn directly from ``correct_indices`` (docs/METHOD.md §7).

    A problem is kept if its first matching difficulty bin has a positive weight (all bins
    when ``weights`` is None); at most ``max_per_problem`` of its correct solutions, chosen
    at random, are used. The union is shuffled and cut to ``n_samples``.
    """
    _check_bins(bins, weights)
    rng = random.Random(seed)
    chosen: list[Row] = []
    for pid, entry in problem_index_map.items():
        name = _first_bin(entry.get("difficulty"), bins)
        correct = entry.get("correct_indices") or []
        if name is None or not correct or (weights is not None and weights.get(name, 0) <= 0):
            continue
        # rng.sample draws only the kept solutions (a full shuffle costs O(|C|) per problem).
        kept = rng.sample(correct, min(max_per_problem, len(correct)))
        chosen.extend((c, None, pid, None, True) for c in kept)
    rng.shuffle(chosen)
    what = "correct" + ("" if chosen else _no_labels_hint(problem_index_map))
    return _finish(chosen, n_samples, len(chosen), what, allow_fewer)


def all_lines(
    problem_index_map: ProblemMap, n_samples: int, seed: int, allow_fewer: bool = False
) -> list[Sample]:
    """Every line of the split (correct, incorrect and unlabelled), shuffled, first
    ``n_samples``; ``is_correct`` is the line's label or ``None`` (MBPP, GSM8K, ...)."""
    # Flat parallel lists, and Samples only for the drawn positions: splits have millions of lines.
    lines: list[int] = []
    owners: list[tuple[str, bool | None]] = []
    for pid, entry in problem_index_map.items():
        for key, label in (
            ("correct_indices", True),
            ("incorrect_indices", False),
            ("indices", None),
        ):
            part = entry.get(key) or []
            lines.extend(part)
            owners.extend([(pid, label)] * len(part))
    rng = random.Random(seed)
    drawn = rng.sample(range(len(lines)), min(n_samples, len(lines)))
    chosen = [(lines[k], None, owners[k][0], None, owners[k][1]) for k in drawn]
    return _finish(chosen, n_samples, len(lines), "all", allow_fewer)


def mixed_lines(
    problem_index_map: ProblemMap,
    n_samples: int,
    incorrect_fraction: float,
    max_per_problem: int,
    seed: int,
    allow_fewer: bool = False,
) -> list[Sample]:
    """Correct and incorrect solutions mixed in a declared proportion (docs/METHOD.md §7).

    Per problem (map order) at most ``max_per_problem`` correct and at most ``max_per_problem``
    incorrect solutions are drawn at random; each side's pool is shuffled, the first
    ``round(n_samples * incorrect_fraction)`` incorrect and the first ``n_samples`` minus that
    correct rows are kept, and the union is shuffled. Every row carries ``is_correct``. Short of
    either side is an error unless ``allow_fewer`` (then each side gives what it has).
    """
    if not 0.0 <= incorrect_fraction <= 1.0:
        raise UserError(f"incorrect_fraction must be in [0, 1], got {incorrect_fraction}")
    rng = random.Random(seed)
    pools: dict[bool, list[Row]] = {True: [], False: []}
    for pid, entry in problem_index_map.items():
        for key, label in (("correct_indices", True), ("incorrect_indices", False)):
            lines = entry.get(key) or []
            kept = rng.sample(lines, min(max_per_problem, len(lines)))
            pools[label].extend((line, None, pid, None, label) for line in kept)
    n_incorrect = round(n_samples * incorrect_fraction)
    wanted = {False: n_incorrect, True: n_samples - n_incorrect}
    chosen: list[Row] = []
    for label in (True, False):
        rng.shuffle(pools[label])
        if len(pools[label]) < wanted[label] and not allow_fewer:
            side = "correct" if label else "incorrect"
            raise NotEnoughSamples(
                f"mixed: {wanted[label]} {side} rows requested but only {len(pools[label])} "
                f"available{_no_labels_hint(problem_index_map)}; lower n_samples or change "
                "incorrect_fraction"
            )
        chosen.extend(pools[label][: wanted[label]])
    rng.shuffle(chosen)
    available = len(pools[True]) + len(pools[False])
    return _finish(chosen, n_samples, available, "mixed", allow_fewer=True)


# ---- entry point ----


def sample(
    problem_index: Mapping[str, Any],
    config: SamplingArgs,
    *,
    n_samples: int | None = None,
    allow_fewer: bool = False,
) -> list[Sample]:
    """The samples of ``config.mode`` for one split: the single entry point of the loop.

    ``problem_index`` is what :func:`weighted_mtp.data.metadata.load_problem_index` returns
    (or its ``problem_index_map``). ``n_samples`` overrides ``config.n_samples`` (the loop
    passes ``val_n_samples`` for validation). ``allow_fewer`` returns every available sample
    instead of raising when fewer than asked exist. Every rank computes the same list; keep
    this rank's part with :func:`shard_for_rank`.
    """
    pmap = problem_index.get("problem_index_map", problem_index)
    n = config.n_samples if n_samples is None else n_samples
    if n < 0:
        raise ValueError(f"n_samples must be >= 0, got {n}")
    bins, weights = config.difficulty_bins, config.difficulty_weights
    cap, seed, mode = config.max_pairs_per_problem, config.seed, config.mode
    if mode == "pairwise":
        return difficulty_weighted_pairs(pmap, n, bins, weights, cap, seed, allow_fewer)
    if mode == "correct_of_pairs":
        return correct_of_pairs(pmap, n, bins, weights, cap, seed, allow_fewer)
    if mode == "length_balanced_pairs":
        return length_balanced_pairs(pmap, n, bins, config.length_bins, cap, seed, allow_fewer)
    if mode == "correct":
        return correct_solutions(pmap, n, bins, weights, cap, seed, allow_fewer)
    if mode == "all":
        return all_lines(pmap, n, seed, allow_fewer)
    if mode == "mixed":
        fraction = getattr(config, "incorrect_fraction", None)
        if fraction is None:
            raise UserError("sampling mode 'mixed' needs incorrect_fraction")
        return mixed_lines(pmap, n, fraction, cap, seed, allow_fewer)
    raise ValueError(f"unknown sampling mode {mode!r}")


def shard_for_rank(items: Sequence[T], rank: int, world: int) -> list[T]:
    """This rank's part, ``items[rank::world]``: the ranks' parts are disjoint and cover all."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    return list(items[rank::world])
