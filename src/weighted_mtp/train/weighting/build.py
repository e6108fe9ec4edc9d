"""A weighting by name: ``build_weighting`` and ``WEIGHTINGS``, both views of the registry
(``weighted_mtp/registry.py``, docs/ARCHITECTURE.md "The weighting registry")."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

from weighted_mtp import registry
from weighted_mtp.base.errors import UserError
from weighted_mtp.train.weighting.base import BuildContext, Weighting


def weighting_class(name: str) -> type[Weighting]:
    """The class of the registered weighting ``name`` (a one-line error if none)."""
    cls = registry.entry(name).load()
    if not (isinstance(cls, type) and issubclass(cls, Weighting)):
        raise UserError(f"weighting {name!r} is registered as {cls!r}, not a Weighting subclass")
    return cls


def build_weighting(name: str, config: Any, ctx: BuildContext) -> Weighting:
    """The weighting ``name`` built from its section of ``config`` (a ``WeightingConfig``)."""
    cls = weighting_class(name)
    return cls.build(config.settings(name, cls.Settings), ctx)


class _Classes(MutableMapping[str, type[Weighting]]):
    """``weighting.name`` -> class, read from the registry; setting an item registers a class
    in this process (``registry.register``), deleting it unregisters it."""

    def __getitem__(self, name: str) -> type[Weighting]:
        if registry.get(name) is None:
            raise KeyError(name)
        return weighting_class(name)

    def __setitem__(self, name: str, cls: type[Weighting]) -> None:
        if name != cls.name:
            raise ValueError(f"{cls.__name__} is called {cls.name!r}, not {name!r}")
        registry.register(cls)

    def __delitem__(self, name: str) -> None:
        if name in registry.BUILTIN or registry.get(name) is None:
            raise KeyError(name)
        registry.unregister(name)

    def __iter__(self) -> Iterator[str]:
        return iter(registry.names())

    def __len__(self) -> int:
        return len(registry.names())


WEIGHTINGS: MutableMapping[str, type[Weighting]] = _Classes()
"""``weighting.name`` -> class, every registered weighting (built-in and entry points)."""
