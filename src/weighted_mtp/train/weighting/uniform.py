"""``Uniform``: weight 1 on every response token (docs/METHOD.md §1)."""

from __future__ import annotations

from typing import Any

from weighted_mtp.train.weighting.base import Micro, MicroWeights, Weighting


class Uniform(Weighting):
    """Weight 1 on every response token (Baseline, NTP, reference tuning)."""

    name = "uniform"

    def weights(self, batch: Any, n_heads: int, micro: Micro) -> MicroWeights:
        return self.dense_weights(batch, None, n_heads)
