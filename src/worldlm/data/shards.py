"""A partition of one dataset computed from its config: every leaf's example indices.

The bridge between the pure functions of `partition` (labels, sizes, seed) and a dataset's
columns; `[partition]`'s expansion, each sharded leaf and `worldlm partition` all come here, so
they agree on the split.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worldlm.config import LeafDataConfig
from worldlm.config_shard import PartitionParams, ShardConfig
from worldlm.data import partition as pt
from worldlm.data.hf_datasets import column_values, open_dataset, source_name
from worldlm.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass(frozen=True)
class Split:
    """Each leaf's indices, in leaf order; for kind column, the value each leaf stands for."""

    parts: pt.Parts
    values: list[Any] | None = None


def split_dataset(
    ds: Dataset, params: PartitionParams, leaves: int | None, seed: int, where: str
) -> Split:
    """The partition `params` describes of `ds` (`leaves` is None for kind column)."""
    n = len(ds)
    try:
        if params.kind == "column":
            assert params.column is not None
            values, parts = pt.column_partition(column_values(ds, params.column, where))
            small = [(v, len(p)) for v, p in zip(values, parts, strict=True)]
            small = [(v, k) for v, k in small if k < params.min_size]
            if small:
                shown = ", ".join(f"{v!r}: {k}" for v, k in small[:5])
                raise ValueError(
                    f"{len(small)} value(s) of column {params.column!r} have fewer than "
                    f"min_size = {params.min_size} rows ({shown}); filter the dataset or lower "
                    "min_size"
                )
            return Split(parts, values)
        assert leaves is not None
        if params.kind == "iid":
            return Split(pt.iid_partition(n, leaves, seed, min_size=params.min_size))
        if params.kind == "size_skew":
            assert params.sigma is not None
            parts = pt.size_skew_partition(n, leaves, params.sigma, seed, min_size=params.min_size)
            return Split(parts)
        assert params.column is not None and params.alpha is not None
        labels = column_values(ds, params.column, where)
        parts = pt.dirichlet_partition(labels, leaves, params.alpha, seed, min_size=params.min_size)
        return Split(parts)
    except ValueError as exc:
        raise DataError(f"{where}: cannot partition its {n} rows: {exc}") from None


def shard_indices(spec: LeafDataConfig, cache_dir: Path, where: str) -> np.ndarray:
    """The rows of the dataset that leaf data `spec` (with a shard) reads."""
    assert spec.shard is not None
    # What the split depends on, alone: the same key for every leaf of one partition.
    whole = spec.model_copy(
        update={
            "shard": spec.shard.model_copy(update={"index": 0}),
            "max_chars": None,
            "text_field": None,
        }
    )
    try:
        split = _split_of(whole, cache_dir)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    if len(split.parts) != spec.shard.leaves:
        raise DataError(
            f"{where}: column {spec.shard.column!r} of {source_name(spec)} now has "
            f"{len(split.parts)} values, not the {spec.shard.leaves} leaves the partition was "
            "made for; the dataset changed since the config was written: write the config "
            "again from [partition]"
        )
    return split.parts[spec.shard.index]


# Every leaf of a partition computes the whole split and keeps its part: cached, the dataset is
# opened and split once per process rather than once per leaf.
@functools.lru_cache(maxsize=4)
def _split_of(whole: LeafDataConfig, cache_dir: Path) -> Split:
    shard = whole.shard
    assert isinstance(shard, ShardConfig)
    ds = open_dataset(whole, cache_dir)
    leaves = None if shard.kind == "column" else shard.leaves
    return split_dataset(ds, shard, leaves, shard.seed, source_name(whole))
