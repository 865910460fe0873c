"""Registration by name, shared by every extension point (strategies, server optimizers,
local trainers, data sources, model builders)."""

from __future__ import annotations

from typing import Any, TypeVar

F = TypeVar("F")


def add_entry(table: dict[str, Any], name: str, factory: F, what: str) -> F:
    """Put `factory` under `name` in `table`. A second, different factory under one name is
    an error (two plugins would silently fight over it); the same function registered again
    (a notebook cell run twice, a module reloaded) replaces the first."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {what} needs a non-empty name, got {name!r}")
    old = table.get(name)
    if old is not None and old is not factory and not _redefined(old, factory):
        raise ValueError(
            f"{what} {name!r} is registered twice ({_origin(old)} and {_origin(factory)})"
        )
    table[name] = factory
    return factory


def _redefined(old: object, new: object) -> bool:
    """Whether `new` is `old` defined again: two functions of one module and qualified name
    (not partials or instances, whose names say nothing about their settings)."""
    functions = all(hasattr(f, "__code__") and hasattr(f, "__qualname__") for f in (old, new))
    return functions and _origin(old) == _origin(new)


def _origin(factory: object) -> str:
    module = getattr(factory, "__module__", "?")
    return f"{module}.{getattr(factory, '__qualname__', type(factory).__qualname__)}"
