"""Per-token weights: the ``Weighting`` contract, ``Uniform``, ``Rho1``, ``CriticTD`` and the
control arms, and the registry that maps ``weighting.name`` to a class.

The contract (docs/ARCHITECTURE.md, "Contracts"): for every micro-batch the objective makes
ONE call, ``weigh(batch, n_heads, micro)``, and gets back a ``MicroWeights``: that
micro-batch's share of the step's per-head normaliser, and its target-indexed weights, either
dense (known before the forward pass) or as a ``weight_fn`` of the policy's own per-token CE
(Rho-1). The objective keeps what ``weigh`` returned next to the batch until its forward pass,
so nothing is cached inside the weighting. Statistics are sums over micro-batches (``add``),
summed over ranks by the loop, so ``metrics`` describes the whole step on every rank count.

A new weighting is one subclass (``name``, optional ``Settings`` section, ``weigh``) plus one
entry in ``WEIGHTINGS``; its knobs are then ``weighting.<name>.*`` in YAML.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from pydantic import BaseModel
from torch import Tensor

import weighted_mtp.config as config_module
from weighted_mtp.config import CriticTDConfig, Rho1Config
from weighted_mtp.data.collate import IGNORE_INDEX
from weighted_mtp.train.distributed import all_reduce_sum
from weighted_mtp.train.mtp_loss import WeightFn, head_denominators, per_token_ce, valid_rows
from weighted_mtp.train.placement import TokenScores

if TYPE_CHECKING:
    from weighted_mtp.base.layout import StorageLayout
    from weighted_mtp.data.dataset import BatchStream

CONTROLS = ("none", "shuffled", "random_matched")


@dataclass(frozen=True)
class Micro:
    """Where a micro-batch sits: the optimizer step (steps completed before it), its index
    within that step on this rank, and whether it trains. Statistics accumulate only while
    training; validation and heat-map passes use the current state and change nothing."""

    step: int = 0
    index: int = 0
    training: bool = True


@dataclass
class MicroWeights:
    """What a weighting says about one micro-batch."""

    denominators: Tensor
    """``[n]`` fp32: this micro-batch's share of the step's per-head normaliser."""
    dense: Tensor | None = None
    """``[B, L]`` (every head) or ``[B, L, n]`` target-indexed weights; None means 1."""
    weight_fn: WeightFn | Sequence[WeightFn | None] | None = None
    """Weights computed from the policy's own per-token CE during the forward pass; they
    replace ``dense`` for the heads they cover (see ``objectives.mtp_forward_backward``)."""


@dataclass
class BuildContext:
    """What a weighting may need to build itself: where its frozen helper lives, how to load
    it, and the training settings it depends on."""

    layout: StorageLayout | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    seed: int = 0
    normalization: str = "weight_sum"
    control: str = "none"
    max_length: int | None = None
    """Part of the key of precomputed signals (a different length cap, different examples)."""


class Weighting:
    """Base class of the weightings. A subclass sets ``name`` (its registry key), optionally
    ``Settings`` (a config section class: ``weighting.<name>``) and ``stat_names`` (sums it
    logs), and implements ``weigh``. Everything else has a working default:

    * ``build(settings, ctx)``: construct from the config (override to load a frozen helper);
    * ``prepare(streams, device, batch_size)``: once before training (precompute and free a
      frozen helper);
    * ``end_step()``: once per optimizer step on every rank, after the last micro-batch (may
      be a collective);
    * ``metrics(sums)``: step metrics from ``stat_names`` sums over micro-batches AND ranks;
    * ``state_dict()`` / ``load_state_dict()``: what an exact resume needs;
    * ``token_scores(batch, policy_ce)``: the scores that rank a batch's tokens and the weights
      they would get, for the placement metrics (docs/METHOD.md §6, "Where the weight goes"); a weighting that ranks
      tokens sets ``scores_tokens`` (and ``needs_policy_ce`` when its score uses the policy's
      own head-1 CE).
    """

    name: ClassVar[str] = "weighting"
    Settings: ClassVar[type[BaseModel] | None] = None
    stat_names: ClassVar[tuple[str, ...]] = ()
    scores_tokens: ClassVar[bool] = False
    needs_policy_ce: ClassVar[bool] = False

    def __init__(
        self,
        settings: BaseModel | None = None,
        *,
        normalization: str = "weight_sum",
        control: str = "none",
        seed: int = 0,
    ) -> None:
        if control not in CONTROLS:
            raise ValueError(f"unknown control {control!r} ({' | '.join(CONTROLS)})")
        if settings is None and self.Settings is not None:
            settings = self.Settings()
        self.settings = settings
        self.normalization, self.control, self.seed = normalization, control, seed
        self._sums = torch.zeros(len(self.stat_names), dtype=torch.float64)

    @classmethod
    def build(cls, settings: BaseModel | None, ctx: BuildContext) -> Weighting:
        return cls(settings, normalization=ctx.normalization, control=ctx.control, seed=ctx.seed)

    def weigh(self, batch: Any, n_heads: int, micro: Micro) -> MicroWeights:
        raise NotImplementedError

    def prepare(self, streams: list[BatchStream], device: torch.device, batch_size: int) -> None:
        return None

    def end_step(self) -> None:
        return None

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def token_scores(self, batch: Any, policy_ce: Tensor | None = None) -> TokenScores | None:
        """Rankings and weights of ``batch``'s tokens as validation would weigh them, before any
        control arm (``policy_ce``: the policy's target-indexed head-1 CE ``[B, L]`` when
        ``needs_policy_ce``); None for a weighting that does not rank tokens."""
        return None

    # ---- helpers for subclasses ----

    def dense_weights(self, batch: Any, weights: Tensor | None, n_heads: int) -> MicroWeights:
        """``MicroWeights`` for weights known before the forward pass, normalised by
        ``train.normalization`` (their sum, or the token count)."""
        return MicroWeights(
            head_denominators(batch.labels, weights, n_heads, self.normalization), weights
        )

    def add(self, **values: float) -> None:
        """Add to this step's sums (names from ``stat_names``)."""
        for key, value in values.items():
            self._sums[self.stat_names.index(key)] += float(value)

    def take_sums(self) -> Tensor:
        """This rank's sums since the last call (then reset), fp64 ``[len(stat_names)]``."""
        sums, self._sums = self._sums, torch.zeros_like(self._sums)
        return sums


