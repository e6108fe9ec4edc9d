"""Critic losses (docs/METHOD.md §3) and the objective the training loop runs for them.

Every loss returns a *sum* over pairs or sequences; the objective divides it by the count of
the whole optimizer step (all micro-batches, all ranks: the plan's ``denominators``), so
splitting a step into micro-batches does not change its gradient (docs/METHOD.md §8).

Besides the loss, the objective reports the critic's token-level diagnostics: the
pairwise BT model only supervises each sequence's *mean* value, so per-token values can be
spiky or simply track position; ``spikiness`` and ``position_corr`` expose that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weighted_mtp.data.collate import IGNORE_INDEX, Batch, PairBatch
from weighted_mtp.train.objectives import MicroPlan

LOSSES = ("pairwise", "lambda_return", "mc")
STATS = (
    "loss_sum", "count", "pairs", "correct", "margin", "value_pos", "value_neg",
    "spikiness", "spikiness_n", "position_corr", "position_corr_n", "token_var", "sequences",
)  # fmt: skip


# ---- pairwise Bradley-Terry (docs/METHOD.md §3) ----


def sequence_means(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the masked (response) tokens of each row: ``[B]``."""
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / (m.sum(-1) + 1e-8)


def token_diagnostics(values: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Per-sequence sums of spikiness (``max|dv| / mean|dv|`` over consecutive valid
    positions), Pearson corr(v_t, t) and token variance, with the counts of rows where each
    is defined (a constant value sequence has neither spikiness nor a correlation)."""
    v, m = values.detach().double(), mask.bool()
    pair = m[:, 1:] & m[:, :-1]
    dv = (v[:, 1:] - v[:, :-1]).abs() * pair
    n_dv = pair.sum(-1)
    mean_dv = dv.sum(-1) / n_dv.clamp(min=1)
    spiky_ok = (n_dv > 0) & (mean_dv > 1e-12)
    spikiness = torch.where(spiky_ok, dv.amax(-1) / mean_dv.clamp(min=1e-12), 0.0)

    mf = m.double()
    n = mf.sum(-1).clamp(min=1)
    pos = torch.arange(v.shape[-1], device=v.device, dtype=torch.float64).expand_as(v)
    cv = (v - (v * mf).sum(-1, keepdim=True) / n[:, None]) * mf
    cp = (pos - (pos * mf).sum(-1, keepdim=True) / n[:, None]) * mf
    var_v, var_p = (cv * cv).sum(-1), (cp * cp).sum(-1)
    # Relative threshold: rounding leaves a tiny variance in a constant sequence.
    corr_ok = (var_p > 0) & (var_v > 1e-18 * n * (1 + (v * mf).sum(-1).div(n) ** 2))
    corr = torch.where(corr_ok, (cv * cp).sum(-1) / (var_v * var_p).clamp(min=1e-300).sqrt(), 0.0)
    return {
        "spikiness": spikiness.sum(), "spikiness_n": spiky_ok.sum().double(),
        "position_corr": corr.sum(), "position_corr_n": corr_ok.sum().double(),
        "token_var": (var_v / n).sum(), "sequences": (m.sum(-1) > 0).sum().double(),
    }  # fmt: skip


def pairwise_bt_loss(
    v_pos: Tensor, v_neg: Tensor, mask_pos: Tensor, mask_neg: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """``sum over pairs of -log sigmoid(mean v_pos - mean v_neg)`` (means over response
    tokens) and summed monitoring stats (correct count, margin, mean values, diagnostics)."""
    mean_pos, mean_neg = sequence_means(v_pos, mask_pos), sequence_means(v_neg, mask_neg)
    margin = mean_pos - mean_neg
    loss_sum = F.softplus(-margin).sum()  # = -log sigmoid(margin), stable for any margin
    with torch.no_grad():
        stats = {
            "pairs": torch.tensor(float(margin.numel()), device=margin.device),
            "correct": (margin > 0).sum().float(),
            "margin": margin.sum(),
            "value_pos": mean_pos.sum(),
            "value_neg": mean_neg.sum(),
        }
        diag = token_diagnostics(torch.cat([v_pos, v_neg]), torch.cat([mask_pos, mask_neg]))
        stats.update({k: t.to(margin.dtype) for k, t in diag.items()})
    return loss_sum, stats


# ---- lambda-return regression (docs/METHOD.md §3) ----


def lambda_schedule(
    step: int,
    kind: str = "constant",
    start: float = 1.0,
    end: float = 0.95,
    hold: int = 250,
    decay: int = 500,
) -> float:
    """λ at optimizer step ``step``: ``constant`` (= start), or ``linear``/``cosine``: start
    for ``hold`` steps, then decay to ``end`` over ``decay`` steps, then end."""
    if kind == "constant" or step < hold:
        if kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"lambda schedule {kind!r}: choose constant, linear or cosine")
        return start
    frac = min(1.0, (step - hold) / max(decay, 1))
    if kind == "linear":
        return start + (end - start) * frac
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"lambda schedule {kind!r}: choose constant, linear or cosine")


def _affine_scan(a: Tensor, b: Tensor) -> Tensor:
    """``x_i = a_i x_{i-1} + b_i`` along the last dim with ``x_{-1} = 0``, in log2(L)
    doubling steps (no Python loop over positions, no host sync)."""
    a, b = a.clone(), b.clone()
    d = 1
    while d < a.shape[-1]:
        # Compose each map with the one d positions earlier (right-hand sides use old a, b).
        b = torch.cat([b[..., :d], a[..., d:] * b[..., :-d] + b[..., d:]], dim=-1)
        a = torch.cat([a[..., :d], a[..., d:] * a[..., :-d]], dim=-1)
        d *= 2
    return b


@torch.no_grad()
def lambda_return_targets(
    values: Tensor, mask: Tensor, rewards: Tensor, lam: float, gamma: float = 1.0
) -> Tensor:
    """λ-return targets ``G [B, L]`` over the masked (response) positions, no gradient.

    Terminal T = the last masked position, ``G_T = R``; for earlier masked t,
    ``G_t = (1-λ) γ v_next + λ γ G_next`` where ``next`` is the next masked position (prompt
    positions are skipped). λ = 1 gives ``γ^(T-t) R``; λ = 0 gives ``γ v_next``. Zero
    outside the mask.
    """
    v, m = values.detach().float(), mask.bool()
    length = v.shape[-1]
    idx = torch.arange(length, device=v.device).expand_as(m)
    # Next masked position after t (length if none): a reversed running minimum.
    own = torch.where(m, idx, length)
    suffix_min = own.flip(-1).cummin(-1).values.flip(-1)
    nxt = torch.cat([suffix_min[:, 1:], torch.full_like(suffix_min[:, :1], length)], dim=-1)
    terminal = m & (nxt == length)
    v_next = torch.cat([v, torch.zeros_like(v[:, :1])], dim=-1).gather(-1, nxt)
    r = rewards.to(v).reshape(-1, 1).expand_as(v)
    # G_t = a_t G_{t+1} + b_t; unmasked positions carry G_{t+1} through unchanged.
    a = torch.where(terminal, 0.0, torch.where(m, lam * gamma, 1.0))
    b = torch.where(terminal, r, torch.where(m, (1 - lam) * gamma * v_next, 0.0))
    return _affine_scan(a.flip(-1), b.flip(-1)).flip(-1) * m


def mc_targets(mask: Tensor, rewards: Tensor) -> Tensor:
    """Monte-Carlo targets: the sequence's reward ``R`` at every masked position."""
    return rewards.float().reshape(-1, 1) * mask.float()


def value_regression_loss(
    values: Tensor, targets: Tensor, mask: Tensor, kind: str = "huber", delta: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Per-sequence mean over masked tokens of Huber (smooth-L1 with ``beta = delta``, as
    upstream) or squared error, summed over sequences; returns ``(loss_sum, n_sequences)``
    where only sequences with at least one masked token count."""
    if kind == "huber":
        err = F.smooth_l1_loss(values.float(), targets.float(), beta=delta, reduction="none")
    elif kind == "mse":
        err = (values.float() - targets.float()) ** 2
    else:
        raise ValueError(f"regression loss {kind!r}: choose huber or mse")
    m = mask.float()
    n = m.sum(-1)
    per_seq = (err * m).sum(-1) / n.clamp(min=1)
    return per_seq.sum(), (n > 0).sum().float()


# ---- the objective the loop runs ----


def _rows(batch: PairBatch | Batch) -> tuple[Batch, int, Tensor | None]:
    """(rows to forward, number of pairs (0 for a plain batch), rewards per row or None)."""
    if isinstance(batch, PairBatch):
        rows, pairs = batch.stacked(), len(batch)
        ones = torch.ones(pairs, device=rows.tokens.device)
        return rows, pairs, torch.cat([ones, torch.zeros_like(ones)])
    reward = batch.extras.get("reward")
    if reward is not None and reward.ndim == 2:
        reward = reward[:, 0]  # a per-token extra carries the row's reward in every column
    return batch, 0, reward


@dataclass
class LambdaSchedule:
    kind: str = "constant"
    start: float = 1.0
    end: float = 0.95
    hold: int = 250
    decay: int = 500

    def __call__(self, step: int) -> float:
        return lambda_schedule(step, self.kind, self.start, self.end, self.hold, self.decay)


@dataclass
class CriticObjective:
    """The critic's loss for the training loop (the ``Objective`` contract).

    ``loss``: ``pairwise`` (BT on sequence means; needs a ``PairBatch``), ``lambda_return``
    or ``mc`` (regression with R = 1 for the correct side, 0 for the incorrect one, or a
    plain ``Batch`` with a ``reward`` extra). One forward of the stacked ``[2P, L]`` batch.
    λ follows ``lam`` by optimizer step; validation (``backward=False``) uses λ = 1, as
    upstream.
    """

    loss: str = "pairwise"
    coef: float = 1.0
    regression: str = "huber"
    huber_delta: float = 0.5
    gamma: float = 1.0
    lam: LambdaSchedule = field(default_factory=LambdaSchedule)
    n_heads: int = 1
    """One value per position: the value head."""

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"critic loss {self.loss!r}: choose from {', '.join(LOSSES)}")
        self.lam_now = self.lam(0)

    def prepare(self, streams: list, device: torch.device, batch_size: int) -> None:
        return None

    def begin_step(self, step: int, total_steps: int) -> None:
        self.lam_now = self.lam(step)

    def count(self, batch: PairBatch | Batch) -> Tensor:
        """Pairs (pairwise) or sequences with a response token (regression): ``[1]``."""
        rows, pairs, _ = _rows(batch)
        if self.loss == "pairwise":
            return torch.tensor([float(pairs)], device=rows.tokens.device)
        return (rows.labels != IGNORE_INDEX).any(-1).sum().float().reshape(1)

    def plan(self, batch: PairBatch | Batch, index: int, training: bool = True) -> MicroPlan:
        return MicroPlan(batch, self.count(batch))

    def forward_backward(
        self,
        model: nn.Module,
        plan: MicroPlan,
        normaliser: Tensor | None,
        backward: bool = True,
    ) -> tuple[Tensor, Tensor]:
        batch = plan.batch
        rows, pairs, rewards = _rows(batch)
        mask = rows.labels != IGNORE_INDEX
        with torch.set_grad_enabled(backward):
            values = model(rows.tokens)
            loss_sum, stats = self._loss(values, mask, pairs, rewards, backward)
            count = plan.denominators if normaliser is None else normaliser
            loss = self.coef * loss_sum / count.reshape(()).clamp(min=1)
        if backward:
            loss.backward()
        stats["loss_sum"] = self.coef * loss_sum.detach()
        stats["count"] = plan.denominators.reshape(())
        device = values.device
        return loss.detach(), torch.stack(
            [stats.get(k, torch.zeros((), device=device)).float().reshape(()) for k in STATS]
        )

    def end_step(self) -> Tensor:
        return torch.zeros(0, dtype=torch.float64)

    def step_metrics(self, sums: Tensor) -> dict[str, float]:
        return {"lambda": self.lam_now} if self.loss == "lambda_return" else {}

    def token_weights(self, model: nn.Module, batch: Any) -> Tensor | None:
        return None

    scores_tokens = False

    def token_scores(self, model: nn.Module, batch: Any) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}  # λ depends on the step only, which the loop restores

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def _loss(
        self, values: Tensor, mask: Tensor, pairs: int, rewards: Tensor | None, training: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if pairs:
            bt_sum, stats = pairwise_bt_loss(
                values[:pairs], values[pairs:], mask[:pairs], mask[pairs:]
            )
        elif self.loss == "pairwise":
            raise TypeError("the pairwise critic loss needs a PairBatch (correct, incorrect)")
        else:
            stats = {k: t.float() for k, t in token_diagnostics(values, mask).items()}
        if self.loss == "pairwise":
            return bt_sum, stats
        if rewards is None:
            raise ValueError("critic regression needs rewards: a PairBatch or a 'reward' extra")
        if self.loss == "mc":
            targets = mc_targets(mask, rewards)
        else:
            lam = self.lam_now if training else 1.0
            targets = lambda_return_targets(values, mask, rewards, lam, self.gamma)
        kind = "mse" if self.loss == "mc" else self.regression
        loss_sum, _ = value_regression_loss(values, targets, mask, kind, self.huber_delta)
        return loss_sum, stats

    def summarize(self, stats: Tensor) -> dict[str, float]:
        """Step (or validation) metrics from summed stats."""
        s = dict(zip(STATS, (float(v) for v in stats.flatten()), strict=True))
        ratio = lambda a, b: s[a] / s[b] if s[b] else float("nan")  # noqa: E731
        metrics = {"loss": ratio("loss_sum", "count")}
        if s["pairs"]:
            metrics.update(
                pair_accuracy=ratio("correct", "pairs"), margin=ratio("margin", "pairs"),
                value_pos=ratio("value_pos", "pairs"), value_neg=ratio("value_neg", "pairs"),
            )  # fmt: skip
        metrics.update(
            spikiness=ratio("spikiness", "spikiness_n"),
            position_corr=ratio("position_corr", "position_corr_n"),
            token_var=ratio("token_var", "sequences"),
        )
        return metrics


@torch.no_grad()
def critic_diagnostics(
    model: torch.nn.Module, stream: Any, device: torch.device, batch_size: int = 8
) -> dict[str, Any]:
    """Pairwise accuracy overall, by length bucket and by difficulty, next to the accuracy
    of a length-only predictor ("the shorter solution is the correct one") on the same pairs.
    A critic that does no better than that predictor has learnt length, not correctness.

    Under torchrun every rank must call it (the model may be sharded): each scores its own
    validation pairs (every rank has as many, ``Trainer._data``) and the report covers all
    ranks' pairs."""
    from weighted_mtp.train import distributed

    mine = critic_pair_rows(model, stream, device, batch_size)
    rows, difficulty = [], {}
    for part, levels in distributed.gather_objects((mine, stream.data.difficulty or {})):
        rows.extend(part)
        difficulty.update(levels)
    return summarize_pair_rows(rows, difficulty)


@torch.no_grad()
def critic_pair_rows(
    model: torch.nn.Module, stream: Any, device: torch.device, batch_size: int = 8
) -> list[tuple[bool, float, int, int, str]]:
    """Per validation pair of ``stream``: (correct side scored higher, the length-only
    predictor's credit, correct length, incorrect length, problem id)."""
    was_training = model.training
    model.eval()
    rows: list[tuple[bool, float, int, int, str]] = []
    for start in range(0, len(stream.data.examples), batch_size):
        chosen = list(range(start, min(start + batch_size, len(stream.data.examples))))
        batch = stream.collate(chosen).to(device)
        stacked = batch.stacked()
        values = model(stacked.tokens).float()
        mask = (stacked.labels != IGNORE_INDEX).float()
        means = (values * mask).sum(1) / mask.sum(1).clamp(min=1)
        lengths = mask.sum(1).long().tolist()
        p = len(chosen)
        for row, i in enumerate(chosen):
            shorter = (
                1.0
                if lengths[row] < lengths[p + row]
                else 0.5
                if lengths[row] == lengths[p + row]
                else 0.0
            )
            pid = stream.data.problem_ids[i] if stream.data.problem_ids else ""
            rows.append(
                (bool(means[row] > means[p + row]), shorter, lengths[row], lengths[p + row], pid)
            )
    model.train(was_training)
    return rows


def summarize_pair_rows(
    rows: list[tuple[bool, float, int, int, str]], difficulty: dict | None
) -> dict[str, Any]:
    """The diagnostics report of ``critic_diagnostics`` from its pair rows."""
    from weighted_mtp.data.sampling import length_bin_label

    def accuracy(selected: list) -> dict[str, float]:
        return {
            "pairs": len(selected),
            "accuracy": sum(r[0] for r in selected) / max(1, len(selected)),
        }

    by_length: dict[str, list] = {}
    by_difficulty: dict[str, list] = {}
    bins = [0, 100, 150, 200, 300, 500, 1000, 2000]
    for row in rows:
        by_length.setdefault(length_bin_label((row[2] + row[3]) // 2, bins), []).append(row)
        level = difficulty.get(row[4]) if difficulty else None
        by_difficulty.setdefault(str(level), []).append(row)
    n = max(1, len(rows))
    return {
        "pairs": len(rows),
        "pair_accuracy": sum(r[0] for r in rows) / n,
        "length_only_accuracy": sum(r[1] for r in rows) / n,
        "mean_length_correct": sum(r[2] for r in rows) / n,
        "mean_length_incorrect": sum(r[3] for r in rows) / n,
        "by_length_bin": {k: accuracy(v) for k, v in sorted(by_length.items())},
        "by_difficulty": {k: accuracy(v) for k, v in sorted(by_difficulty.items())},
    }
