"""The ``Weighting`` contract (docs/ARCHITECTURE.md, "Contracts"): ``Micro``, ``MicroWeights``,
``BuildContext`` and the base class.

For every micro-batch the objective makes ONE call, ``weigh(batch, n_heads, micro)``, and gets
back a ``MicroWeights``: that micro-batch's share of the step's per-head normaliser, and its
target-indexed weights, either dense (known before the forward pass) or as a ``weight_fn`` of
the policy's own per-token CE (Rho-1). The objective keeps what ``weigh`` returned next to the
batch until its forward pass, so nothing is cached inside the weighting. Statistics are sums
over micro-batches (``add``), summed over ranks by the loop, so ``metrics`` describes the whole
step on every rank count.

A subclass implements ``weights``; ``weigh`` (not overridable) applies the control arm
``weighting.control`` to its result (``controls.py``) and hands head 1's final weights to
``observe_weights``, so a new weighting has the control arms without a line of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel
from torch import Tensor

from weighted_mtp.registry import Helper
from weighted_mtp.train.mtp_loss import WeightFn, head_denominators
from weighted_mtp.train.placement import TokenScores
from weighted_mtp.train.weighting import controls

if TYPE_CHECKING:
    from weighted_mtp.base.layout import StorageLayout
    from weighted_mtp.data.dataset import BatchStream


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
    logs), and implements ``weights``. Everything else has a working default:

    * ``build(settings, ctx)``: construct from the config (``FrozenHelperWeighting``, in
      ``frozen.py``, loads a frozen helper model);
    * ``prepare(streams, device, batch_size)``: once before training (precompute and free a
      frozen helper);
    * ``observe_weights(weights)``: head 1's weights of a training micro-batch as the loss
      uses them (after the control arm), for statistics of the weights;
    * ``end_step()``: once per optimizer step on every rank, after the last micro-batch (may
      be a collective);
    * ``metrics(sums)``: step metrics from ``stat_names`` sums over micro-batches AND ranks;
    * ``state_dict()`` / ``load_state_dict()``: what an exact resume needs;
    * ``token_scores(batch, policy_ce)``: the scores that rank a batch's tokens and the weights
      they would get, for the placement metrics (docs/METHOD.md §6, "Where the weight goes"); a
      weighting that ranks tokens sets ``scores_tokens`` (and ``needs_policy_ce`` when its
      score uses the policy's own head-1 CE).

    A weighting registered from its class (an entry point of ``weighted_mtp.weightings``, or
    ``registry.register``) may also set what its registry entry says: ``display_name``,
    ``helper``, ``report_panels``, ``selection``, ``clip_keys`` (``weighted_mtp/registry.py``).
    """

    name: ClassVar[str] = "weighting"
    Settings: ClassVar[type[BaseModel] | None] = None
    stat_names: ClassVar[tuple[str, ...]] = ()
    scores_tokens: ClassVar[bool] = False
    needs_policy_ce: ClassVar[bool] = False
    display_name: ClassVar[str] = ""
    helper: ClassVar[Helper | None] = None
    report_panels: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = ()
    selection: ClassVar[bool] = False
    clip_keys: ClassVar[tuple[str, str] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "weigh" in cls.__dict__:  # it would bypass the control arms
            raise TypeError(
                f"{cls.__name__} overrides Weighting.weigh; implement `weights` instead "
                "(weigh applies weighting.control to it, docs/ARCHITECTURE.md 'Contracts')"
            )

    def __init__(
        self,
        settings: BaseModel | None = None,
        *,
        normalization: str = "weight_sum",
        control: str = "none",
        seed: int = 0,
    ) -> None:
        if control not in controls.CONTROLS:
            raise ValueError(f"unknown control {control!r} ({' | '.join(controls.CONTROLS)})")
        if settings is None and self.Settings is not None:
            settings = self.Settings()
        self.settings = settings
        self.normalization, self.control, self.seed = normalization, control, seed
        self._sums = torch.zeros(len(self.stat_names), dtype=torch.float64)

    @classmethod
    def build(cls, settings: BaseModel | None, ctx: BuildContext) -> Weighting:
        return cls(settings, normalization=ctx.normalization, control=ctx.control, seed=ctx.seed)

    def weigh(self, batch: Any, n_heads: int, micro: Micro) -> MicroWeights:
        """What the objective calls: ``weights`` under the control arm (``controls.apply_arm``);
        a training micro-batch's head-1 weights go to ``observe_weights``."""
        return controls.apply_arm(
            self.weights(batch, n_heads, micro), batch.labels, n_heads, micro,
            control=self.control, seed=self.seed, normalization=self.normalization,
            observe=self.observe_weights if micro.training else None,
        )  # fmt: skip

    def weights(self, batch: Any, n_heads: int, micro: Micro) -> MicroWeights:
        """This weighting's own weights of one micro-batch (no control arm)."""
        raise NotImplementedError

    def observe_weights(self, weights: Tensor) -> None:
        """Head 1's weights on a training micro-batch's targets (1-D, row-major), as the loss
        uses them: after the control arm."""
        return None

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
