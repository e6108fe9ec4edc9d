"""Per-token weights behind one interface: ``Uniform``, ``Rho1`` and ``CriticTD``.

A weighting tells the objective three things about a micro-batch: the per-head normaliser it
contributes to the optimizer step (summed over micro-batches and ranks by the loop), dense
target-indexed weights ``W[b, j, k]`` when they are known before the forward pass, and a
``weight_fn`` when they depend on the policy's own per-token loss (Rho-1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from weighted_mtp.train.distributed import all_reduce_sum
from weighted_mtp.train.objectives import IGNORE_INDEX, WeightFn, head_denominators


class Weighting(Protocol):
    name: str

    def denominators(self, batch: Any, n_heads: int) -> Tensor: ...
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

    def denominators(self, batch: Any, n_heads: int) -> Tensor:
        return head_denominators(batch.labels, None, n_heads, self.normalization)

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
        control: str = "none",
        seed: int = 0,
    ):
        self.reference = reference
        self.k_percent = k_percent
        self.score = score
        self.normalization = normalization
        self.control = control
        self.seed = seed
        self.step = 0
        self._micro = 0
        self._selected_sum = 0.0
        self._valid_sum = 0.0

    def denominators(self, batch: Any, n_heads: int) -> Tensor:
        counts = head_denominators(batch.labels, None, n_heads, "token_count")
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
                if self.control != "none":  # same count of selected tokens, other places
                    valid = torch.zeros_like(selected)
                    valid[batch_idx, target_pos] = 1.0
                    generator = control_generator(self.seed, self.step, self._micro, stream=1)
                    selected.copy_(apply_control(selected, valid, self.control, generator))
                    self._micro += 1
                    chosen = selected[batch_idx, target_pos]
                self._selected_sum += float(chosen.sum())
                self._valid_sum += chosen.numel()
                return chosen
            return selected[batch_idx, target_pos]

        return fn

    def on_step_end(self) -> None:
        self.step += 1
        self._micro = 0

    def metrics(self) -> dict[str, float]:
        if not self._valid_sum:
            return {}
        fraction = self._selected_sum / self._valid_sum
        self._selected_sum = self._valid_sum = 0.0
        return {"rho1/selected_fraction": fraction}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state.get("step", 0)


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


# ---- Verifiable Critic: GAE / TD weighting (ALGORITHMS 4) ----


def gae_advantages(
    values: Tensor, mask: Tensor, gamma: float, lam: float, initial_value: float = 0.5
) -> Tensor:
    """GAE of ALGORITHMS 4.2, exactly, vectorised in fp32: ``[B, L]`` in, ``[B, L]`` out.

    ``delta_t = gamma * v_t - v_{t-1}`` (``v_{-1} = initial_value``), zeroed after the row's
    last response position ``T_b``; ``A_t = sum_{s >= t} (gamma * lam)^(s - t) * delta_s``
    (the reverse recursion ``A_t = delta_t + gamma * lam * A_{t+1}``, as one product with the
    upper-triangular Toeplitz matrix of 4.7), then ``A * m``. No lambda = 1 shortcut (A13).
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
    """Masked mean and Bessel-corrected std of ``adv`` (ALGORITHMS 4.3, no external stats);
    None when at most one token is valid."""
    valid = adv[mask.to(torch.bool)].double()
    if valid.numel() <= 1:
        return None
    return float(valid.mean()), float(valid.std(unbiased=True))


def td_weights(
    adv: Tensor,
    mask: Tensor,
    stats: tuple[float, float] | None,
    beta: float = 1.0,
    clip_min: float = 0.1,
    clip_max: float = 3.0,
) -> Tensor:
    """``clamp(exp(((A - mu) / (sigma + 1e-8)) / beta), clip_min, clip_max) * m`` (ALGORITHMS
    4.3), fp32 ``[B, L]``; ``stats=None`` (no statistics at all) gives ``1 * m``."""
    m = mask.to(torch.bool).float()
    if stats is None:
        return m
    mean, std = stats
    whitened = (adv.float() - mean) / (std + 1e-8)
    return torch.exp(whitened / beta).clamp(clip_min, clip_max) * m


