"""Control arms (docs/METHOD.md §6): the same amount of weight moved to other tokens, applied
once, by ``Weighting.weigh``, to whatever a weighting returns, so every weighting has them.

``shuffled`` permutes each row's weights among that row's target tokens; ``random_matched``
draws every target's weight i.i.d. from the micro-batch's own weights. Dense weights are moved
before the forward pass (and their normaliser recomputed from the moved weights); a
``weight_fn`` (weights from the policy's own CE, Rho-1) is wrapped so that each head's weights
are moved as soon as they are computed. Random draws come from ``control_generator(seed, step,
micro-batch, stream)``, a pure function, so a resumed run draws what an uninterrupted one does:
stream 0 (training) / 1 (validation) for dense weights, 1 / 2 for weight functions (the
streams ``Verifiable`` and ``Rho1`` used when each applied its own control arm, docs/DECISIONS.md
2026-12-07).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from weighted_mtp.data.collate import IGNORE_INDEX
from weighted_mtp.train.mtp_loss import WeightFn, head_denominators, head_weight_fn

CONTROLS = ("none", "shuffled", "random_matched")
DENSE_STREAMS = (0, 1)
"""Generator streams of dense weights: (training, validation)."""
FN_STREAMS = (1, 2)
"""Generator streams of weight functions: (training, validation)."""

Observer = Callable[[Tensor], None]
"""Receives head 1's weights on a training micro-batch's targets, after the control arm."""


def control_generator(seed: int, step: int, micro: int, stream: int = 0) -> torch.Generator:
    """CPU generator for a control arm, a pure function of (seed, step, micro-batch, stream),
    so a resumed run draws the same weights as an uninterrupted one."""
    generator = torch.Generator()
    generator.manual_seed(hash((seed, step, micro, stream)) & (2**63 - 1))
    return generator


def apply_control(
    weights: Tensor, mask: Tensor, control: str, generator: torch.Generator
) -> Tensor:
    """Control arms that keep how much weight there is and change where it goes.

    ``shuffled``: each row's weights are permuted among that row's response tokens (each
    row keeps its multiset of weights). ``random_matched``: every response token of the
    micro-batch draws a weight i.i.d., with replacement, from the micro-batch's valid
    weights (the empirical distribution is kept in expectation, the per-token link is cut).
    Masked positions keep weight 0.
    """
    if control == "none":
        return weights
    m = mask.to(torch.bool)
    w, mc = weights.detach().cpu(), m.cpu()
    if control == "shuffled":
        length = w.shape[1]
        pos = torch.arange(length).expand_as(w)
        # Valid positions first (ascending), then a random order of the valid positions.
        targets = torch.argsort(torch.where(mc, pos, pos + length), dim=1, stable=True)
        keys = torch.rand(w.shape, generator=generator).masked_fill(~mc, 2.0)
        sources = torch.argsort(keys, dim=1, stable=True)
        out = torch.zeros_like(w).scatter_(1, targets, w.gather(1, sources))
    elif control == "random_matched":
        out, valid = torch.zeros_like(w), w[mc]
        if valid.numel():
            out[mc] = valid[torch.randint(valid.numel(), (valid.numel(),), generator=generator)]
    else:
        raise ValueError(f"unknown control {control!r} ({' | '.join(CONTROLS)})")
    return out.to(weights.device) * m.float()


def move_dense(dense: Tensor, mask: Tensor, control: str, seed: int, micro: Any) -> Tensor:
    """Dense target-indexed weights ``[B, L]`` or ``[B, L, n]`` moved by ``control``; every head
    of a ``[B, L, n]`` tensor draws the same numbers, so a target's weights move together."""
    stream = DENSE_STREAMS[0 if micro.training else 1]

    def moved(w: Tensor) -> Tensor:
        generator = control_generator(seed, micro.step, micro.index, stream)
        return apply_control(w, mask, control, generator)

    if dense.dim() == 2:
        return moved(dense)
    return torch.stack([moved(dense[..., h]) for h in range(dense.shape[-1])], dim=-1)


def _moved_fn(
    inner: WeightFn, shape: torch.Size, control: str, seed: int, micro: Any,
    observe: Observer | None,
) -> WeightFn:  # fmt: skip
    stream = FN_STREAMS[0 if micro.training else 1]

    def fn(head: int, ce: Tensor, batch_idx: Tensor, target_pos: Tensor) -> Tensor:
        w = inner(head, ce, batch_idx, target_pos)
        if control != "none":  # the same draws for every head: heads sharing targets agree
            full = torch.zeros(shape, dtype=torch.float32, device=w.device)
            valid = torch.zeros_like(full)
            full[batch_idx, target_pos] = w.float()
            valid[batch_idx, target_pos] = 1.0
            generator = control_generator(seed, micro.step, micro.index, stream)
            w = apply_control(full, valid, control, generator)[batch_idx, target_pos]
        if head == 0 and observe is not None:
            observe(w)
        return w

    return fn


def apply_arm(
    weights: Any,
    labels: Tensor,
    n_heads: int,
    micro: Any,
    *,
    control: str,
    seed: int,
    normalization: str,
    observe: Observer | None = None,
) -> Any:
    """``weights`` (a ``MicroWeights``) under the control arm ``control``, with ``observe``
    given head 1's weights as the loss will use them (training micro-batches; statistics then
    describe the moved weights). Heads whose weights are dense get their denominators
    recomputed from the moved weights with ``normalization`` (``Weighting.dense_weights``);
    heads with a weight function keep the weighting's own."""
    if control not in CONTROLS:
        raise ValueError(f"unknown control {control!r} ({' | '.join(CONTROLS)})")
    fn = weights.weight_fn
    out = weights
    if control != "none" and weights.dense is not None:
        mask = labels != IGNORE_INDEX
        dense = move_dense(weights.dense, mask, control, seed, micro)
        recomputed = head_denominators(labels, dense, n_heads, normalization)
        dens = weights.denominators.clone()
        for head in range(n_heads):
            if head_weight_fn(fn, head) is None:
                dens[head] = recomputed[head]
        out = dataclasses.replace(out, dense=dense, denominators=dens)
    if fn is not None and (control != "none" or observe is not None):
        if callable(fn):
            wrapped: WeightFn | Sequence[WeightFn | None] = _moved_fn(
                fn, labels.shape, control, seed, micro, observe
            )
        else:
            wrapped = [
                _moved_fn(f, labels.shape, control, seed, micro, observe) if f else None for f in fn
            ]
        out = dataclasses.replace(out, weight_fn=wrapped)
    if observe is not None and head_weight_fn(fn, 0) is None:
        mask = labels != IGNORE_INDEX
        dense = out.dense
        if dense is None:
            observe(torch.ones(int(mask.sum()), device=labels.device))
        else:
            observe((dense if dense.dim() == 2 else dense[..., 0])[mask])
    return out
