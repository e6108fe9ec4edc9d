"""The ``Objective`` contract: all the training loop knows about a recipe's loss.

One optimizer step, as the loop runs it (docs/ARCHITECTURE.md, "Contracts"):

    objective.begin_step(step, total_steps)               # schedules (head coefficients, λ)
    plans = [objective.plan(batch, i) for i, batch in enumerate(micro_batches)]
    normaliser = all_reduce_sum(sum(p.denominators for p in plans))
    for plan in plans:
        loss, stats = objective.forward_backward(model, plan, normaliser / world)
    ... optimizer step ...
    sums = all_reduce_sum(objective.end_step())            # per-step hooks (the EMA update)
    metrics = objective.summarize(all_reduce_sum(stats)) | objective.step_metrics(sums)

``plan`` is where a micro-batch's weights are decided, ``forward_backward`` uses exactly
those: the plan carries them, so nothing is cached between the two calls. The step's
normaliser is summed over micro-batches and ranks, so a step's gradient does not depend on
how it is split (docs/METHOD.md §1, §8). Validation calls ``plan(batch, i, training=False)``
and ``forward_backward(model, plan, None, backward=False)``.

``MTPObjective`` (the policies) and ``value_objectives.CriticObjective`` (the critic)
implement it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from weighted_mtp.train.mtp_loss import (
    head_weight_fn,
    mtp_forward_backward,
    target_weights,
    valid_rows,
)
from weighted_mtp.train.placement import TokenScores
from weighted_mtp.train.weighting import Micro, MicroWeights, Weighting

if TYPE_CHECKING:
    from weighted_mtp.config import TrainConfig
    from weighted_mtp.data.dataset import BatchStream


@dataclass
class MicroPlan:
    """One micro-batch with what its objective decided before the forward pass."""

    batch: Any
    denominators: Tensor
    """This micro-batch's share of the step's normaliser (summed over micro-batches and
    ranks by the loop)."""
    weights: MicroWeights | None = None
    """The token weights the forward pass must use (weighted objectives only)."""


class Objective(Protocol):
    """What the loop calls; see the module docstring for the order."""

    n_heads: int
    """Prediction heads trained (recorded in the checkpoint info; 1 for the critic's one
    value per position)."""

    def prepare(self, streams: list[BatchStream], device: torch.device, batch_size: int) -> None:
        """Once, before training, on the train and validation streams (precompute frozen
        signals, then free their models)."""

    def begin_step(self, step: int, total_steps: int) -> None:
        """Before the step's first micro-batch; ``step`` = optimizer steps completed."""

    def plan(self, batch: Any, index: int, training: bool = True) -> MicroPlan:
        """The micro-batch's weights and its share of the normaliser; ``index`` is its
        position in the step (or the validation pass) on this rank."""

    def forward_backward(
        self, model: nn.Module, plan: MicroPlan, normaliser: Tensor | None, backward: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Loss of one planned micro-batch divided by ``normaliser`` (None: its own), and its
        summable statistics; gradients accumulate when ``backward``."""

    def end_step(self) -> Tensor:
        """After the optimizer step, on every rank: per-step hooks; returns this rank's
        statistic sums of the step (fp64 1-D), which the loop sums over ranks."""

    def step_metrics(self, sums: Tensor) -> dict[str, float]:
        """Metrics of the step from ``end_step``'s sums over all ranks."""

    def summarize(self, stats: Tensor) -> dict[str, float]:
        """Metrics from ``forward_backward`` statistics summed over micro-batches and ranks."""

    def token_weights(self, model: nn.Module, batch: Any) -> Tensor | None:
        """``[B, L, n]`` weights each head puts on each target (NaN where none), for the
        report's heat maps; None when the objective has no token weights."""

    scores_tokens: bool
    """Whether ``token_scores`` has something to say (the loop builds the placement set of
    incorrect validation solutions only then)."""

    def token_scores(self, model: nn.Module, batch: Any) -> TokenScores | None:
        """The rankings and weights of ``batch``'s tokens (docs/METHOD.md §6, "Where the weight goes"), for the
        placement metrics; None when the objective does not rank tokens. Under FSDP every
        rank must call it."""

    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs besides tensors, optimizer and data position."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class HeadCoefficients:
    """Per-head loss coefficients ``c_k``: constant, or linear from ``start`` to ``end`` over
    the run (``c(step) = start + (end - start) * step / (total_steps - 1)``)."""

    start: tuple[float, ...]
    end: tuple[float, ...] | None = None

    @classmethod
    def from_config(cls, train: TrainConfig, n_heads: int) -> HeadCoefficients:
        """``train.head_coefficients`` (default ``1/n`` each) and ``head_coefficients_end``."""
        start = train.head_coefficients or [1.0 / n_heads] * n_heads
        if len(start) != n_heads:
            raise ValueError(
                f"train.head_coefficients has {len(start)} entries for {n_heads} heads"
            )
        end = train.head_coefficients_end
        if end is not None and len(end) != n_heads:
            raise ValueError(
                "train.head_coefficients_end must have as many entries as head_coefficients"
            )
        return cls(tuple(start), tuple(end) if end is not None else None)

    @property
    def scheduled(self) -> bool:
        return self.end is not None

    def at(self, step: int, total_steps: int) -> list[float]:
        if self.end is None:
            return list(self.start)
        frac = step / max(1, total_steps - 1)
        return [a + (b - a) * frac for a, b in zip(self.start, self.end, strict=True)]


class MTPObjective:
    """Weighted MTP cross-entropy over the first ``n_heads`` heads of a policy, with the
    token weights of one ``Weighting``."""

    def __init__(
        self,
        weighting: Weighting,
        n_heads: int,
        coefficients: HeadCoefficients,
        chunk_rows: int = 4096,
    ) -> None:
        self.weighting, self.n_heads, self.chunk_rows = weighting, n_heads, chunk_rows
        self.scores_tokens = weighting.scores_tokens
        self.schedule = coefficients
        self.coefficients = coefficients.at(0, 1)
        self.step = 0

    # ---- the step ----

    def prepare(self, streams: list[BatchStream], device: torch.device, batch_size: int) -> None:
        self.weighting.prepare(streams, device, batch_size)

    def begin_step(self, step: int, total_steps: int) -> None:
        self.step = step
        self.coefficients = self.schedule.at(step, total_steps)

    def plan(self, batch: Any, index: int, training: bool = True) -> MicroPlan:
        weights = self.weighting.weigh(batch, self.n_heads, Micro(self.step, index, training))
        return MicroPlan(batch, weights.denominators, weights)

    def forward_backward(
        self, model: nn.Module, plan: MicroPlan, normaliser: Tensor | None, backward: bool = True
    ) -> tuple[Tensor, Tensor]:
        batch, weights = plan.batch, plan.weights
        out = mtp_forward_backward(
            model, batch.tokens, batch.labels, weights.dense, normaliser, self.coefficients,
            chunk_rows=self.chunk_rows, backward=backward, weight_fn=weights.weight_fn,
            n_heads=self.n_heads, n_chunks=self._global_chunks(batch.labels),
        )  # fmt: skip
        stats = torch.stack([out.weighted_ce_sum, out.ce_sum, out.n_tokens, out.weight_sum])
        return out.loss, stats

    def end_step(self) -> Tensor:
        self.weighting.end_step()
        self.step += 1  # until the next begin_step, validation sees the steps completed
        return self.weighting.take_sums()

    def step_metrics(self, sums: Tensor) -> dict[str, float]:
        values = dict(zip(self.weighting.stat_names, sums.tolist(), strict=True))
        metrics = self.weighting.metrics(values)
        if self.schedule.scheduled:
            metrics.update({f"coef/head{k + 1}": c for k, c in enumerate(self.coefficients)})
        return metrics

    def summarize(self, stats: Tensor) -> dict[str, float]:
        """Per-head unweighted and weighted CE from summed stats (always both)."""
        metrics = {}
        for k in range(self.n_heads):
            wsum, ce, count, weight = (float(v) for v in stats[:, k])
            metrics[f"ce/head{k + 1}"] = ce / count if count else float("nan")
            metrics[f"wce/head{k + 1}"] = wsum / weight if weight else float("nan")
            metrics[f"weight_mean/head{k + 1}"] = weight / count if count else float("nan")
        metrics["ce"] = float(stats[1].sum() / stats[2].sum().clamp(min=1))
        return metrics

    # ---- checkpoint state ----

    def state_dict(self) -> dict[str, Any]:
        return {"weighting": self.weighting.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weighting.load_state_dict(state.get("weighting", {}))

    # ---- logging ----

    @torch.no_grad()
    def token_weights(self, model: nn.Module, batch: Any) -> Tensor:
        """The weight each head puts on each target token of ``batch``, ``[B, L, n]`` fp32,
        NaN where that head has no target (prompt, padding, the first k tokens): exactly the
        weights of a validation pass, for heat maps. Under FSDP every rank must call it."""
        n = self.n_heads
        planned = self.plan(batch, 0, training=False).weights
        weights = target_weights(batch.labels, planned.dense, n)
        fn = planned.weight_fn
        if fn is not None:
            recorded = weights.clone()

            def record(head: int, ce: Tensor, batch_idx: Tensor, target_pos: Tensor) -> Tensor:
                head_fn = head_weight_fn(fn, head)
                if head_fn is None:  # this head keeps its dense weights
                    return weights[batch_idx, target_pos, head]
                w = head_fn(head, ce, batch_idx, target_pos)
                recorded[batch_idx, target_pos, head] = w.float()
                return w

            mtp_forward_backward(
                model, batch.tokens, batch.labels, None, None, [1.0] * n,
                chunk_rows=self.chunk_rows, backward=False, weight_fn=record, n_heads=n,
                n_chunks=self._global_chunks(batch.labels),
            )  # fmt: skip
            weights = recorded
        valid = target_weights(batch.labels, None, n) > 0
        return torch.where(valid, weights, torch.full_like(weights, float("nan")))

    @torch.no_grad()
    def token_scores(self, model: nn.Module, batch: Any) -> TokenScores | None:
        """The weighting's ``token_scores``, given the policy's head-1 CE when it needs it."""
        if not self.weighting.scores_tokens:
            return None
        policy_ce = self.head1_ce(model, batch) if self.weighting.needs_policy_ce else None
        return self.weighting.token_scores(batch, policy_ce)

    @torch.no_grad()
    def head1_ce(self, model: nn.Module, batch: Any) -> Tensor:
        """Target-indexed head-1 CE of the policy, ``[B, L]`` fp32, 0 where unscored (the
        same fp32 CE the loss computes, recorded through a ``weight_fn``)."""
        ce_out = torch.zeros(batch.labels.shape, device=batch.labels.device)

        def record(head: int, ce: Tensor, batch_idx: Tensor, target_pos: Tensor) -> Tensor:
            ce_out[batch_idx, target_pos] = ce.float()
            return torch.ones_like(ce)

        chunks = self._global_chunks(batch.labels)
        mtp_forward_backward(
            model, batch.tokens, batch.labels, None, None, [1.0], chunk_rows=self.chunk_rows,
            backward=False, weight_fn=record, n_heads=1, n_chunks=chunks[:1] if chunks else None,
        )  # fmt: skip
        return ce_out

    def _global_chunks(self, labels: Tensor) -> Sequence[int] | None:
        """Under FSDP, chunk counts from the largest row count of any rank (see mtp_loss)."""
        if not torch.distributed.is_initialized():
            return None
        rows = torch.tensor(
            [valid_rows(labels, k + 1)[0].numel() for k in range(self.n_heads)],
            device=labels.device,
        )
        torch.distributed.all_reduce(rows, op=torch.distributed.ReduceOp.MAX)
        return [max(1, -(-int(r) // self.chunk_rows)) for r in rows]
