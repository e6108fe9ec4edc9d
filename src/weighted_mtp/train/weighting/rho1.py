"""Rho-1 selection by excess loss against a frozen reference (docs/METHOD.md §5)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from weighted_mtp.config import Rho1Config
from weighted_mtp.data.collate import IGNORE_INDEX
from weighted_mtp.train.mtp_loss import head_denominators, per_token_ce, valid_rows
from weighted_mtp.train.placement import TokenScores
from weighted_mtp.train.weighting.base import BuildContext, Micro, MicroWeights
from weighted_mtp.train.weighting.frozen import FrozenHelperWeighting
from weighted_mtp.train.weighting.precompute import Precompute

if TYPE_CHECKING:
    from weighted_mtp.data.dataset import BatchStream


REFERENCE_CHUNK_ROWS = 4096
"""Rows of ``[rows, V]`` reference logits alive at once (the policy loss's ``chunk_rows``)."""


def reference_ce(
    reference: torch.nn.Module,
    tokens: Tensor,
    labels: Tensor,
    chunk_rows: int = REFERENCE_CHUNK_ROWS,
) -> Tensor:
    """Target-indexed next-token CE of the frozen reference: ``[B, L]`` fp32, 0 where unscored.

    ``out[b, j] = -log P_ref(x_j | x_<j)`` comes from the reference's logit at ``j - 1``.
    Bounded memory, as the policy's loss (docs/METHOD.md §1, §5): the trunk and head 1's block
    run once, then the shared norm, output and an fp32 CE run on the rows with a valid target
    only, ``chunk_rows`` rows at a time, so at most one chunk of ``[rows, V]`` logits is alive
    (not ``[B, L, V]``: 8 GB in fp32 at 32 x 2048 and V 32000, and as much again per copy).
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    with torch.no_grad():
        hidden = reference.head_hidden(reference.trunk(tokens), 0)  # [B, L, d]
        b_idx, j_idx = valid_rows(labels, 1)
        rows = hidden[b_idx, j_idx - 1]  # [R, d]: the positions that predict a valid target
        del hidden
        targets = labels[b_idx, j_idx]
        for start in range(0, rows.shape[0], chunk_rows):
            end = start + chunk_rows
            ce = per_token_ce(reference.unembed(rows[start:end]), targets[start:end])
            out[b_idx[start:end], j_idx[start:end]] = ce
    return out


def select_top(scores: Tensor, k_percent: float) -> Tensor:
    """1.0 where ``score >= quantile(scores, 1 - k)`` (linear interpolation), else 0.0."""
    if scores.numel() == 0:
        return scores
    threshold = torch.quantile(scores.float(), 1.0 - k_percent)
    return (scores >= threshold).float()


def precompute_reference_ce(
    reference: torch.nn.Module,
    stream: BatchStream,
    device: torch.device,
    batch_size: int,
    chunk_rows: int = REFERENCE_CHUNK_ROWS,
) -> list[Tensor]:
    """The reference's target-indexed CE of every training example, computed once (the frozen
    reference then need not stay in memory during training), ``chunk_rows`` logit rows at a
    time (``reference_ce``)."""
    examples = stream.data.examples
    out: list[Tensor] = []
    for start in range(0, len(examples), batch_size):
        chosen = list(range(start, min(start + batch_size, len(examples))))
        batch = stream.collate(chosen).to(device)
        ce = reference_ce(reference, batch.tokens, batch.labels, chunk_rows).cpu()
        out.extend(ce[row, : examples[i].length].clone() for row, i in enumerate(chosen))
    return out


class Rho1(FrozenHelperWeighting):
    """Rho-1 selection by excess loss against a frozen reference, target-indexed.

    Each target token is scored once, with head 1's CE against the reference's next-token CE
    (both condition on the same prefix ``x_<j``), the top ``k_percent`` of the micro-batch is
    selected, and the same selection applies to every head that predicts that token
    (docs/METHOD.md §5): heads k >= 2 see ``x_<=j-k`` only, so comparing them with a
    next-token reference would mostly measure their look-ahead handicap, not the token. The
    normaliser is ``k_percent`` times the step's token count (the paper's ``N * k%``), known
    before the forward pass, so a step's gradient does not depend on its split.
    """

    name = "rho1"
    Settings = Rho1Config
    stat_names = ("selected", "scored")
    scores_tokens = True
    needs_policy_ce = True
    settings: Rho1Config

    signal = ("reference_ce", "ref_ce")

    def __init__(
        self,
        settings: Rho1Config | None = None,
        *,
        helper_model: torch.nn.Module | None = None,
        precompute: Precompute | None = None,
        normalization: str = "weight_sum",
        control: str = "none",
        seed: int = 0,
        chunk_rows: int = REFERENCE_CHUNK_ROWS,
    ) -> None:
        super().__init__(settings, helper_model=helper_model, precompute=precompute,
                         normalization=normalization, control=control, seed=seed)  # fmt: skip
        self.chunk_rows = chunk_rows
        """Reference logit rows alive at once, per step and in precompute (``reference_ce``)."""

    @classmethod
    def load_helper(cls, ckpt: Path, ctx: BuildContext) -> torch.nn.Module:
        from weighted_mtp.train.checkpoint import load_trained

        reference = load_trained(ckpt, ctx.layout, dtype=ctx.dtype, device=ctx.device)
        return reference.requires_grad_(False)

    def helper_signal(
        self, stream: BatchStream, device: torch.device, batch_size: int
    ) -> list[Tensor]:
        return precompute_reference_ce(
            self.helper_model, stream, device, batch_size, self.chunk_rows
        )

    def _score(self, policy_ce: Tensor, ref_ce: Tensor) -> Tensor:
        if self.settings.score == "signed":
            return policy_ce - ref_ce
        if self.settings.score == "absolute":
            return (policy_ce - ref_ce).abs()
        return ref_ce  # "difficult": the reference's own loss

    def _reference_ce(self, batch: Any) -> Tensor:
        ref_ce = batch.extras.get("ref_ce")
        if ref_ce is None:
            if self.helper_model is None:
                raise ValueError("Rho1 without a reference needs batch.extras['ref_ce']")
            ref_ce = reference_ce(self.helper_model, batch.tokens, batch.labels, self.chunk_rows)
        return ref_ce

    def token_scores(self, batch: Any, policy_ce: Tensor | None = None) -> TokenScores | None:
        """Ranking ``excess``: the configured score (docs/METHOD.md §5); weights: the top
        ``k_percent`` of each row's own scores (docs/METHOD.md §6, "Where the weight goes"), so a solution's
        selection does not depend on the rows batched with it."""
        if policy_ce is None:
            raise ValueError("Rho1.token_scores needs the policy's head-1 CE")
        mask = batch.labels != IGNORE_INDEX
        score = self._score(policy_ce.float(), self._reference_ce(batch).float()) * mask
        weights = torch.zeros_like(score)
        for row in range(score.shape[0]):
            valid = mask[row]
            if valid.any():
                weights[row, valid] = select_top(score[row, valid], self.settings.k_percent)
        return TokenScores({"excess": score}, weights)

    def weights(self, batch: Any, n_heads: int, micro: Micro) -> MicroWeights:
        """Head 1 selects the top ``k_percent`` of the micro-batch's targets by score; the later
        heads reuse its selection, target by target (``weigh`` moves it under a control arm)."""
        counts = head_denominators(batch.labels, None, n_heads, "token_count")
        k = self.settings.k_percent
        ref_ce = self._reference_ce(batch)
        selected = torch.zeros_like(ref_ce)

        def fn(head: int, ce: Tensor, batch_idx: Tensor, target_pos: Tensor) -> Tensor:
            if head != 0:
                return selected[batch_idx, target_pos]
            chosen = select_top(self._score(ce, ref_ce[batch_idx, target_pos]), k)
            selected[batch_idx, target_pos] = chosen
            return chosen

        return MicroWeights(counts * k if self.normalization == "weight_sum" else counts, None, fn)

    def observe_weights(self, weights: Tensor) -> None:
        self.add(selected=float(weights.sum()), scored=weights.numel())

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """``rho1/selected_fraction``: selected / scored target tokens of the step's training
        micro-batches, over all ranks."""
        if not sums["scored"]:
            return {}
        return {"rho1/selected_fraction": sums["selected"] / sums["scored"]}
