"""The weighting registry: every weighting's entry, and each recipe's default weighting.

An entry says what the rest of the framework needs to know about a weighting without running
it (docs/ARCHITECTURE.md, "The weighting registry"): its class, its settings section
(``weighting.<name>`` in YAML), its frozen helper (the recipe that trains it and the settings
key that points at its checkpoint), whether it ranks tokens, and how the report shows it (a
display name, its statistics panels, 0/1 selection or continuous weights with a clip range).

The built-in entries are declared here by dotted path, so ``config`` (which validates
``weighting.<name>`` against this registry for every command) imports neither torch nor the
training code. Other packages add weightings through the entry-point group
``weighted_mtp.weightings``: an entry point names a ``Weighting`` subclass (its class
attributes make the entry) or a ``WeightingEntry``. Entry points are listed once, on first use,
and each is loaded once, when its name is first asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from weighted_mtp.base.errors import UserError

GROUP = "weighted_mtp.weightings"
"""The entry-point group other packages register weightings in."""


@dataclass(frozen=True)
class Helper:
    """A frozen model a weighting reads: trained by ``recipe``, its checkpoint named by
    ``weighting.<weighting>.<key>`` (docs/METHOD.md §4, §5)."""

    recipe: str
    key: str


@dataclass(frozen=True)
class WeightingEntry:
    """What the framework knows about one weighting. ``target`` and ``settings`` are the
    classes or ``"module:Name"`` paths, imported on first use."""

    name: str
    target: Any
    """The ``Weighting`` subclass, or its ``"module:Class"`` path."""
    settings: Any = None
    """Its settings section (a pydantic ``Section``), its ``"module:Class"`` path, or None."""
    helper: Helper | None = None
    scores_tokens: bool = False
    """It ranks tokens: the placement metrics apply (docs/METHOD.md §6)."""
    display: str = ""
    """The report's name for it (default: ``name``)."""
    report_panels: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """``(title, metric keys)`` of its statistics in the report's token-weight figure."""
    selection: bool = False
    """0/1 weights: the heat maps draw selected/dropped instead of a colour scale."""
    clip_keys: tuple[str, str] | None = None
    """Settings keys of its weights' clip range, which the heat maps' colour scale spans."""
    source: str = "built-in"

    @property
    def label(self) -> str:
        return self.display or self.name

    @property
    def helper_key(self) -> str | None:
        """The dotted config key that points at the helper's checkpoint."""
        return f"weighting.{self.name}.{self.helper.key}" if self.helper else None

    def load(self) -> type:
        """The ``Weighting`` class."""
        return _resolve(self.target)

    def settings_class(self) -> type | None:
        return _resolve(self.settings) if self.settings is not None else None


def _resolve(obj: Any) -> Any:
    if not isinstance(obj, str):
        return obj
    module, _, name = obj.partition(":")
    return getattr(importlib.import_module(module), name)


def entry_of_class(cls: type, source: str = "built-in") -> WeightingEntry:
    """The entry a ``Weighting`` subclass declares through its class attributes."""
    return WeightingEntry(
        name=cls.name,
        target=cls,
        settings=getattr(cls, "Settings", None),
        helper=getattr(cls, "helper", None),
        scores_tokens=bool(getattr(cls, "scores_tokens", False)),
        display=getattr(cls, "display_name", "") or cls.name,
        report_panels=tuple(getattr(cls, "report_panels", ())),
        selection=bool(getattr(cls, "selection", False)),
        clip_keys=getattr(cls, "clip_keys", None),
        source=source,
    )


_TRAIN = "weighted_mtp.train.weighting"

BUILTIN: dict[str, WeightingEntry] = {
    "uniform": WeightingEntry("uniform", f"{_TRAIN}.uniform:Uniform", display="uniform"),
    "rho1": WeightingEntry(
        "rho1", f"{_TRAIN}.rho1:Rho1", "weighted_mtp.config:Rho1Config",
        helper=Helper("ref_tuning", "reference"), scores_tokens=True, display="Rho-1",
        report_panels=(("rho-1 selected fraction", ("rho1/selected_fraction",)),),
        selection=True,
    ),
    "critic_td": WeightingEntry(
        "critic_td", f"{_TRAIN}.critic_td:CriticTD", "weighted_mtp.config:CriticTDConfig",
        helper=Helper("critic", "critic_checkpoint"), scores_tokens=True,
        display="Verifiable Critic (TD)",
        report_panels=(
            ("td weight mean", ("td/weight_mean",)),
            ("td weight std", ("td/weight_std",)),
            ("td clipped fraction: low / high", ("td/clip_low_frac", "td/clip_high_frac")),
            ("td advantage mean", ("td/adv_mean",)),
            ("td advantage std", ("td/adv_std",)),
            ("td weight entropy (normalised)", ("td/weight_entropy_norm",)),
        ),
        clip_keys=("clip_min", "clip_max"),
    ),
    # The positive control's oracles (docs/METHOD.md §6): 0/1 weights from the recorded row
    # labels and mutation spans, no settings, no helper.
    "oracle_span": WeightingEntry(
        "oracle_span", f"{_TRAIN}.oracle:OracleSpan", display="oracle (span)", selection=True,
    ),
    "oracle_drop": WeightingEntry(
        "oracle_drop", f"{_TRAIN}.oracle:OracleDrop", display="oracle (drop incorrect)",
        selection=True,
    ),
}  # fmt: skip
"""The weightings of this package, by dotted path (nothing is imported until used)."""

