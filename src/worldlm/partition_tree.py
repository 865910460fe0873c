"""Expand `[partition]` into ordinary node tables: a root, optional groups, N sharded leaves.

Runs on the config dict after overrides and path resolution and before validation, so the
federation tree, the run directory's config.toml and every later step see a normal tree whose
leaves each read `data.shard` of one dataset. Node tables the config gives for the generated
paths are laid over the generated ones (a group's `inner_rounds`, a leaf's `dp`, ...).

Generated names: leaves `leaf0..leafN-1` (zero-padded), or for kind column the column's values;
groups `g0..gG-1`, or for group_column its values. Only kind column and group_column need to
read the dataset here (to learn the values); the other kinds are split when the leaves read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from worldlm.config_errors import format_validation_error
from worldlm.config_partition import PartitionConfig, PartitionSection
from worldlm.errors import ConfigError, DataError

if TYPE_CHECKING:  # the data package (numpy, datasets) is imported only for a [partition]
    from worldlm.data.shards import Split


def expand_partition(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with `[partition]` replaced by the node tables it stands for (unchanged when it
    has none)."""
    if "partition" not in data:
        return data
    try:
        spec = PartitionSection.model_validate({"partition": data["partition"]}).partition
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, PartitionSection)) from None
    run = data["run"] if isinstance(data.get("run"), dict) else {}
    seed = spec.seed if spec.seed is not None else _run_seed(run)
    leaf_names, group_of = _layout(spec, seed, _cache_dir(run))
    nodes: dict[str, dict[str, Any]] = {spec.root: {}}
    for group in sorted({g for g in group_of if g is not None}):
        nodes[f"{spec.root}/{group}"] = {}
    source = spec.data.model_dump(mode="json", exclude_none=True)
    params = spec.model_dump(mode="json", include={"kind", "column", "alpha", "sigma", "min_size"})
    for index, (name, group) in enumerate(zip(leaf_names, group_of, strict=True)):
        path = "/".join(p for p in (spec.root, group, name) if p is not None)
        shard = {**params, "leaves": len(leaf_names), "index": index, "seed": seed}
        shard = {k: v for k, v in shard.items() if v is not None}
        nodes[path] = {"data": {**source, "shard": shard}}
    _lay_over(nodes, data.get("nodes") or {})
    return {**{k: v for k, v in data.items() if k != "partition"}, "nodes": nodes}


def _run_seed(run: dict[str, Any]) -> int:
    seed = run.get("seed", 0)
    # A seed of the wrong type is reported by RunConfig's validation, right after this.
    return seed if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else 0


def _cache_dir(run: dict[str, Any]) -> Path:
    """run.cache_dir as the run will use it (where hub datasets are converted to Arrow)."""
    from worldlm.data.corpora import default_cache_dir

    given = run.get("cache_dir")
    return Path(given) if isinstance(given, str) and given else default_cache_dir()


def _layout(spec: PartitionConfig, seed: int, cache_dir: Path) -> tuple[list[str], list[Any]]:
    """The leaf names, and each leaf's group name (None: directly under the root)."""
    from worldlm.data import partition as pt

    needs_values = spec.kind == "column" or spec.group_column is not None
    split = _split(spec, seed, cache_dir) if needs_values else None
    if spec.kind == "column":
        assert split is not None and split.values is not None
        names = pt.node_names(split.values)
    else:
        assert spec.leaves is not None
        names = pt.numbered("leaf", spec.leaves)
    if spec.group_column is not None:
        assert split is not None
        return names, _groups_by_column(spec, split, cache_dir)
    if spec.groups == 0:
        return names, [None] * len(names)
    if spec.groups > len(names):
        raise ConfigError(
            f"partition.groups: {spec.groups} is above the {len(names)} leaves (one per value "
            f"of column {spec.column!r})"
        )
    group_names = pt.numbered("g", spec.groups)
    return names, [group_names[g] for g in pt.round_robin_groups(len(names), spec.groups)]


def _split(spec: PartitionConfig, seed: int, cache_dir: Path) -> Split:
    from worldlm.data.hf_datasets import open_dataset, source_name
    from worldlm.data.shards import split_dataset

    try:
        ds = open_dataset(spec.data, cache_dir)
        return split_dataset(ds, spec, spec.leaves, seed, source_name(spec.data))
    except DataError as exc:
        raise ConfigError(f"partition.data: {exc}") from None


def _groups_by_column(spec: PartitionConfig, split: Split, cache_dir: Path) -> list[str]:
    from worldlm.data import partition as pt
    from worldlm.data.hf_datasets import column_values, open_dataset, source_name

    assert spec.group_column is not None
    where = f"partition.group_column ({source_name(spec.data)})"
    try:
        values = column_values(open_dataset(spec.data, cache_dir), spec.group_column, where)
        chosen = [pt.majority(values, part) for part in split.parts]
    except (DataError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    distinct = sorted(set(chosen), key=repr)
    names = dict(zip(distinct, pt.node_names(distinct), strict=True))
    return [names[v] for v in chosen]


def _lay_over(nodes: dict[str, dict[str, Any]], given: Any) -> None:
    """Merge the config's own node tables into the generated ones; they may set a generated
    node's settings, never add a node or give a leaf other data."""
    if not isinstance(given, dict):
        raise ConfigError("nodes: must be a table of node tables")
    for path, table in given.items():
        if path not in nodes:
            shown = ", ".join(list(nodes)[:8]) + (", ..." if len(nodes) > 8 else "")
            raise ConfigError(
                f"nodes.{path}: not a node of the tree [partition] generates ({shown}); with "
                "[partition] the tree is generated, and node tables only set its nodes' settings"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"nodes.{path}: must be a table")
        if "data" in table:
            raise ConfigError(
                f"nodes.{path}.data: [partition] gives every leaf its data; remove it (set "
                "partition.data instead)"
            )
        nodes[path] = {**nodes[path], **table}
