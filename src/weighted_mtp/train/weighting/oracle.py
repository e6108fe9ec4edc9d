"""Oracle weightings of the positive control (docs/METHOD.md §6, docs/EVALUATION.md §9): weights
that know the answer, read from the row labels and recorded mutations a labelled sampling mode
puts into every batch (``data.dataset.INCORRECT_EXTRA``, ``MUTATION_EXTRA``; docs/DATA.md §4).

* ``OracleSpan``: weight 0 on the tokens an incorrect row's recorded mutation wrote (those that
  overlap its span) or re-tokenised (``data.collate.encode_with_mutation``), 1 on every other
  token;
* ``OracleDrop``: weight 0 on every token of an incorrect row, 1 on every token of a correct one.

Both are dense 0/1 weights known before the forward pass, normalised like any dense weighting
(``Weighting.dense_weights``: by default the step's weight sum, so a zeroed token or row gives
its share of the step to the others and never divides by zero, docs/METHOD.md §1), and the
control arms move them like any other weights (``Weighting.weigh``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from weighted_mtp.data.collate import IGNORE_INDEX
from weighted_mtp.data.dataset import INCORRECT_EXTRA, LABELLED_MODES, MUTATION_EXTRA
from weighted_mtp.train.weighting.base import Micro, MicroWeights, Weighting


def _extra(batch: Any, key: str, weighting: str) -> Tensor:
    found = batch.extras.get(key)
    if found is None:
        raise ValueError(
            f"{weighting} needs batch.extras[{key!r}]: train on a labelled sampling mode "
            f"(data.sampling.mode {' or '.join(LABELLED_MODES)}) of a split with is_correct"
        )
    return found


def drop_weights(batch: Any) -> Tensor:
    """``[B, L]`` fp32: 0 on every position of an incorrect row, 1 on every position of a
    correct one (the loss masks prompt and padding)."""
    incorrect = (_extra(batch, INCORRECT_EXTRA, "oracle_drop") > 0).any(dim=1, keepdim=True)
    return (~incorrect).float().expand(batch.labels.shape).contiguous()


def span_weights(batch: Any) -> Tensor:
    """``[B, L]`` fp32: 0 on the response tokens an incorrect row's mutation wrote or
    re-tokenised, 1 elsewhere; an incorrect row with no such token (its record carries no
    mutation) is an error, since the oracle would silently train on its mistake."""
    incorrect = _extra(batch, INCORRECT_EXTRA, "oracle_span") > 0
    span = _extra(batch, MUTATION_EXTRA, "oracle_span") > 0
    response = batch.labels != IGNORE_INDEX
    rows = incorrect.any(dim=1) & ~(span & response).any(dim=1)
    if rows.any():
        row = int(rows.nonzero()[0])
        raise ValueError(
            f"oracle_span: incorrect row {row} of the batch has no mutation token; it needs "
            "data whose incorrect records carry metadata.mutation (the known-answer source, "
            "docs/DATA.md §4)"
        )
    return 1.0 - (span & incorrect & response).float()


class _Oracle(Weighting):
    """What both oracles share: 0/1 dense weights and the zeroed share of the targets."""

    selection = True
    stat_names = ("zeroed", "scored")

    def observe_weights(self, weights: Tensor) -> None:
        self.add(zeroed=float((weights == 0).sum()), scored=weights.numel())

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """``oracle/zeroed_fraction``: head-1 targets of the step's training micro-batches given
        weight 0 (after the control arm), over all of them."""
        return {"oracle/zeroed_fraction": sums["zeroed"] / sums["scored"]} if sums["scored"] else {}


class OracleSpan(_Oracle):
    """Weight 0 on the tokens of incorrect rows that their mutation wrote or re-tokenised, 1
    elsewhere (docs/METHOD.md §6): what a perfect token scorer would give on the known-answer
    data."""

    name = "oracle_span"
    display_name = "oracle (span)"

    def weights(self, batch: Any, n_heads: int, micro: Micro) -> MicroWeights:
        return self.dense_weights(batch, span_weights(batch).to(batch.labels.device), n_heads)


class OracleDrop(_Oracle):
    """Weight 0 on every token of incorrect rows, 1 on correct rows (docs/METHOD.md §6): the
    incorrect rows dropped from the loss, the correct ones kept at the same budget."""

    name = "oracle_drop"
    display_name = "oracle (drop incorrect)"

    def weights(self, batch: Any, n_heads: int, micro: Micro) -> MicroWeights:
        return self.dense_weights(batch, drop_weights(batch).to(batch.labels.device), n_heads)
