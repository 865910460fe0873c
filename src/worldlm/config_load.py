"""Reading a run config: a TOML file (or the embedded default) plus dotted overrides, with
relative paths resolved, validated into a `RunConfig` and its federation tree checked, so that
every entry point refuses a bad config or an impossible tree before anything runs.

Above both `config` (the schema) and `tree`: the tree's checks name strategies and codecs, whose
packages read their own config sections, so the schema itself cannot import the tree.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from worldlm.config import RunConfig, default_config_text
from worldlm.config_errors import format_validation_error
from worldlm.config_toml import apply_overrides, read_toml
from worldlm.errors import ConfigError
from worldlm.tree import build_tree


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make relative leaf data paths (under data.root, if set) and model/tokenizer paths
    relative to the config file."""
    section = data.get("data")
    data_base = base
    if isinstance(section, dict) and isinstance(section.get("root"), str) and section["root"]:
        section["root"] = _absolute(section["root"], base)
        data_base = Path(section["root"])
    for node in (data.get("nodes") or {}).values():
        paths = node.get("data", {}).get("paths") if isinstance(node, dict) else None
        if isinstance(paths, list):
            node["data"]["paths"] = [_absolute(p, data_base) for p in paths]
    for section in ("model", "tokenizer"):
        part = data.get(section)
        if isinstance(part, dict) and isinstance(part.get("path"), str):
            part["path"] = _absolute(part["path"], base)


def _absolute(value: Any, base: Path) -> Any:
    if not isinstance(value, str):
        return value  # the validator reports the wrong type
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def validate_config(data: dict[str, Any]) -> RunConfig:
    """Validate a config dict (types, ranges, and the federation tree) into a RunConfig."""
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, RunConfig)) from None
    build_tree(config.nodes)
    if (config.train.finetune_rounds or 0) >= config.stop.rounds:
        raise ConfigError(
            f"train.finetune_rounds = {config.train.finetune_rounds} leaves no federated round "
            f"of stop.rounds = {config.stop.rounds}; set it below stop.rounds"
        )
    return config


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from `path` (or the embedded default), apply overrides, validate."""
    if path is None:
        data = tomllib.loads(default_config_text())
        base = Path.cwd()
    else:
        data = read_toml(path)
        base = path.resolve().parent
    data = apply_overrides(data, overrides or [])
    _resolve_paths(data, base)
    return validate_config(data)
