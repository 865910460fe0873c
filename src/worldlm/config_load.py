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
from worldlm.config_overrides import refuse_unknown_nodes
from worldlm.config_toml import apply_overrides, read_toml
from worldlm.errors import ConfigError
from worldlm.hub import is_hub_id
from worldlm.partition_tree import expand_partition
from worldlm.plugins import load_plugins, plugins_of
from worldlm.strategies.fedbuff import check_fedbuff_method
from worldlm.train.data_parallel import check_batch
from worldlm.train.trainer import build_trainer
from worldlm.tree import build_tree


def resolve_paths(data: dict[str, Any], base: Path) -> None:
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
    # A saved dataset's directory, for a leaf or for [partition] (a hub id is no path).
    for table in [*(data.get("nodes") or {}).values(), data.get("partition")]:
        leaf_data = table.get("data") if isinstance(table, dict) else None
        if isinstance(leaf_data, dict) and "dataset" in leaf_data:
            leaf_data["dataset"] = _absolute(leaf_data["dataset"], data_base)
    for section in ("model", "tokenizer"):
        part = data.get(section)
        if isinstance(part, dict) and isinstance(part.get("path"), str):
            local = _absolute(part["path"], base)
            # A model.path that is not there may be a hub id, read from the hub cache later.
            hub = section == "model" and is_hub_id(part["path"]) and not Path(local).exists()
            part["path"] = part["path"] if hub else local


def _absolute(value: Any, base: Path) -> Any:
    if not isinstance(value, str):
        return value  # the validator reports the wrong type
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def validate_config(data: dict[str, Any]) -> RunConfig:
    """Validate a config dict (types, ranges, and the federation tree) into a RunConfig,
    after importing its plugins (`run.plugins`), whose registrations it may name. A
    `[partition]` is first expanded into the node tables it stands for."""
    load_plugins(plugins_of(data))
    data = expand_partition(data)
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, RunConfig)) from None
    build_tree(config.nodes)
    check_fedbuff_method(config.run.method, config.nodes)
    build_trainer(config.train)  # refuses a trainer no module registered
    if config.train.precision == "bf16" and config.model.load_in != "full":
        raise ConfigError(
            f'train.precision = "bf16" casts the model to bfloat16, which a base quantized to '
            f'{config.model.load_in} is not; use "auto" (bf16 autocast) with model.load_in'
        )
    if config.train.shard == "fsdp" and config.model.load_in != "full":
        raise ConfigError(
            f'train.shard = "fsdp" cannot split a base quantized to {config.model.load_in} '
            'by bitsandbytes over the ranks; use train.shard = "none" (DDP) with model.load_in'
        )
    if config.run.leaf_ranks > 1:
        if config.run.backend != "ray":
            raise ConfigError(
                f"run.leaf_ranks = {config.run.leaf_ranks} needs run.backend = 'ray' (in "
                "process, every leaf trains in this one process); or deploy the leaf with "
                "torchrun (README, Several GPUs)"
            )
        check_batch(config.train, config.run.leaf_ranks)
    if (config.train.finetune_rounds or 0) >= config.stop.rounds:
        raise ConfigError(
            f"train.finetune_rounds = {config.train.finetune_rounds} leaves no federated round "
            f"of stop.rounds = {config.stop.rounds}; set it below stop.rounds"
        )
    return config


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from `path` (or the embedded default), apply overrides, validate."""
    if isinstance(overrides, str):
        raise TypeError("overrides is a list of 'key=value' strings, not one string")
    path = Path(path) if isinstance(path, str) else path
    if path is None:
        data = tomllib.loads(default_config_text())
        base = Path.cwd()
    else:
        data = read_toml(path)
        base = path.resolve().parent
    return compose_config(data, overrides or [], base)


def compose_config(data: dict[str, Any], overrides: list[str], base: Path) -> RunConfig:
    """A config dict with `--set`-style overrides applied (none may name a node the tree
    lacks) and relative paths taken from `base`, validated."""
    refuse_unknown_nodes(data, overrides)
    data = apply_overrides(data, overrides)
    resolve_paths(data, base)
    return validate_config(data)
