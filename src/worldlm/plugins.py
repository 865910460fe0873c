"""User plugins: modules named in `run.plugins`, imported before a config is checked so that
the strategies, server optimizers, local trainers, data sources and model builders they
register can be named in it. Every process that checks or runs the config imports them
(the driver, Ray workers, deployed nodes), so a plugin must be importable on each."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from worldlm.errors import ConfigError


def load_plugins(modules: Iterable[str]) -> None:
    """Import each module once (importing twice is a no-op, so registrations run once)."""
    for name in modules:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"run.plugins: {name!r} is not a module name")
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(
                f"run.plugins: cannot import {name!r} ({exc}); install it or put its directory "
                "on PYTHONPATH in every process of the run"
            ) from None
        except Exception as exc:  # a plugin that fails while registering: name it, not us
            raise ConfigError(
                f"run.plugins: importing {name!r} failed: {type(exc).__name__}: {exc}"
            ) from exc


def plugins_of(data: dict[str, Any]) -> list[str]:
    """`run.plugins` of a raw (unvalidated) config dict; the schema reports a wrong type."""
    run = data.get("run")
    plugins = run.get("plugins") if isinstance(run, dict) else None
    return [p for p in plugins if isinstance(p, str)] if isinstance(plugins, list) else []
