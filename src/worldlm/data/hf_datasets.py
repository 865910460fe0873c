"""Hugging Face datasets as a leaf's data: saved on disk, or a repo in the local hub cache.

Nothing is downloaded: a saved dataset is memory-mapped where it lies, and a hub id is read from
the snapshot that `hf download` (or an earlier online `datasets.load_dataset`) left in the hub
cache. Rows become documents from a text column, or conversations from chat columns (the
records of `instructions`: `messages`, or `prompt` with `response` or `completion`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worldlm.config import LeafDataConfig
from worldlm.data.instructions import Document, conversation_from_record
from worldlm.errors import DataError
from worldlm.hub import cached_snapshot, hub_cache_dir

if TYPE_CHECKING:  # datasets takes a second to import; only leaves that use one pay for it
    from datasets import Dataset

CHAT_COLUMNS = ("messages", "system", "prompt", "response", "completion")
_BATCH_ROWS = 1024


def source_name(spec: LeafDataConfig) -> str:
    """How errors name the dataset: its directory or file, or its hub id (and subset)."""
    if spec.hub is not None:
        return f"hub dataset {spec.hub!r}" + (f" (subset {spec.subset!r})" if spec.subset else "")
    return f"dataset {spec.dataset}"


def open_dataset(spec: LeafDataConfig, cache_dir: Path) -> Dataset:
    """The split of the dataset `spec` names (dataset or hub); DataError says what is missing.
    Hub datasets are converted to Arrow once, under `cache_dir`/datasets."""
    with _quiet():
        if spec.hub is not None:
            return _from_hub(spec, cache_dir)
        assert spec.dataset is not None
        return _from_disk(Path(spec.dataset), spec.split)


def check_dataset_source(spec: LeafDataConfig, key: str) -> None:
    """Fail fast, before a run starts, when the dataset's directory, file or hub snapshot is
    not there (its contents are checked when the leaf reads it)."""
    if spec.dataset is not None and not Path(spec.dataset).exists():
        raise DataError(
            f"{key}.dataset: {spec.dataset} does not exist (a directory written by "
            "save_to_disk or an .arrow file; relative paths are read from data.root, or else "
            "from the config file's directory)"
        )
    if spec.hub is not None:
        hub_snapshot(spec.hub, f"{key}.hub")


def hub_snapshot(repo_id: str, key: str) -> Path:
    """The cached snapshot of hub dataset `repo_id`; DataError naming the id and the cache."""
    found = cached_snapshot(repo_id, "dataset")
    if found is None:
        raise DataError(
            f"{key}: no dataset {repo_id!r} in the Hugging Face hub cache {hub_cache_dir()} "
            "(HF_HUB_CACHE, or HF_HOME/hub); worldlm reads datasets offline and never downloads "
            f"one: fetch it once where there is a network (`hf download {repo_id} --repo-type "
            "dataset`, into that cache), or save it with save_to_disk and set data.dataset"
        )
    return found


def _from_hub(spec: LeafDataConfig, cache_dir: Path) -> Dataset:
    import datasets

    assert spec.hub is not None
    snapshot = hub_snapshot(spec.hub, "data.hub")
    split = spec.split or "train"
    try:
        loaded = datasets.load_dataset(
            str(snapshot),
            name=spec.subset,
            split=split,
            cache_dir=str(cache_dir / "datasets"),
            download_mode="reuse_dataset_if_exists",
        )
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetGenerationError) as exc:
        raise DataError(
            f"{source_name(spec)} (snapshot {snapshot}): cannot load split {split!r}: {exc}; "
            "check data.split and data.subset"
        ) from None
    assert isinstance(loaded, datasets.Dataset)
    return loaded


def _from_disk(path: Path, split: str | None) -> Dataset:
    import datasets

    if path.is_file():
        if path.suffix.lower() != ".arrow":
            raise DataError(
                f"{path}: data.dataset is a directory written by save_to_disk or an .arrow "
                "file; list other files under data.paths"
            )
        if split is not None:
            raise DataError(f"{path}: an .arrow file has no splits; remove data.split")
        try:
            return datasets.Dataset.from_file(str(path))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable Arrow file ({exc}); re-export it") from None
    if not path.is_dir():
        raise DataError(f"{path}: does not exist; data.dataset names a saved dataset directory")
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(
            f"{path}: not a dataset saved with Dataset.save_to_disk or DatasetDict.save_to_disk "
            f"({exc}); save it that way, or list its files under data.paths"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise DataError(
                f"{path}: the saved DatasetDict has no split {name!r} (splits: "
                f"{', '.join(loaded) or 'none'}); set data.split"
            )
        return loaded[name]
    if split is not None:
        raise DataError(f"{path}: a saved Dataset (not a DatasetDict) has no splits; remove split")
    assert isinstance(loaded, datasets.Dataset)
    return loaded


def column_values(ds: Dataset, column: str, where: str) -> list[Any]:
    """Every row's value of `column`: ClassLabel ids as their names, other scalars as they are."""
    if column not in ds.column_names:
        raise DataError(
            f"{where}: no column {column!r} (columns: {', '.join(ds.column_names)}); set the "
            "partition's column to one of them"
        )
    feature = ds.features[column]
    values = ds.with_format("arrow")[column].to_pylist()  # list(ds[column]) is 100x slower
    if any(isinstance(v, (list, dict)) for v in values):
        raise DataError(
            f"{where}: column {column!r} holds lists or records; partition by a column of "
            "single values (labels, names, numbers)"
        )
    names = getattr(feature, "names", None)  # a ClassLabel: show "sports", not 2
    if names:
        return [None if v is None or v < 0 else names[v] for v in values]
    return values


