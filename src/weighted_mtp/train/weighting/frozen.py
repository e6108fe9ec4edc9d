"""Weightings that read a frozen helper model (docs/METHOD.md §4, §5): Rho-1's tuned reference,
Verifiable's critic, or another package's. The helper's checkpoint is named by the registry
entry's ``helper`` key (``weighting.<name>.<key>``), loaded once when the weighting is built,
and with ``weighting.<name>.precompute`` its per-example signal is computed once before
training (cached under ``<storage>/cache/<kind>/``) and the helper is dropped."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel
from torch import Tensor

from weighted_mtp.registry import Helper
from weighted_mtp.train.weighting.base import BuildContext, Weighting
from weighted_mtp.train.weighting.precompute import Precompute, precompute_for, release_memory

if TYPE_CHECKING:
    from weighted_mtp.data.dataset import BatchStream


class FrozenHelperWeighting(Weighting):
    """A weighting with a frozen helper model in ``helper_model``.

    A subclass sets ``signal`` (the cache kind and the ``batch.extras`` key of its precomputed
    signal) and implements ``load_helper`` (the model from its checkpoint) and ``helper_signal``
    (every example's 1-D signal of a stream); its settings section has the helper's key and a
    ``precompute`` flag. ``build`` and ``prepare`` are done here: the helper named and loaded,
    its signal precomputed and the model dropped. Batches then carry the signal in
    ``batch.extras[signal[1]]``; without precompute the subclass runs ``helper_model`` itself.
    """

    signal: ClassVar[tuple[str, str]] = ("", "")

    def __init__(
        self,
        settings: BaseModel | None = None,
        *,
        helper_model: Any = None,
        precompute: Precompute | None = None,
        normalization: str = "weight_sum",
        control: str = "none",
        seed: int = 0,
    ) -> None:
        super().__init__(settings, normalization=normalization, control=control, seed=seed)
        self.helper_model = helper_model
        self.precompute = precompute

    @classmethod
    def helper_declared(cls) -> Helper:
        """The registry entry's helper (which recipe trains it, which key names it)."""
        from weighted_mtp import registry

        found = registry.get(cls.name)
        helper = found.helper if found is not None else cls.helper
        if helper is None:
            raise TypeError(f"{cls.__name__}: a frozen-helper weighting declares its `helper`")
        return helper

    @classmethod
    def load_helper(cls, ckpt: Path, ctx: BuildContext) -> Any:
        """The frozen model of checkpoint ``ckpt``, on ``ctx.device`` in ``ctx.dtype``."""
        raise NotImplementedError

    def helper_signal(
        self, stream: BatchStream, device: torch.device, batch_size: int
    ) -> list[Tensor]:
        """``helper_model``'s 1-D signal of every example of ``stream``, in example order."""
        raise NotImplementedError

    @classmethod
    def build(cls, settings: BaseModel | None, ctx: BuildContext) -> FrozenHelperWeighting:
        from weighted_mtp.train.checkpoint import resolve_checkpoint

        if settings is None and cls.Settings is not None:
            settings = cls.Settings()
        helper = cls.helper_declared()
        where = getattr(settings, helper.key, None)
        if not where:
            raise ValueError(
                f"{cls.name} needs weighting.{cls.name}.{helper.key} (a {helper.recipe} run)"
            )
        ckpt = resolve_checkpoint(ctx.layout, where)
        kind, extra = cls.signal
        return cls(settings, helper_model=cls.load_helper(ckpt, ctx),
                   precompute=precompute_for(kind, extra, helper.recipe, ckpt, ctx),
                   normalization=ctx.normalization, control=ctx.control, seed=ctx.seed)  # fmt: skip

    def prepare(self, streams: list[BatchStream], device: torch.device, batch_size: int) -> None:
        """With ``precompute``: every example's signal into ``batch.extras[signal[1]]``, then
        the helper is dropped (this object held the only reference to it)."""
        if not getattr(self.settings, "precompute", False) or self.helper_model is None:
            return
        precompute = self.precompute or Precompute("", self.signal[1], {})
        precompute.fill(streams, lambda s: self.helper_signal(s, device, batch_size))
        self.helper_model = None
        release_memory()
