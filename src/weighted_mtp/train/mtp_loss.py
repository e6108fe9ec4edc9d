"""The weighted multi-token-prediction (MTP) cross-entropy, memory-efficient, and its naive
reference (docs/METHOD.md §1, §2).

Conventions: ``labels[b, j]`` is the token on response positions and ``IGNORE_INDEX``
elsewhere; head ``k`` (1-based) at input position ``t`` is scored against target ``j = t + k``;
``M_k[b, j] = labels[b, j] != IGNORE_INDEX and j >= k``. Weights are target-indexed ``W[b, j, k-1]``
(a 2-D ``[B, L]`` weight applies to every head) and masked targets weigh 0 whatever W says.

    L = sum_k c_k * sum_{b,j} W[b,j,k] M_k[b,j] ce_k[b,j] / (den_k + eps)

``den_k`` is summed over a whole optimizer step (``head_denominators`` per micro-batch, added up
and all-reduced by the loop), so a step's gradient does not depend on how it is split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weighted_mtp.data.collate import IGNORE_INDEX

EPS = 1e-8

#: ``(head_index, ce [rows] fp32 detached, batch_idx [rows], target_pos [rows]) -> weights [rows]``
WeightFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]
Denominators = Tensor | Sequence[float | None] | None


@dataclass
class MTPLossOutput:
    """Detached results of one micro-batch; per-head fields are fp32 ``[n]``."""

    loss: Tensor  # scalar: the value of L (what was back-propagated)
    weighted_ce_sum: Tensor  # sum W*M*ce
    ce_sum: Tensor  # sum M*ce (unweighted)
    n_tokens: Tensor  # sum M
    weight_sum: Tensor  # sum W*M (the weights actually used, weight_fn's when given)


def target_weights(labels: Tensor, weights: Tensor | None, n_heads: int) -> Tensor:
    """Dense target-indexed weights ``[B, L, n]`` fp32 with every masked target set to 0."""
    bsz, length = labels.shape
    if weights is None:
        w = torch.ones(bsz, length, n_heads, device=labels.device)
    elif weights.dim() == 2:
        w = weights.float().unsqueeze(-1).expand(bsz, length, n_heads)
    else:
        w = weights.float()
    if w.shape != (bsz, length, n_heads):
        raise ValueError(f"weights must be [B, L] or [B, L, n]; got {tuple(weights.shape)}")
    mask = (labels != IGNORE_INDEX).unsqueeze(-1).expand(bsz, length, n_heads).clone()
    for k in range(1, n_heads + 1):
        mask[:, : min(k, length), k - 1] = False  # target j < k has no input position t >= 0
    return torch.where(mask, w, torch.zeros((), device=w.device))


def head_denominators(
    labels: Tensor, weights: Tensor | None, n_heads: int, mode: str = "weight_sum"
) -> Tensor:
    """Per-head normaliser of one micro-batch, fp32 ``[n]``: sum of W*M ("weight_sum") or of
    M ("token_count", the upstream convention). Sum over micro-batches and ranks of a step."""
    if mode == "weight_sum":
        return target_weights(labels, weights, n_heads).sum(dim=(0, 1))
    if mode == "token_count":
        return target_weights(labels, None, n_heads).sum(dim=(0, 1))
    raise ValueError(f"unknown normalisation mode {mode!r} (weight_sum | token_count)")


def valid_rows(labels: Tensor, head: int) -> tuple[Tensor, Tensor]:
    """``(batch_idx, target_pos)`` of every valid target of head ``head`` (1-based); the input
    position is ``target_pos - head``. Only these rows ever reach the LM head."""
    b_idx, t_idx = (labels[:, head:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return b_idx, t_idx + head


def per_token_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """fp32 cross-entropy per row (logits up-cast first); ``IGNORE_INDEX`` targets give 0."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


def _denominator_list(denominators: Denominators, n_heads: int) -> list[float]:
    # NaN stands for "normalise by this micro-batch's own weight sum of that head".
    if denominators is None:
        return [math.nan] * n_heads
    if isinstance(denominators, Tensor):
        values = [float(v) for v in denominators.detach().float().cpu()]
    else:
        values = [math.nan if v is None else float(v) for v in denominators]
    if len(values) != n_heads:
        raise ValueError(f"expected {n_heads} denominators, got {len(values)}")
    return values