def release_memory() -> None:
    """Give a dropped helper's memory back: collect cycles, empty the CUDA cache, and on glibc
    return the freed heap pages (``malloc_trim``; smaller tensors live on the heap)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Uniform(Weighting):
    """Weight 1 on every response token (Baseline, NTP, reference tuning)."""

    name = "uniform"

    def weigh(self, batch: Any, n_heads: int, micro: Micro) -> MicroWeights:
        return self.dense_weights(batch, None, n_heads)


# ---- precomputed frozen signals ----


def cached_per_example(
    cache_dir: Path | None, kind: str, key: dict, stream: BatchStream,
    compute: Callable[[], list[Tensor]],
) -> list[Tensor]:  # fmt: skip
    """Per-example 1-D signals of ``stream`` from ``<cache_dir>/<kind>/<key>.safetensors``,
    computed by ``compute()`` and stored on a miss (no cache when ``cache_dir`` is None). The
    key covers the frozen model's checkpoint and the exact data (file, sampled lines, length
    cap), so a stale cache is never read."""
    from safetensors.torch import load_file, save_file

    from weighted_mtp.base.io import atomic_path

    if cache_dir is None:
        return compute()
    payload = {**key, "file": stream.data.manifest.get("file"), "lines": stream.data.line_indices}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    path = cache_dir / kind / f"{digest[:32]}.safetensors"
    if path.is_file():
        data = load_file(path)
        return list(torch.split(data["values"], data["lengths"].tolist()))
    values = compute()
    lengths = torch.tensor([v.numel() for v in values], dtype=torch.long)
    with atomic_path(path) as tmp:
        save_file({"values": torch.cat(values).float().contiguous(), "lengths": lengths}, tmp)
    return values


@dataclass
class Precompute:
    """Where a weighting's precomputed signal goes: ``batch.extras[extra]``, cached under
    ``<cache_dir>/<kind>/`` with ``key`` (the helper's checkpoint fingerprint, length cap)."""

    kind: str
    extra: str
    key: dict
    cache_dir: Path | None = None

    def fill(
        self, streams: list[BatchStream],
        compute: Callable[[BatchStream], list[Tensor]],
    ) -> None:  # fmt: skip
        for stream in streams:
            stream.extras[self.extra] = cached_per_example(
                self.cache_dir, self.kind, self.key, stream, lambda s=stream: compute(s)
            )


def _precompute_for(
    kind: str, extra: str, helper: str, ckpt: Path, ctx: BuildContext
) -> Precompute:
    from weighted_mtp.train.checkpoint import fingerprint

    cache_dir = ctx.layout.root / "cache" if ctx.layout is not None else None
    key = {helper: fingerprint(ckpt), "max_length": ctx.max_length}
    return Precompute(kind, extra, key, cache_dir)


# ---- Rho-1 (docs/METHOD.md §5) ----


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


class Rho1(Weighting):
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

    def __init__(
        self,
        settings: Rho1Config | None = None,
        *,
        reference: torch.nn.Module | None = None,
        precompute: Precompute | None = None,
        normalization: str = "weight_sum",
        control: str = "none",
        seed: int = 0,
        chunk_rows: int = REFERENCE_CHUNK_ROWS,
    ) -> None:
        super().__init__(settings, normalization=normalization, control=control, seed=seed)
        self.reference = reference
        self.precompute = precompute
        self.chunk_rows = chunk_rows
        """Reference logit rows alive at once, per step and in precompute (``reference_ce``)."""

    @classmethod
    def build(cls, settings: Rho1Config | None, ctx: BuildContext) -> Rho1:
        from weighted_mtp.train.checkpoint import load_trained, resolve_checkpoint

        settings = settings or Rho1Config()
        if not settings.reference:
            raise ValueError("rho1 needs weighting.rho1.reference (a ref_tuning checkpoint)")
        ckpt = resolve_checkpoint(ctx.layout, settings.reference)
        reference = load_trained(ckpt, ctx.layout, dtype=ctx.dtype, device=ctx.device)
        reference.requires_grad_(False)
        precompute = _precompute_for("reference_ce", "ref_ce", "reference", ckpt, ctx)
        return cls(settings, reference=reference, precompute=precompute,
                   normalization=ctx.normalization, control=ctx.control, seed=ctx.seed)  # fmt: skip

    def prepare(self, streams: list[BatchStream], device: torch.device, batch_size: int) -> None:
        """With ``precompute``: every example's reference CE into ``batch.extras["ref_ce"]``,
        then the reference is dropped (this object held the only reference to it)."""
        if not self.settings.precompute or self.reference is None:
            return
        precompute = self.precompute or Precompute("", "ref_ce", {})
        precompute.fill(
            streams,
            lambda s: precompute_reference_ce(
                self.reference, s, device, batch_size, self.chunk_rows
            ),
        )
        self.reference = None
        release_memory()

    def _score(self, policy_ce: Tensor, ref_ce: Tensor) -> Tensor:
        if self.settings.score == "signed":
            return policy_ce - ref_ce
        if self.settings.score == "absolute":
            return (policy_ce - ref_ce).abs()
        return ref_ce  # "difficult": the reference's own loss

    def _reference_ce(self, batch: Any) -> Tensor:
        ref_ce = batch.extras.get("ref_ce")
        if ref_ce is None:
            if self.reference is None:
                raise ValueError("Rho1 without a reference needs batch.extras['ref_ce']")
            ref_ce = reference_ce(self.reference, batch.tokens, batch.labels, self.chunk_rows)
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

    def weigh(self, batch: Any, n_heads: int, micro: Micro) -> MicroWeights:
        counts = head_denominators(batch.labels, None, n_heads, "token_count")
        k = self.settings.k_percent
        ref_ce = self._reference_ce(batch)
        selected = torch.zeros_like(ref_ce)

        def fn(head: int, ce: Tensor, batch_idx: Tensor, target_pos: Tensor) -> Tensor:
            if head != 0:
                return selected[batch_idx, target_pos]
            chosen = select_top(self._score(ce, ref_ce[batch_idx, target_pos]), k)
            selected[batch_idx, target_pos] = chosen
            if self.control != "none":  # same count of selected tokens, other places
                valid = torch.zeros_like(selected)
                valid[batch_idx, target_pos] = 1.0
                stream = 1 if micro.training else 2
                generator = control_generator(self.seed, micro.step, micro.index, stream)
                selected.copy_(apply_control(selected, valid, self.control, generator))
                chosen = selected[batch_idx, target_pos]
            if micro.training:
                self.add(selected=float(chosen.sum()), scored=chosen.numel())
            return chosen

        return MicroWeights(counts * k if self.normalization == "weight_sum" else counts, None, fn)

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """``rho1/selected_fraction``: selected / scored target tokens of the step's training
        micro-batches, over all ranks."""
        if not sums["scored"]:
            return {}
        return {"rho1/selected_fraction": sums["selected"] / sums["scored"]}


# ---- Verifiable Critic: GAE / TD weighting (docs/METHOD.md §4) ----


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


class CriticTD(Weighting):
    """Verifiable Critic weights (docs/METHOD.md §4): GAE of a frozen critic's values, whitened
    with EMA statistics, ``clamp(exp(A_hat / beta), clip_min, clip_max)``, target-indexed
    ``[B, L]``.

    ``weigh`` computes a micro-batch's weights from the statistics from BEFORE this step and,
    for a training micro-batch, adds its advantage sums to the step's; ``end_step`` updates
    the EMA once, from all micro-batches and all ranks. At step 1 (no statistics yet) each
    micro-batch is whitened by its own masked mean and Bessel std. Validation
    (``micro.training`` False) uses the frozen training statistics and updates nothing.
    """

    name = "critic_td"
    Settings = CriticTDConfig
    scores_tokens = True
    stat_names = ("n", "w", "w2", "clip_low", "clip_high", "adv", "adv2", "entropy", "entropy_n")
    settings: CriticTDConfig

    def __init__(
        self,
        settings: CriticTDConfig | None = None,
        *,
        critic: Callable[[Tensor], Tensor] | None = None,
        precompute: Precompute | None = None,
        normalization: str = "weight_sum",
        control: str = "none",
        seed: int = 0,
    ) -> None:
        super().__init__(settings, normalization=normalization, control=control, seed=seed)
        self.critic, self.precompute = critic, precompute
        s = self.settings
        self.ema = AdvantageEMA(s.ema_momentum, s.ema_rule, s.ema_warmup)

    @classmethod
    def build(cls, settings: CriticTDConfig | None, ctx: BuildContext) -> CriticTD:
        from weighted_mtp.train.checkpoint import load_critic, resolve_checkpoint

        settings = settings or CriticTDConfig()
        if not settings.critic_checkpoint:
            raise ValueError("critic_td needs weighting.critic_td.critic_checkpoint (a critic run)")
        ckpt = resolve_checkpoint(ctx.layout, settings.critic_checkpoint)
        critic = load_critic(ckpt, ctx.layout, ctx.dtype, ctx.device)
        precompute = _precompute_for("critic_values", "values", "critic", ckpt, ctx)
        return cls(settings, critic=critic, precompute=precompute,
                   normalization=ctx.normalization, control=ctx.control, seed=ctx.seed)  # fmt: skip

    def prepare(self, streams: list[BatchStream], device: torch.device, batch_size: int) -> None:
        """With ``precompute``: every example's critic values into ``batch.extras["values"]``,
        then the critic is dropped (this object held the only reference to it)."""
        if not self.settings.precompute or self.critic is None:
            return
        precompute = self.precompute or Precompute("", "values", {})
        precompute.fill(streams, lambda s: critic_values_for(s, self.critic, device, batch_size))
        self.critic = None
        release_memory()

    def values(self, batch: Any) -> Tensor:
        if "values" in batch.extras:
            return batch.extras["values"].float()
        if self.critic is None:
            raise ValueError("CriticTD without a critic needs batch.extras['values']")
        with torch.no_grad():
            return self.critic(batch.tokens).float()

    def advantages(self, batch: Any) -> tuple[Tensor, Tensor]:
        s, mask = self.settings, batch.labels != IGNORE_INDEX
        adv = gae_advantages(self.values(batch), mask, s.gamma, s.td_lambda, s.initial_value)
        return adv, mask

    def weigh(self, batch: Any, n_heads: int, micro: Micro) -> MicroWeights:
        adv, mask = self.advantages(batch)
        s = self.settings
        stats = self.ema.stats() or masked_batch_stats(adv, mask)
        w = td_weights(adv, mask, stats, beta=s.beta, clip_min=s.clip_min, clip_max=s.clip_max)
        if self.control != "none":
            stream = 0 if micro.training else 1
            generator = control_generator(self.seed, micro.step, micro.index, stream)
            w = apply_control(w, mask, self.control, generator)
        if micro.training:
            self.ema.accumulate(adv, mask)
            self._record(adv, w, mask)
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

    def _record(self, adv: Tensor, w: Tensor, mask: Tensor) -> None:
        valid_w, valid_a = w[mask].double().cpu(), adv[mask].double().cpu()
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
            adv=float(valid_a.sum()), adv2=float((valid_a**2).sum()), **entropy,
        )  # fmt: skip

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """The step's training micro-batches over all ranks; ``td/ema_*`` after the update.

        ``td/weight_entropy_norm``: per micro-batch, the entropy of ``p = w / sum w`` over its
        valid tokens divided by ``log N`` (1 = uniform weights), averaged over micro-batches.
        """
        out: dict[str, float] = {}
        stats = self.ema.stats()
        if stats is not None:
            out.update({"td/ema_mean": stats[0], "td/ema_std": stats[1]})
        n = sums["n"]
        if n > 0:
            w_mean, a_mean = sums["w"] / n, sums["adv"] / n
            out.update({
                "td/weight_mean": w_mean,
                "td/weight_std": math.sqrt(max(sums["w2"] / n - w_mean**2, 0.0)),
                "td/clip_low_frac": sums["clip_low"] / n,
                "td/clip_high_frac": sums["clip_high"] / n,
                "td/adv_mean": a_mean,
                "td/adv_std": math.sqrt(max(sums["adv2"] / n - a_mean**2, 0.0)),
            })  # fmt: skip
        if sums["entropy_n"]:
            out["td/weight_entropy_norm"] = sums["entropy"] / sums["entropy_n"]
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
    ``CriticTD`` reads them instead of running the critic every step."""
    examples = stream.data.examples
    out: list[Tensor] = []
    for start in range(0, len(examples), batch_size):
        chosen = list(range(start, min(start + batch_size, len(examples))))
        batch = stream.collate(chosen).to(device)
        with torch.no_grad():
            values = critic(batch.tokens).float().cpu()
        out.extend(values[row, : examples[i].length].clone() for row, i in enumerate(chosen))
    return out


# ---- the registry ----

WEIGHTINGS: dict[str, type[Weighting]] = {
    Uniform.name: Uniform,
    Rho1.name: Rho1,
    CriticTD.name: CriticTD,
}
"""``weighting.name`` -> class. A new weighting: one subclass and one entry here."""


def _section_of(name: str) -> type[BaseModel] | None:
    return getattr(WEIGHTINGS.get(name), "Settings", None)


config_module.weighting_section = _section_of  # config validates sections through the registry


def build_weighting(name: str, config: Any, ctx: BuildContext) -> Weighting:
    """The weighting ``name`` built from its section of ``config`` (a ``WeightingConfig``)."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; choose from {', '.join(WEIGHTINGS)}")
    cls = WEIGHTINGS[name]
    return cls.build(config.settings(name, cls.Settings), ctx)