class AdvantageEMA:
    """EMA of the advantage statistics (ALGORITHMS 4.4), updated once per optimizer step.

    ``accumulate`` adds a micro-batch's masked ``S1 = sum A``, ``S2 = sum A^2`` and ``N``;
    ``update`` all-reduces them over ranks (every rank joins, even with ``N = 0``: E11), skips
    the step when the global ``N`` is 0, and folds the step's population mean and second
    moment into the EMA. ``rule="bias_corrected"`` [REC]: EMA of the first and second
    moments with Adam-style bias correction, ``sigma = sqrt(max(m2_hat - m1_hat^2, 1e-8))``
    (step 1 returns the step's own statistics). ``rule="upstream"``: the upstream warmup
    blend of mean and sigma (``omega = (s - 1) / warmup`` for ``s <= warmup``).
    ``stats()`` is None before the first update.
    """

    def __init__(self, momentum: float = 0.1, rule: str = "bias_corrected", warmup: int = 10):
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


CONTROLS = ("none", "shuffled", "random_matched")


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


class CriticTD:
    """Verifiable Critic weights (ALGORITHMS 4): GAE of a frozen critic's values, whitened with
    EMA statistics, ``clamp(exp(A_hat / beta), clip_min, clip_max)``, target-indexed ``[B, L]``.

    Call order per optimizer step (the loop's): ``denominators(batch)`` for each micro-batch
    before any forward pass computes the weights (with the statistics from BEFORE this step),
    caches them for ``dense_weights`` and accumulates the step's advantage sums; then
    ``on_step_end()`` updates the EMA once, from all micro-batches and all ranks. At step 1
    (no statistics yet) each micro-batch is whitened by its own masked mean and Bessel std.

    Validation freezing: statistics are accumulated only in ``denominators()`` and only while
    ``self.training`` is True. The loop's validation never calls ``denominators`` (it passes
    no denominator), so ``dense_weights`` alone computes weights with the frozen training
    statistics and updates nothing; ``with weighting.frozen():`` makes it explicit anyway.
    """

    name = "critic_td"

    def __init__(
        self,
        critic: Callable[[Tensor], Tensor] | None,
        config: Any,
        normalization: str = "weight_sum",
        *,
        control: str = "none",
        seed: int = 0,
        rule: str = "bias_corrected",
        warmup: int = 10,
        initial_value: float = 0.5,
    ):
        if control not in CONTROLS:
            raise ValueError(f"unknown control {control!r} ({' | '.join(CONTROLS)})")
        self.critic, self.normalization = critic, normalization
        self.gamma, self.lam = config.gamma, config.td_lambda
        self.beta, self.clip_min, self.clip_max = config.beta, config.clip_min, config.clip_max
        self.initial_value, self.control, self.seed = initial_value, control, seed
        self.ema = AdvantageEMA(config.ema_momentum, rule, warmup)
        self.training = True
        self.step = 0  # optimizer steps completed; seeds the control arms
        self._micro = self._uncached = 0
        self._cache: dict[int, tuple[Any, Tensor]] = {}
        self._reset_metrics()

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Weights from the current statistics; nothing accumulated (validation)."""
        before, self.training = self.training, False
        try:
            yield
        finally:
            self.training = before

    def values(self, batch: Any) -> Tensor:
        if "values" in batch.extras:
            return batch.extras["values"].float()
        if self.critic is None:
            raise ValueError("CriticTD without a critic needs batch.extras['values']")
        with torch.no_grad():
            return self.critic(batch.tokens).float()

    def advantages(self, batch: Any) -> tuple[Tensor, Tensor]:
        mask = batch.labels != IGNORE_INDEX
        adv = gae_advantages(self.values(batch), mask, self.gamma, self.lam, self.initial_value)
        return adv, mask

    def weights(self, batch: Any, generator: torch.Generator | None = None) -> Tensor:
        """Weights of one micro-batch from the statistics available now (no side effects)."""
        adv, mask = self.advantages(batch)
        return self._weights(adv, mask, generator)

    def _weights(self, adv: Tensor, mask: Tensor, generator: torch.Generator | None) -> Tensor:
        stats = self.ema.stats() or masked_batch_stats(adv, mask)
        w = td_weights(adv, mask, stats, self.beta, self.clip_min, self.clip_max)
        if self.control != "none":
            w = apply_control(
                w, mask, self.control, generator or control_generator(self.seed, 0, 0)
            )
        return w

    def denominators(self, batch: Any, n_heads: int) -> Tensor:
        adv, mask = self.advantages(batch)
        generator = control_generator(self.seed, self.step, self._micro, stream=0)
        self._micro += 1
        w = self._weights(adv, mask, generator)
        self._cache[id(batch)] = (batch, w)  # holding the batch keeps its id unique
        if self.training:
            self.ema.accumulate(adv, mask)
            self._record(adv, w, mask)
        return head_denominators(batch.labels, w, n_heads, self.normalization)

    def dense_weights(self, batch: Any, n_heads: int) -> Tensor | None:
        cached = self._cache.pop(id(batch), None)
        if cached is not None and cached[0] is batch:
            return cached[1]
        # Not announced by denominators(): validation or a one-off call; nothing accumulated.
        generator = control_generator(self.seed, self.step, self._uncached, stream=1)
        self._uncached += 1
        return self.weights(batch, generator)

    def weight_fn(self, batch: Any) -> WeightFn | None:
        return None

    def on_step_end(self) -> None:
        self.ema.update()  # every rank, every step: the all-reduce is collective (E11)
        self.step += 1
        self._micro = self._uncached = 0
        self._cache.clear()

    def _reset_metrics(self) -> None:
        self._acc = torch.zeros(7, dtype=torch.float64)  # n, Sw, Sw2, low, high, SA, SA2
        self._entropy_sum, self._entropy_count = 0.0, 0

    def _record(self, adv: Tensor, w: Tensor, mask: Tensor) -> None:
        valid_w = w[mask].double().cpu()
        valid_a = adv[mask].double().cpu()
        tol = 1e-6
        self._acc += torch.stack([
            valid_w.new_tensor(valid_w.numel()), valid_w.sum(), (valid_w**2).sum(),
            (valid_w <= self.clip_min * (1 + tol)).sum().double(),
            (valid_w >= self.clip_max * (1 - tol)).sum().double(),
            valid_a.sum(), (valid_a**2).sum(),
        ])  # fmt: skip
        total = float(valid_w.sum())
        if valid_w.numel() > 1 and total > 0:
            p = valid_w / total
            entropy = float(-(p * torch.log(p.clamp_min(1e-300))).sum())
            self._entropy_sum += entropy / math.log(valid_w.numel())
            self._entropy_count += 1

    def metrics(self) -> dict[str, float]:
        """This rank's training micro-batches since the last read (then reset).

        ``td/weight_entropy_norm``: per micro-batch, the entropy of ``p = w / sum w`` over its
        valid tokens divided by ``log N`` (1 = uniform weights), averaged over micro-batches.
        """
        n, sw, sw2, low, high, sa, sa2 = self._acc.tolist()
        out: dict[str, float] = {}
        stats = self.ema.stats()
        if stats is not None:
            out.update({"td/ema_mean": stats[0], "td/ema_std": stats[1]})
        if n > 0:
            w_mean, a_mean = sw / n, sa / n
            out.update({
                "td/weight_mean": w_mean,
                "td/weight_std": math.sqrt(max(sw2 / n - w_mean**2, 0.0)),
                "td/clip_low_frac": low / n,
                "td/clip_high_frac": high / n,
                "td/adv_mean": a_mean,
                "td/adv_std": math.sqrt(max(sa2 / n - a_mean**2, 0.0)),
            })  # fmt: skip
        if self._entropy_count:
            out["td/weight_entropy_norm"] = self._entropy_sum / self._entropy_count
        self._reset_metrics()
        return out

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.step = state.get("step", 0)
        self._cache.clear()


def critic_values_for(
    stream, critic: Callable[[Tensor], Tensor], device: torch.device, batch_size: int
) -> list[Tensor]:
    """The frozen critic's values ``v_t`` of every training example, computed once (1-D fp32,
    one per example, its full length); store them as ``stream.extras["values"]`` so that
    ``CriticTD`` reads them instead of running the critic every step (ALGORITHMS 4.7)."""
    examples = stream.data.examples
    out: list[Tensor] = []
    for start in range(0, len(examples), batch_size):
        chosen = list(range(start, min(start + batch_size, len(examples))))
        batch = stream.collate(chosen).to(device)
        with torch.no_grad():
            values = critic(batch.tokens).float().cpu()
        out.extend(values[row, : examples[i].length].clone() for row, i in enumerate(chosen))
    return out
