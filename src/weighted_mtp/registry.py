"""The weighting registry: every weighting's entry, the recipes, and the old names of both.

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

The recipes (``RECIPES``: what differs in model and objective) and the aliases (``ALIASES``: the
names runs and configs used before, each a recipe with a weighting and a number of heads, and
``WEIGHTING_ALIASES``: old weighting names) live here too, since config validation sits above
this module and must know them (docs/GLOSSARY.md, "Aliases").
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, NamedTuple

from weighted_mtp.base.errors import UserError

GROUP = "weighted_mtp.weightings"
"""The entry-point group other packages register weightings in."""


@dataclass(frozen=True)
class Helper:
    """A frozen model a weighting reads: trained by ``recipe`` (a recipe or an alias) with the
    config file ``config`` of a configs folder (default: the recipe's name), its checkpoint
    named by ``weighting.<weighting>.<key>`` (docs/METHOD.md §4, §5)."""

    recipe: str
    key: str
    config: str = ""
    """The config file (without ``.yaml``) that trains it in every configs folder; a study
    names the helper's run after it."""

    @property
    def config_name(self) -> str:
        return self.config or self.recipe


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
        helper=Helper("reference", "reference", "ref_tuning"), scores_tokens=True,
        display="Rho-1",
        report_panels=(("rho-1 selected fraction", ("rho1/selected_fraction",)),),
        selection=True,
    ),
    "verifiable": WeightingEntry(
        "verifiable", f"{_TRAIN}.verifiable:Verifiable", "weighted_mtp.config:VerifiableConfig",
        helper=Helper("critic", "critic_checkpoint"), scores_tokens=True,
        display="Verifiable Critic",
        report_panels=(
            ("TD weight mean", ("verifiable/weight_mean",)),
            ("TD weight std", ("verifiable/weight_std",)),
            ("TD weights clipped: low / high",
             ("verifiable/clip_low_frac", "verifiable/clip_high_frac")),
            ("advantage mean", ("verifiable/adv_mean",)),
            ("advantage std", ("verifiable/adv_std",)),
            ("TD weight entropy (normalised)", ("verifiable/weight_entropy_norm",)),
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

WEIGHTING_ALIASES: dict[str, str] = {"critic_td": "verifiable"}
"""Old weighting name -> its name now. ``weighting.name`` and a config section
``weighting.<old>`` accept the old name (a config giving both sections is an error); the
metrics it logged as ``td/*`` read as ``verifiable/*`` (``report/runs.py``)."""


class RecipeOf(NamedTuple):
    """What a recipe name trains: the recipe (``train/recipes.py``), the weighting it uses
    unless ``weighting.name`` says otherwise (None: a value model, no token weighting), and the
    heads it trains (None: ``model.n_future_tokens``, else every head of the checkpoint)."""

    recipe: str
    weighting: str | None
    n_heads: int | None


RECIPES: dict[str, RecipeOf] = {
    "policy": RecipeOf("policy", "uniform", None),
    "critic": RecipeOf("critic", None, None),
    "reference": RecipeOf("reference", "uniform", 1),
    "pretrain": RecipeOf("pretrain", "uniform", None),
}
"""The recipes: what differs in model and objective. ``policy``: the MTP policy (LoRA) with any
weighting; ``critic``: the value model; ``reference``: the reference LM's SFT (one head);
``pretrain``: every parameter of a model, uniform weights."""

ALIASES: dict[str, RecipeOf] = {
    "baseline": RecipeOf("policy", "uniform", None),
    "verifiable": RecipeOf("policy", "verifiable", None),
    "rho1": RecipeOf("policy", "rho1", None),
    "ntp": RecipeOf("policy", "uniform", 1),
    "ref_tuning": RecipeOf("reference", "uniform", 1),
}
"""The recipe names used before, each a recipe with its default weighting and heads: a config
that says ``train.recipe: rho1`` trains exactly what ``policy`` with ``weighting.name: rho1``
trains (docs/GLOSSARY.md, "Aliases")."""

_extra: dict[str, WeightingEntry] = {}
_plugins: dict[str, EntryPoint] | None = None
_loaded: dict[str, WeightingEntry] = {}


def _entry_points() -> dict[str, EntryPoint]:
    """The group's entry points by name, listed once (none loaded)."""
    global _plugins
    if _plugins is None:
        _plugins = {}
        for ep in entry_points(group=GROUP):
            if ep.name in BUILTIN or ep.name in WEIGHTING_ALIASES:
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


def canonical_weighting(name: str) -> str:
    """``name``, or the weighting an old name stands for (``WEIGHTING_ALIASES``)."""
    return WEIGHTING_ALIASES.get(name, name)


def get(name: str) -> WeightingEntry | None:
    """The entry of ``name`` or of the weighting it is an old name of (loading its entry point
    if it comes from one), or None."""
    name = canonical_weighting(name)
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
        raise UserError(unknown_weighting(name))
    return found


def unknown_weighting(name: str) -> str:
    """The one-line message for a weighting name nothing registers."""
    old = ", ".join(f"{a} = {n}" for a, n in WEIGHTING_ALIASES.items())
    return f"unknown weighting {name!r}; choose from {', '.join(names())} (old names: {old})"


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
    if new.name in BUILTIN or new.name in WEIGHTING_ALIASES:
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


def find_recipe(name: str | None) -> RecipeOf | None:
    """What recipe (or alias) ``name`` trains; None when it is neither."""
    if not name:
        return None
    return RECIPES.get(name) or ALIASES.get(name)


def recipe_of(name: str) -> RecipeOf:
    """(recipe, default weighting, heads) of a recipe or an alias; a one-line ``UserError``
    naming the recipes and the aliases if it is neither."""
    found = find_recipe(name)
    if found is None:
        raise UserError(unknown_recipe(name))
    return found


def unknown_recipe(name: str) -> str:
    aliases = ", ".join(ALIASES)
    return f"unknown recipe {name!r}; choose from {', '.join(RECIPES)} (aliases: {aliases})"


def alias_text(name: str) -> str:
    """What alias ``name`` stands for, in words: ``policy with weighting rho1``, ``policy on
    head 1 only``, ``reference``."""
    recipe, weighting, heads = ALIASES[name]
    base = RECIPES[recipe]
    if heads != base.n_heads:
        return f"{recipe} on head {heads} only" if heads == 1 else f"{recipe} on {heads} heads"
    if weighting != base.weighting or recipe == "policy":
        return f"{recipe} with weighting {weighting}"
    return recipe


def default_weighting(recipe: str | None) -> str | None:
    """The weighting recipe (or alias) ``recipe`` trains with by default (None: a value model,
    or an unknown name)."""
    found = find_recipe(recipe)
    return found.weighting if found is not None else None


def weighting_of(recipe: str | None, name: str | None = None) -> str | None:
    """The weighting a run uses, by its name now: ``weighting.name``, else its recipe's
    default."""
    chosen = name or default_weighting(recipe)
    return canonical_weighting(chosen) if chosen else None


def helper_for(recipe: str, name: str | None = None) -> tuple[str, str] | None:
    """(the config key naming the frozen helper's checkpoint, the config file that trains the
    helper) of a run of ``recipe`` with ``weighting.name`` ``name``; None without a helper."""
    chosen = weighting_of(recipe, name)
    found = get(chosen) if chosen else None
    if found is None or found.helper is None:
        return None
    return found.helper_key or "", found.helper.config_name


def is_value_recipe(recipe: str | None) -> bool:
    """A recipe (or alias) that trains a value model (no token weighting), such as ``critic``."""
    found = find_recipe(recipe)
    return found is not None and found.weighting is None


def section_of(weighting: Any, name: str) -> Any:
    """The section of weighting ``name`` in a written config's ``weighting`` (a dict), under
    its name or an old one; None if neither is there."""
    if not isinstance(weighting, dict):
        return None
    for key in (name, *(a for a, n in WEIGHTING_ALIASES.items() if n == name)):
        if isinstance(weighting.get(key), dict):
            return weighting[key]
    return None


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
