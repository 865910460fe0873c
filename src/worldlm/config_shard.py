"""How one dataset is split among simulated leaves (`worldlm.data.partition`), as config.

`PartitionParams` is what `[partition]` and each leaf's `data.shard` share; `ShardConfig` is a
leaf's part of the split, written on every leaf when `[partition]` expands into node tables
(`worldlm.partition_tree`), so that each leaf computes its own examples from its table alone.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from worldlm.config_section import Section

PartitionKind = Literal["iid", "dirichlet", "column", "size_skew"]

# Which of the optional parameters each kind takes; any other is refused (not silently ignored).
_PARAMS: dict[str, tuple[str, ...]] = {
    "iid": (),
    "dirichlet": ("column", "alpha"),
    "column": ("column",),
    "size_skew": ("sigma",),
}


class PartitionParams(Section):
    kind: PartitionKind = Field(
        description="iid (equal random shares), dirichlet (label skew: Dirichlet(alpha) shares "
        "of each label of `column`), column (one leaf per value of `column`) or size_skew "
        "(LogNormal(0, sigma) leaf sizes)."
    )
    column: str | None = Field(
        None,
        description="dirichlet: the label column; column: the column whose values become "
        "leaves (e.g. source or language).",
    )
    alpha: float | None = Field(
        None,
        gt=0.0,
        description="dirichlet: concentration; small (0.1) gives each leaf few labels, large "
        "(100) near-uniform label shares.",
    )
    sigma: float | None = Field(
        None,
        ge=0.0,
        description="size_skew: standard deviation of the log of the leaf sizes; 0 = equal "
        "sizes, 1 = sizes typically within a factor e (2.7) of the median.",
    )
    min_size: int = Field(
        2,
        ge=0,
        description="Examples every leaf gets at least (dirichlet redraws until it holds); a "
        "leaf needs 2 chunks for its train/validation split.",
    )

    @model_validator(mode="after")
    def _kind_params(self) -> PartitionParams:
        wanted = _PARAMS[self.kind]
        for name in ("column", "alpha", "sigma"):
            given = getattr(self, name) is not None
            if name in wanted and not given:
                raise ValueError(f"kind = {self.kind!r} needs {name}")
            if name not in wanted and given:
                raise ValueError(f"kind = {self.kind!r} takes no {name}; remove it")
        return self


class ShardConfig(PartitionParams):
    """A leaf's part of a partitioned dataset: part `index` of `leaves`."""

    leaves: int = Field(ge=1, description="How many leaves the dataset is split among.")
    index: int = Field(ge=0, description="This leaf's part, from 0.")
    seed: int = Field(ge=0, description="Seed of the split (the run seed unless set).")

    @model_validator(mode="after")
    def _index_in_range(self) -> ShardConfig:
        if self.index >= self.leaves:
            raise ValueError(f"index {self.index} is not below leaves = {self.leaves}")
        return self