def text_or_chat(ds: Dataset, text_field: str, where: str) -> list[str]:
    """The columns documents come from: the text column, else the chat columns present."""
    if text_field in ds.column_names:
        dtype = getattr(ds.features[text_field], "dtype", None)
        if dtype not in ("string", "large_string"):
            raise DataError(
                f"{where}: column {text_field!r} is {ds.features[text_field]}, not text; set "
                "data.text_field (or the leaf's text_field) to a string column"
            )
        return [text_field]
    chat = [c for c in CHAT_COLUMNS if c in ds.column_names]
    if "messages" in chat or "prompt" in chat:
        return chat
    raise DataError(
        f"{where}: no text column {text_field!r} and no chat columns (messages, or prompt and "
        f"response) (columns: {', '.join(ds.column_names)}); set data.text_field or the "
        "leaf's text_field to the column holding the text"
    )


def dataset_documents(
    ds: Dataset,
    indices: Sequence[int] | np.ndarray | None,
    *,
    text_field: str,
    max_chars: int | None,
    where: str,
) -> list[Document]:
    """The documents of rows `indices` (all rows if None), in that order: texts (blank ones
    dropped, the last one cut at `max_chars` in total) or whole conversations (until
    `max_chars` characters of content)."""
    columns = text_or_chat(ds, text_field, where)
    rows = ds.select_columns(columns)
    numbers = range(len(ds)) if indices is None else [int(i) for i in indices]
    if indices is not None:
        rows = rows.select(numbers)
    docs: list[Document] = []
    total = 0
    for number, row in zip(numbers, _rows(rows), strict=True):
        if max_chars is not None and total >= max_chars:
            break
        if columns == [text_field]:
            value = row.get(text_field)
            if value is None or not value.strip():
                continue
            text = value if max_chars is None else value[: max_chars - total]
            docs.append(text)
            total += len(text)
        else:
            conversation = conversation_from_record(row, f"{where}: row {number}")
            docs.append(conversation)
            total += conversation.chars
    if not docs:
        raise DataError(
            f"{where}: its rows hold no documents (no non-blank {columns[0]!r} values); check "
            "the dataset and the text column"
        )
    return docs


def _rows(ds: Dataset) -> Iterator[dict[str, Any]]:
    for batch in ds.iter(batch_size=_BATCH_ROWS):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys), strict=True):
            # Absent optional chat columns (None) are left out, as a JSONL record would be.
            yield {k: v for k, v in zip(keys, values, strict=True) if v is not None}


@contextmanager
def _quiet() -> Iterator[None]:
    """No tqdm bars from datasets while worldlm draws its own progress display."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()