def head_weight_fn(
    weight_fn: WeightFn | Sequence[WeightFn | None] | None, head: int
) -> WeightFn | None:
    """The weight function of head ``head`` (0-based): the shared one, or its own entry."""
    if weight_fn is None or callable(weight_fn):
        return weight_fn
    return weight_fn[head]


def _chunk_bounds(
    n_rows: int, chunk_rows: int, n_chunks: int | None = None
) -> list[tuple[int, int]]:
    # One empty chunk when there is no valid row, so that the shared norm/output still run
    # (zero gradients rather than None, and the same module calls on every rank). Under FSDP
    # every rank must call the sharded norm/output the same number of times, so the caller
    # can fix ``n_chunks`` from the largest row count of all ranks (trailing chunks empty).
    if n_chunks is None:
        n_chunks = max(1, -(-n_rows // chunk_rows))
    return [
        (min(i * chunk_rows, n_rows), min((i + 1) * chunk_rows, n_rows)) for i in range(n_chunks)
    ]


def mtp_forward_backward(
    model: nn.Module,
    tokens: Tensor,
    labels: Tensor,
    weights: Tensor | None,
    denominators: Denominators,
    coefficients: Sequence[float],
    *,
    chunk_rows: int = 4096,
    backward: bool = True,
    weight_fn: WeightFn | Sequence[WeightFn | None] | None = None,
    eps: float = EPS,
    n_heads: int | None = None,
    n_chunks: Sequence[int] | None = None,
) -> MTPLossOutput:
    """Weighted MTP loss of one micro-batch, forward and (if ``backward``) backward, head by
    head (docs/METHOD.md §1): the trunk runs once; each head's block, the shared norm/output and
    an fp32 CE run only on rows with a valid target, ``chunk_rows`` rows at a time, each chunk
    back-propagated at once, so at most one chunk of ``[rows, V]`` logits is alive and peak
    memory does not grow with the number of heads. Gradients accumulate into ``.grad``.

    ``weights``: ``[B, L]`` or ``[B, L, n]`` target-indexed, or None (all ones).
    ``denominators``: per-head step totals from ``head_denominators`` (a tensor or a sequence).
    An entry that is None/NaN (or ``denominators=None`` for all heads) means "divide by this
    micro-batch's own weight sum of that head": per-micro-batch normalisation, e.g. for
    validation or for ``weight_fn`` heads; to average such means over ``m`` micro-batches (and
    ranks) scale ``coefficients`` by ``1/m`` (they compose with the token weights).
    ``weight_fn``: a callable (every head) or a per-head sequence of optional callables,
    ``fn(head_index_0_based, ce, batch_idx, target_pos) -> weights [rows]``, for weights that
    depend on the policy's own detached per-token CE (Rho-1 excess loss). For such a head a
    no-grad pass computes ``ce`` of all its valid rows first; the returned weights REPLACE
    ``weights`` for that head (look other weights up through ``batch_idx, target_pos``), and
    their sum is ``weight_sum[head]``. Pass a finite denominator for that head (e.g. the
    step's expected selected count) or NaN to use that sum.

    With ``backward=False`` the same numbers are computed without graphs (validation).
    """
    # ``n_heads`` < the model's heads trains the first heads only (head 1 alone: the NTP control).
    n_heads = n_heads or model.n_future_tokens
    if len(coefficients) != n_heads:
        raise ValueError(f"expected {n_heads} coefficients, got {len(coefficients)}")
    if backward and not torch.is_grad_enabled():
        raise RuntimeError("backward=True under torch.no_grad(): pass backward=False")
    dens = _denominator_list(denominators, n_heads)
    dense_w = target_weights(labels, weights, n_heads)
    stats = torch.zeros(4, n_heads, device=labels.device)  # weighted, ce, count, weight sum
    loss = torch.zeros((), device=labels.device)
    with nullcontext() if backward else torch.no_grad():
        z = model.trunk(tokens)
        train_trunk = backward and z.requires_grad
        z_leaf = z.detach().requires_grad_() if train_trunk else z
        run = _HeadPass(model, z_leaf, labels, dense_w, chunk_rows, backward, eps, stats)
        for head in range(n_heads):
            loss = loss + run.head(
                head, dens[head], coefficients[head], head_weight_fn(weight_fn, head),
                n_chunks[head] if n_chunks is not None else None,
            )  # fmt: skip
        if train_trunk and z_leaf.grad is not None:
            z.backward(z_leaf.grad)
    return MTPLossOutput(loss.detach(), *stats.unbind(0))


@dataclass
class _HeadPass:
    """What every head of one micro-batch shares; ``head()`` runs one head."""

    model: nn.Module
    z_leaf: Tensor  # the trunk output (a detached leaf when the trunk trains)
    labels: Tensor
    dense_w: Tensor  # [B, L, n] target-indexed, masked
    chunk_rows: int
    backward: bool
    eps: float
    stats: Tensor  # [4, n]: weighted CE, CE, count, weight sum; filled per head

    def head(
        self, head: int, den: float, coef: float, fn: WeightFn | None, n_chunks: int | None
    ) -> Tensor:
        """Head ``head``'s (0-based) forward/backward; fills ``stats[:, head]`` and returns its
        detached loss. ``den`` NaN: this micro-batch's own weight sum."""
        b_idx, j_idx = valid_rows(self.labels, head + 1)
        targets = self.labels[b_idx, j_idx]
        y = self.model.head_hidden(self.z_leaf, head)  # [B, L, d]; attention needs every position
        train_head = self.backward and y.requires_grad
        rows = y.detach()[b_idx, j_idx - (head + 1)]  # [R, d], the hidden states that predict
        bounds = _chunk_bounds(rows.shape[0], self.chunk_rows, n_chunks)
        if fn is None:
            w = self.dense_w[b_idx, j_idx, head]
        else:
            with torch.no_grad():  # first, cheap pass: the policy's own CE for the weighting
                ce = torch.cat(
                    [per_token_ce(self.model.unembed(rows[s:e]), targets[s:e]) for s, e in bounds]
                )
            w = fn(head, ce, b_idx, j_idx).detach().float().reshape(-1)
            if w.shape != targets.shape:
                raise ValueError(
                    f"weight_fn returned {tuple(w.shape)}, expected {tuple(targets.shape)}"
                )
        w_sum = w.sum()
        scale = coef / ((w_sum if math.isnan(den) else den) + self.eps)
        row_grad = torch.zeros_like(rows) if train_head else None
        weighted = rows.new_zeros((), dtype=torch.float32)
        plain = rows.new_zeros((), dtype=torch.float32)
        for s, e in bounds:
            chunk = rows[s:e].detach().requires_grad_(train_head)
            # Inline so the [rows, V] logits are freed once log-softmax has consumed them.
            ce = per_token_ce(self.model.unembed(chunk), targets[s:e])
            chunk_loss = (w[s:e] * ce).sum() * scale
            if self.backward and chunk_loss.requires_grad:
                chunk_loss.backward()  # frees this chunk's logits now
                if train_head:
                    row_grad[s:e] = chunk.grad
            weighted = weighted + (w[s:e] * ce).sum().detach()
            plain = plain + ce.sum().detach()
        if train_head:
            # One backward through the head block, with the gradients of its gathered rows.
            y_rows = y[b_idx, j_idx - (head + 1)]
            y_rows.backward(row_grad)
        self.stats[:, head] = torch.stack(
            [weighted, plain, w.new_tensor(float(len(targets))), w_sum]
        )
        return (weighted * scale).detach()


def naive_mtp_loss(
    model: nn.Module,
    tokens: Tensor,
    labels: Tensor,
    weights: Tensor | None,
    denominators: Denominators,
    coefficients: Sequence[float],
    eps: float = EPS,
    n_heads: int | None = None,
) -> Tensor:
    """Reference: the same L from the full ``[B, L, n, V]`` logits of ``model(tokens)``, with
    plain autograd (tests and the benchmark's baseline). None/NaN denominators mean this
    micro-batch's weight sum, as in ``mtp_forward_backward``; ``n_heads`` likewise."""
    logits = model(tokens)
    length = logits.shape[1]
    n_heads = n_heads or logits.shape[2]
    dens = _denominator_list(denominators, n_heads)
    dense_w = target_weights(labels, weights, n_heads)
    loss = logits.new_zeros((), dtype=torch.float32)
    for head in range(n_heads):
        k = head + 1
        if k >= length:
            continue
        ce = per_token_ce(logits[:, : length - k, head].flatten(0, 1), labels[:, k:].flatten())
        w = dense_w[:, k:, head].flatten()
        den = w.sum() if math.isnan(dens[head]) else dens[head]
        loss = loss + coefficients[head] * (w * ce).sum() / (den + eps)
    return loss
