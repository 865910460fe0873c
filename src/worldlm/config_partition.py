"""The `[partition]` section: one dataset split into N simulated leaves under a generated tree.

It is not part of `RunConfig`: `worldlm.partition_tree` expands it into ordinary node tables
before validation (each leaf's `data` gets a `shard`), so the rest of worldlm sees a normal
tree, and a run directory's config.toml holds the expanded tree.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from worldlm.config import LeafDataConfig
from worldlm.config_section import Section
from worldlm.config_shard import PartitionParams


class PartitionConfig(PartitionParams):
    data: LeafDataConfig = Field(
        description="The dataset split among the leaves: a leaf data table with dataset or hub "
        "(and split, subset, text_field, max_chars as for a leaf); every leaf gets a copy with "
        "its own shard."
    )
    leaves: int | None = Field(
        None,
        ge=1,
        description="How many leaves (iid, dirichlet, size_skew); column: one per value, so "
        "leave it unset.",
    )
    seed: int | None = Field(None, ge=0, description="Seed of the split; default run.seed.")
    groups: int = Field(
        0,
        ge=0,
        description="Sub-federations between the root and the leaves, leaf i in group i mod "
        "groups; 0 = the leaves are the root's children.",
    )
    group_column: str | None = Field(
        None,
        description="Instead of groups: one sub-federation per value of this column, each leaf "
        "in the group of its most common value (e.g. language family).",
    )
    root: str = Field(
        "world", min_length=1, description="The root node's name (its path) in the generated tree."
    )

    @model_validator(mode="after")
    def _shape(self) -> PartitionConfig:
        if self.data.dataset is None and self.data.hub is None:
            raise ValueError("partition.data needs dataset or hub (a dataset with columns)")
        if self.data.shard is not None:
            raise ValueError("partition.data.shard is written by the partition; remove it")
        if self.kind == "column" and self.leaves is not None:
            raise ValueError("kind = 'column' makes one leaf per value; remove leaves")
        if self.kind != "column" and self.leaves is None:
            raise ValueError(f"kind = {self.kind!r} needs leaves")
        if self.groups and self.group_column is not None:
            raise ValueError("give groups or group_column, not both")
        if self.leaves is not None and self.groups > self.leaves:
            raise ValueError(f"groups = {self.groups} is above leaves = {self.leaves}")
        return self


class PartitionSection(Section):
    """Validates `[partition]` where errors can name its keys (`partition.alpha`)."""

    partition: PartitionConfig