RECIPE_WEIGHTINGS: dict[str, str | None] = {
    "baseline": "uniform",
    "ntp": "uniform",
    "ref_tuning": "uniform",
    "rho1": "rho1",
    "verifiable": "critic_td",
    "critic": None,
    "pretrain": "uniform",
}
"""Recipe -> the weighting it trains with unless ``weighting.name`` says otherwise; None: a
value model, no token weighting (``train/recipes.py`` builds them)."""

_extra: dict[str, WeightingEntry] = {}
_plugins: dict[str, EntryPoint] | None = None
_loaded: dict[str, WeightingEntry] = {}


def _entry_points() -> dict[str, EntryPoint]:
    """The group's entry points by name, listed once (none loaded)."""
    global _plugins
    if _plugins is None:
        _plugins = {}
        for ep in entry_points(group=GROUP):
            if ep.name in BUILTIN:
                raise UserError(
                    f"entry point {ep.name} = {ep.value} ({GROUP}) takes the name of a "
                    "built-in weighting"
                )
            _plugins.setdefault(ep.name, ep)
    return _plugins


def _load_plugin(ep: EntryPoint) -> WeightingEntry:
    if ep.name not in _loaded:
        where = f"entry point {ep.name} = {ep.value} ({GROUP})"
        try:
            obj = ep.load()
        except Exception as err:
            raise UserError(f"{where}: cannot load it: {err}") from err
        dist = getattr(getattr(ep, "dist", None), "name", None) or "entry point"
        entry = obj if isinstance(obj, WeightingEntry) else entry_of_class(obj, dist)
        if entry.name != ep.name:
            raise UserError(f"{where}: the weighting calls itself {entry.name!r}")
        _loaded[ep.name] = entry
    return _loaded[ep.name]


def names() -> list[str]:
    """Every registered weighting's name: built-in, registered in-process, entry points."""
    return [*BUILTIN, *_extra, *(n for n in _entry_points() if n not in _extra)]


def get(name: str) -> WeightingEntry | None:
    """The entry of ``name`` (loading its entry point if it comes from one), or None."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name in _extra:
        return _extra[name]
    ep = _entry_points().get(name)
    return _load_plugin(ep) if ep is not None else None


def entry(name: str) -> WeightingEntry:
    """The entry of ``name``; a one-line ``UserError`` naming the registered ones if none."""
    found = get(name)
    if found is None:
        raise UserError(f"unknown weighting {name!r}; choose from {', '.join(names())}")
    return found


def entries() -> Iterator[WeightingEntry]:
    """Every entry (loads every entry point)."""
    for name in names():
        yield entry(name)


def settings_of(name: str) -> type | None:
    """The settings section class of weighting ``name`` (None: unknown, or no knobs)."""
    found = get(name)
    return found.settings_class() if found is not None else None


def register(target: Any) -> WeightingEntry:
    """Register a ``Weighting`` subclass (or a ``WeightingEntry``) in this process, as an entry
    point would (tests, notebooks). Built-in names are refused."""
    new = target if isinstance(target, WeightingEntry) else entry_of_class(target, "registered")
    if new.name in BUILTIN:
        raise ValueError(f"{new.name!r} is a built-in weighting")
    _extra[new.name] = new
    return new


def unregister(name: str) -> None:
    _extra.pop(name, None)


def refresh() -> None:
    """Forget the listed entry points (the next use lists them again)."""
    global _plugins
    _plugins = None
    _loaded.clear()


# ---- recipes ----


def default_weighting(recipe: str) -> str | None:
    """The weighting recipe ``recipe`` trains with by default (None: a value model)."""
    return RECIPE_WEIGHTINGS.get(recipe)


def weighting_of(recipe: str, name: str | None = None) -> str | None:
    """The weighting a run uses: ``weighting.name``, else its recipe's default."""
    return name or default_weighting(recipe)


def helper_for(recipe: str, name: str | None = None) -> tuple[str, str] | None:
    """(the config key naming the frozen helper's checkpoint, the recipe that trains the
    helper) of a run of ``recipe`` with ``weighting.name`` ``name``; None without a helper."""
    chosen = weighting_of(recipe, name)
    found = get(chosen) if chosen else None
    if found is None or found.helper is None:
        return None
    return found.helper_key or "", found.helper.recipe


def is_value_recipe(recipe: str | None) -> bool:
    """A recipe that trains a value model (no token weighting), such as ``critic``."""
    return recipe in RECIPE_WEIGHTINGS and RECIPE_WEIGHTINGS[recipe] is None


# ---- what the report reads (never fails on a missing or broken plugin) ----


def find(name: str | None) -> WeightingEntry | None:
    """The entry of ``name``, or None when it is unknown or its entry point does not load (the
    report draws runs of weightings that are no longer installed)."""
    if not name:
        return None
    try:
        return get(name)
    except UserError:
        return None


def run_weighting(recipe: str | None, config: Any) -> WeightingEntry | None:
    """The entry of the weighting a run used, from its written config (a dict) and recipe."""
    section = config.get("weighting") if isinstance(config, dict) else None
    name = section.get("name") if isinstance(section, dict) else None
    return find(name or (default_weighting(recipe) if recipe else None))


def report_entries() -> list[WeightingEntry]:
    """Every entry that loads, built-in first."""
    try:
        listed = names()
    except UserError:  # an entry point that takes a built-in's name: the built-ins still draw
        listed = list(BUILTIN)
    found = [find(name) for name in listed]
    return [e for e in found if e is not None]
