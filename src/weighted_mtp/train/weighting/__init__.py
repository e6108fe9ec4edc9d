"""Per-token weights (docs/ARCHITECTURE.md, "Contracts"; docs/METHOD.md §4-§6), by concern:

* ``base``: the ``Weighting`` contract (``Micro``, ``MicroWeights``, ``BuildContext``);
* ``controls``: the control arms, applied by ``Weighting.weigh`` to every weighting's output;
* ``precompute``: a frozen helper's signals computed once and cached;
* ``frozen``: ``FrozenHelperWeighting``, the base of a weighting that reads a frozen helper model
  (its checkpoint named, loaded, precomputed and dropped);
* ``uniform``, ``rho1``, ``verifiable`` (the Verifiable Critic: GAE, EMA whitening): the built-in
  weightings;
* ``oracle``: ``oracle_span`` and ``oracle_drop``, the positive control's known-answer weights;
* ``build``: a weighting by name from the registry (``weighted_mtp/registry.py``).

A new weighting is one ``Weighting`` subclass (``name``, optional ``Settings``, ``weights``)
registered by an entry point of ``weighted_mtp.weightings`` (or ``registry.register``); its
knobs are then ``weighting.<name>.*`` in YAML and ``weighting.control`` applies to it. One that
reads a frozen model subclasses ``FrozenHelperWeighting`` and declares its ``helper``.
"""

from weighted_mtp.train.weighting.base import BuildContext, Micro, MicroWeights, Weighting
from weighted_mtp.train.weighting.build import WEIGHTINGS, build_weighting, weighting_class
from weighted_mtp.train.weighting.controls import (
    CONTROLS,
    apply_arm,
    apply_control,
    control_generator,
)
from weighted_mtp.train.weighting.frozen import FrozenHelperWeighting
from weighted_mtp.train.weighting.oracle import OracleDrop, OracleSpan, drop_weights, span_weights
from weighted_mtp.train.weighting.precompute import (
    Precompute,
    cached_per_example,
    precompute_for,
    release_memory,
)
from weighted_mtp.train.weighting.rho1 import (
    REFERENCE_CHUNK_ROWS,
    Rho1,
    precompute_reference_ce,
    reference_ce,
    select_top,
)
from weighted_mtp.train.weighting.uniform import Uniform
from weighted_mtp.train.weighting.verifiable import (
    AdvantageEMA,
    CriticTD,
    Verifiable,
    critic_values_for,
    gae_advantages,
    masked_batch_stats,
    td_weights,
)

__all__ = [
    "CONTROLS",
    "REFERENCE_CHUNK_ROWS",
    "WEIGHTINGS",
    "AdvantageEMA",
    "BuildContext",
    "CriticTD",
    "FrozenHelperWeighting",
    "Micro",
    "MicroWeights",
    "OracleDrop",
    "OracleSpan",
    "Precompute",
    "Rho1",
    "Uniform",
    "Verifiable",
    "Weighting",
    "apply_arm",
    "apply_control",
    "build_weighting",
    "cached_per_example",
    "control_generator",
    "critic_values_for",
    "drop_weights",
    "gae_advantages",
    "masked_batch_stats",
    "precompute_for",
    "precompute_reference_ce",
    "reference_ce",
    "release_memory",
    "select_top",
    "span_weights",
    "td_weights",
    "weighting_class",
]
