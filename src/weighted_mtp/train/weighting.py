"""Per-token weights behind one interface: ``Uniform`` and ``Rho1`` (``CriticTD`` joins them).

A weighting tells the objective three things about a micro-batch: the per-head normaliser it
contributes to the optimizer step (summed over micro-batches and ranks by the loop), dense
target-indexed weights ``W[b, j, k]`` when they are known before the forward pass, and a
``weight_fn`` when they depend on the policy's own per-token loss (Rho-1).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from weighted_mtp.train.objectives import IGNORE_INDEX, WeightFn, head_denominators


class Weighting(Protocol):
    name: str

    def denominators(self, labels: Tensor, n_heads: int) -> Tensor: ...
    def dense_weights(self, batch: Any, n_heads: int) -> Tensor | None: ...
    def weight_fn(self, batch: Any) -> WeightFn | None: ...
    def on_step_end(self) -> None: ...
    def metrics(self) -> dict[str, float]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Uniform:
    """Weight 1 on every response token (Baseline, NTP, reference tuning)."""

    name = "uniform"

    def __init__(self, normalization: str = "weight_sum"):
        self.normalization = normalization

    def denominators(self, labels: Tensor, n_heads: int) -> Tensor:
        return head_denominators(labels, None, n_heads, self.normalization)

    def dense_weights(self, batch: Any, n_heads: int) -> Tensor | None:
        return None

    def weight_fn(self, batch: Any) -> WeightFn | None:
        return None

    def on_step_end(self) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def reference_ce(reference: torch.nn.Module, tokens: Tensor, labels: Tensor) -> Tensor:
    """Target-indexed next-token CE of the frozen reference: ``[B, L]``, 0 where unscored.

    ``out[b, j] = -log P_ref(x_j | x_<j)`` comes from the reference's logit at ``j - 1``.
    """
    with torch.no_grad():
        logits = reference(tokens)[:, :-1, 0].float()
        targets = labels[:, 1:]
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view_as(targets)
    return F.pad(ce, (1, 0))


def select_top(scores: Tensor, k_percent: float) -> Tensor:
    """1.0 where ``score >= quantile(scores, 1 - k)`` (linear interpolation), else 0.0."""
    if scores.numel() == 0:
        return scores
    threshold = torch.quantile(scores.float(), 1.0 - k_percent)
    return (scores >= threshold).float()


class Rho1:
    """Rho-1 selection by excess loss against a frozen reference, target-indexed.

    Each target token is scored once, with head 1's CE against the reference's next-token CE
    (both condition on the same prefix ``x_<j``), the top ``k_percent`` of the micro-batch is
    selected, and the same selection applies to every head that predicts that token. This is
    ALGORITHMS 5.3 option 2: heads k >= 2 see ``x_<=j-k`` only, so comparing them with a
    next-token reference would mostly measure their look-ahead handicap, not the token. The
    normaliser is ``k_percent`` times the step's token count (the paper's ``N * k%``), known
    before the forward pass, so a step's gradient does not depend on its split.
    """

    name = "rho1"

    def __init__(
        self,
        reference: torch.nn.Module,
        k_percent: float,
        score: str = "signed",
        normalization: str = "weight_sum",
    ):
        self.reference = reference
        self.k_percent = k_percent
        self.score = score
        self.normalization = normalization
        self._selected_sum = 0.0
        self._valid_sum = 0.0

    def denominators(self, labels: Tensor, n_heads: int) -> Tensor:
        counts = head_denominators(labels, None, n_heads, "token_count")
        return counts * self.k_percent if self.normalization == "weight_sum" else counts

    def dense_weights(self, batch: Any, n_heads: int) -> Tensor | None:
        return None

    def _score(self, policy_ce: Tensor, ref_ce: Tensor) -> Tensor:
        if self.score == "signed":
            return policy_ce - ref_ce
        if self.score == "absolute":
            return (policy_ce - ref_ce).abs()
        return ref_ce  # "difficult": the reference's own loss

    def weight_fn(self, batch: Any) -> WeightFn:
        ref_ce = batch.extras.get("ref_ce")
        if ref_ce is None:
            ref_ce = reference_ce(self.reference, batch.tokens, batch.labels)
        selected = torch.zeros_like(ref_ce)

        def fn(head: int, ce: Tensor, batch_idx: Tensor, target_pos: Tensor) -> Tensor:
            if head == 0:
                chosen = select_top(self._score(ce, ref_ce[batch_idx, target_pos]), self.k_percent)
                selected[batch_idx, target_pos] = chosen
                self._selected_sum += float(chosen.sum())
                self._valid_sum += chosen.numel()
                return chosen
            return selected[batch_idx, target_pos]

        return fn

    def on_step_end(self) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        if not self._valid_sum:
            return {}
        fraction = self._selected_sum / self._valid_sum
        self._selected_sum = self._valid_sum = 0.0
        return {"rho1/selected_fraction": fraction}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def precompute_reference_ce(
    reference: torch.nn.Module, stream, device: torch.device, batch_size: int
) -> list[Tensor]:
    """The reference's target-indexed CE of every training example, computed once (the frozen
    reference then need not stay in memory during training)."""
    examples = stream.data.examples
    out: list[Tensor] = []
    for start in range(0, len(examples), batch_size):
        chosen = list(range(start, min(start + batch_size, len(examples))))
        batch = stream.collate(chosen).to(device)
        ce = reference_ce(reference, batch.tokens, batch.labels).cpu()
        out.extend(ce[row, : examples[i].length].clone() for row, i in enumerate(chosen))
    return out
