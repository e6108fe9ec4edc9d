"""Verifiable Critic weights (docs/METHOD.md §4): GAE of a frozen critic's values, whitened
with an EMA of the advantage statistics, ``clamp(exp(A_hat / beta), clip_min, clip_max)``."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from weighted_mtp.config import VerifiableConfig
from weighted_mtp.data.collate import IGNORE_INDEX
from weighted_mtp.train.distributed import all_reduce_sum
from weighted_mtp.train.placement import TokenScores
from weighted_mtp.train.weighting.base import BuildContext, Micro, MicroWeights
from weighted_mtp.train.weighting.frozen import FrozenHelperWeighting
from weighted_mtp.train.weighting.precompute import Precompute

if TYPE_CHECKING:
    from weighted_mtp.data.dataset import BatchStream


def gae_advantages(
    values: Tensor, mask: Tensor, gamma: float, lam: float, initial_value: float = 0.5
) -> Tensor:
    """GAE of docs/METHOD.md §4, exactly, vectorised in fp32: ``[B, L]`` in, ``[B, L]`` out.

    ``delta_t = gamma * v_t - v_{t-1}`` (``v_{-1} = initial_value``), zeroed after the row's
    last response position ``T_b``; ``A_t = sum_{s >= t} (gamma * lam)^(s - t) * delta_s``
    (the reverse recursion ``A_t = delta_t + gamma * lam * A_{t+1}``, as one product with the
    upper-triangular Toeplitz matrix), then ``A * m``. No lambda = 1 shortcut: lambda = 1
    follows the same recursion.
    A row without a response token gives zeros; left or right padding: the mask decides.
    """
    v = values.float()
    m = mask.to(torch.bool)
    length = v.shape[-1]
    prev = torch.cat([torch.full_like(v[:, :1], initial_value), v[:, :-1]], dim=1)
    delta = gamma * v - prev
    pos = torch.arange(length, device=v.device)
    last = torch.where(m, pos, torch.full_like(pos, -1)).amax(dim=1, keepdim=True)
    delta = torch.where(pos <= last, delta, torch.zeros((), device=v.device))
    # U[s, t] = c^(s - t) for s >= t; far powers underflow to 0, which is harmless.
    lag = pos.view(-1, 1) - pos.view(1, -1)
    decay = torch.pow(
        torch.tensor(gamma * lam, dtype=torch.float32, device=v.device), lag.clamp(min=0).float()
    )
    toeplitz = torch.where(lag >= 0, decay, torch.zeros((), device=v.device))
    return (delta @ toeplitz) * m.float()


def masked_batch_stats(adv: Tensor, mask: Tensor) -> tuple[float, float] | None:
    """Masked mean and Bessel-corrected std of ``adv`` (docs/METHOD.md §4, no external stats);
    None when at most one token is valid."""
    valid = adv[mask.to(torch.bool)].double()
    if valid.numel() <= 1:
        return None
    return float(valid.mean()), float(valid.std(unbiased=True))


def td_weights(
    adv: Tensor,
    mask: Tensor,
    stats: tuple[float, float] | None,
    *,
    beta: float,
    clip_min: float,
    clip_max: float,
) -> Tensor:
    """``clamp(exp(((A - mu) / (sigma + 1e-8)) / beta), clip_min, clip_max) * m``
    (docs/METHOD.md §4), fp32 ``[B, L]``; ``stats=None`` (no statistics at all) gives
    ``1 * m``."""
    m = mask.to(torch.bool).float()
    if stats is None:
        return m
    mean, std = stats
    whitened = (adv.float() - mean) / (std + 1e-8)
    return torch.exp(whitened / beta).clamp(clip_min, clip_max) * m


class AdvantageEMA:
    """EMA of the advantage statistics (docs/METHOD.md §4), updated once per optimizer step.

    ``accumulate`` adds a micro-batch's masked ``S1 = sum A``, ``S2 = sum A^2`` and ``N``;
    ``update`` all-reduces them over ranks (every rank joins, even with ``N = 0``), skips
    the step when the global ``N`` is 0, and folds the step's population mean and second
    moment into the EMA. ``rule="bias_corrected"`` [REC]: EMA of the first and second
    moments with Adam-style bias correction, ``sigma = sqrt(max(m2_hat - m1_hat^2, 1e-8))``
    (step 1 returns the step's own statistics). ``rule="upstream"``: the upstream warmup
    blend of mean and sigma (``omega = (s - 1) / warmup`` for ``s <= warmup``).
    ``stats()`` is None before the first update.
    """

    def __init__(self, momentum: float, rule: str, warmup: int):
        if rule not in ("bias_corrected", "upstream"):
            raise ValueError(f"unknown EMA rule {rule!r} (bias_corrected | upstream)")
        self.momentum, self.rule, self.warmup = momentum, rule, warmup
        self.m1, self.m2 = 0.0, 0.0  # bias_corrected: raw EMAs of E[A] and E[A^2]
        self.mean, self.std = 0.0, 1.0  # upstream: smoothed mean and sigma
        self.steps = 0
        self._sums: Tensor | None = None  # fp64 [S1, S2, N] of the current step

    def accumulate(self, adv: Tensor, mask: Tensor) -> None:
        valid = adv[mask.to(torch.bool)].double()
        part = torch.stack([valid.sum(), (valid * valid).sum(), valid.new_tensor(valid.numel())])
        self._sums = part if self._sums is None else self._sums + part

    def _step_sums(self) -> Tensor:
        if self._sums is not None:
            return self._sums
        device = torch.device("cpu")
        if dist.is_initialized() and dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        return torch.zeros(3, dtype=torch.float64, device=device)

    def update(self) -> None:
        sums = all_reduce_sum(self._step_sums().clone())
        self._sums = None
        s1, s2, n = (float(x) for x in sums.cpu())
        if n == 0:
            return
        mean_b, sq_b = s1 / n, s2 / n
        self.steps += 1
        if self.rule == "bias_corrected":
            a = self.momentum
            self.m1 = (1 - a) * self.m1 + a * mean_b
            self.m2 = (1 - a) * self.m2 + a * sq_b
            return
        std_b = math.sqrt(max(sq_b - mean_b * mean_b, 1e-8))
        keep = (self.steps - 1) / self.warmup if self.steps <= self.warmup else 1 - self.momentum
        self.mean = keep * self.mean + (1 - keep) * mean_b
        self.std = keep * self.std + (1 - keep) * std_b

    def stats(self) -> tuple[float, float] | None:
        if self.steps == 0:
            return None
        if self.rule == "upstream":
            return self.mean, self.std
        correction = 1 - (1 - self.momentum) ** self.steps
        m1, m2 = self.m1 / correction, self.m2 / correction
        return m1, math.sqrt(max(m2 - m1 * m1, 1e-8))

    def state_dict(self) -> dict:
        keys = ("m1", "m2", "mean", "std", "steps", "momentum", "rule", "warmup")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self._sums = None


class Verifiable(FrozenHelperWeighting):
    """Verifiable Critic weights (docs/METHOD.md §4): GAE of a frozen critic's values, whitened
    with EMA statistics, ``clamp(exp(A_hat / beta), clip_min, clip_max)``, target-indexed
    ``[B, L]``.

    ``weigh`` computes a micro-batch's weights from the statistics from BEFORE this step and,
    for a training micro-batch, adds its advantage sums to the step's; ``end_step`` updates
    the EMA once, from all micro-batches and all ranks. At step 1 (no statistics yet) each
    micro-batch is whitened by its own masked mean and Bessel std. Validation
    (``micro.training`` False) uses the frozen training statistics and updates nothing.
    """

    name = "verifiable"
    Settings = VerifiableConfig
    scores_tokens = True
    stat_names = ("n", "w", "w2", "clip_low", "clip_high", "adv", "adv2", "entropy", "entropy_n")
    settings: VerifiableConfig

    signal = ("critic_values", "values")

    def __init__(
        self,
        settings: VerifiableConfig | None = None,
        *,
        helper_model: Callable[[Tensor], Tensor] | None = None,
        precompute: Precompute | None = None,
        normalization: str = "weight_sum",
        control: str = "none",
        seed: int = 0,
    ) -> None:
        super().__init__(settings, helper_model=helper_model, precompute=precompute,
                         normalization=normalization, control=control, seed=seed)  # fmt: skip
        s = self.settings
        self.ema = AdvantageEMA(s.ema_momentum, s.ema_rule, s.ema_warmup)

    @classmethod
    def load_helper(cls, ckpt: Path, ctx: BuildContext) -> Callable[[Tensor], Tensor]:
        from weighted_mtp.train.checkpoint import load_critic

        return load_critic(ckpt, ctx.layout, ctx.dtype, ctx.device)

    def helper_signal(
        self, stream: BatchStream, device: torch.device, batch_size: int
    ) -> list[Tensor]:
        return critic_values_for(stream, self.helper_model, device, batch_size)

    def values(self, batch: Any) -> Tensor:
        if "values" in batch.extras:
            return batch.extras["values"].float()
        if self.helper_model is None:
            raise ValueError("Verifiable without a critic needs batch.extras['values']")
        with torch.no_grad():
            return self.helper_model(batch.tokens).float()

    def advantages(self, batch: Any) -> tuple[Tensor, Tensor]:
        s, mask = self.settings, batch.labels != IGNORE_INDEX
        adv = gae_advantages(self.values(batch), mask, s.gamma, s.td_lambda, s.initial_value)
        return adv, mask

    def weights(self, batch: Any, n_heads: int, micro: Micro) -> MicroWeights:
        adv, mask = self.advantages(batch)
        s = self.settings
        stats = self.ema.stats() or masked_batch_stats(adv, mask)
        w = td_weights(adv, mask, stats, beta=s.beta, clip_min=s.clip_min, clip_max=s.clip_max)
        if micro.training:  # the EMA sees the true advantages, whatever the control arm
            self.ema.accumulate(adv, mask)
            valid_a = adv[mask].double().cpu()
            self.add(adv=float(valid_a.sum()), adv2=float((valid_a**2).sum()))
        return self.dense_weights(batch, w, n_heads)

    def token_scores(self, batch: Any, policy_ce: Tensor | None = None) -> TokenScores | None:
        """Rankings (docs/METHOD.md §6, "Where the weight goes"): ``adv_abs`` = ``|Â|`` (the token whose weight departs
        most from 1), ``adv_min`` = ``-Â`` (the smallest weight), ``delta_min`` = ``-delta``
        (the largest one-step drop of the critic's value), all unclipped; weights: the clipped TD
        weights validation uses, before any control arm."""
        s = self.settings
        values = self.values(batch)
        adv, mask = self.advantages(batch)
        m = mask.float()
        stats = self.ema.stats() or masked_batch_stats(adv, mask) or (0.0, 1.0)
        whitened = (adv.float() - stats[0]) / (stats[1] + 1e-8) * m
        prev = torch.cat([torch.full_like(values[:, :1], s.initial_value), values[:, :-1]], dim=1)
        delta = (s.gamma * values - prev) * m
        w = td_weights(adv, mask, stats, beta=s.beta, clip_min=s.clip_min, clip_max=s.clip_max)
        return TokenScores(
            {"adv_abs": whitened.abs(), "adv_min": -whitened, "delta_min": -delta}, w
        )

    def end_step(self) -> None:
        self.ema.update()  # every rank, every step: the all-reduce is collective

    def observe_weights(self, weights: Tensor) -> None:
        """Statistics of the weights the loss uses (after the control arm)."""
        valid_w = weights.double().cpu()
        tol, total = 1e-6, float(valid_w.sum())
        entropy = {}
        if valid_w.numel() > 1 and total > 0:
            p = valid_w / total
            h = float(-(p * torch.log(p.clamp_min(1e-300))).sum())
            entropy = {"entropy": h / math.log(valid_w.numel()), "entropy_n": 1.0}
        self.add(
            n=valid_w.numel(), w=total, w2=float((valid_w**2).sum()),
            clip_low=float((valid_w <= self.settings.clip_min * (1 + tol)).sum()),
            clip_high=float((valid_w >= self.settings.clip_max * (1 - tol)).sum()),
            **entropy,
        )  # fmt: skip

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """The step's training micro-batches over all ranks; ``verifiable/ema_*`` after the update.

        ``verifiable/weight_entropy_norm``: per micro-batch, the entropy of ``p = w / sum w`` over its
        valid tokens divided by ``log N`` (1 = uniform weights), averaged over micro-batches.
        """
        out: dict[str, float] = {}
        stats = self.ema.stats()
        if stats is not None:
            out.update({"verifiable/ema_mean": stats[0], "verifiable/ema_std": stats[1]})
        n = sums["n"]
        if n > 0:
            w_mean, a_mean = sums["w"] / n, sums["adv"] / n
            out.update({
                "verifiable/weight_mean": w_mean,
                "verifiable/weight_std": math.sqrt(max(sums["w2"] / n - w_mean**2, 0.0)),
                "verifiable/clip_low_frac": sums["clip_low"] / n,
                "verifiable/clip_high_frac": sums["clip_high"] / n,
                "verifiable/adv_mean": a_mean,
                "verifiable/adv_std": math.sqrt(max(sums["adv2"] / n - a_mean**2, 0.0)),
            })  # fmt: skip
        if sums["entropy_n"]:
            out["verifiable/weight_entropy_norm"] = sums["entropy"] / sums["entropy_n"]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ema" in state:
            self.ema.load_state_dict(state["ema"])


def critic_values_for(
    stream: BatchStream, critic: Callable[[Tensor], Tensor], device: torch.device, batch_size: int
) -> list[Tensor]:
    """The frozen critic's values ``v_t`` of every training example, computed once (1-D fp32,
    one per example, its full length); store them as ``stream.extras["values"]`` so that
    ``Verifiable`` reads them instead of running the critic every step."""
    examples = stream.data.examples
    out: list[Tensor] = []
    for start in range(0, len(examples), batch_size):
        chosen = list(range(start, min(start + batch_size, len(examples))))
        batch = stream.collate(chosen).to(device)
        with torch.no_grad():
            values = critic(batch.tokens).float().cpu()
        out.extend(values[row, : examples[i].length].clone() for row, i in enumerate(chosen))
    return out


CriticTD = Verifiable
"""The class's name before 2026-12-07 (the weighting ``critic_td``), kept for old imports."""
