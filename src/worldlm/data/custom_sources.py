"""Data sources that plugins register: a leaf whose `data.source` names one reads its
documents from the function registered under that name, called with the leaf's
`data.options`. The function runs where the leaf runs (its own machine when deployed), so a
member can read from a database or an internal API without exporting files first."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from worldlm.data.instructions import Document, conversation_from_record, is_instruction_record
from worldlm.errors import DataError
from worldlm.registration import add_entry

# options -> documents: plain strings, or records (dicts) holding the text field or
# instruction columns (messages; prompt with response or completion).
DataSourceFactory = Callable[[Mapping[str, Any]], Iterable[str | Mapping[str, Any]]]
DATA_SOURCES: dict[str, DataSourceFactory] = {}


def register_data_source(name: str) -> Callable[[DataSourceFactory], DataSourceFactory]:
    """Decorator: `factory(options)` yields a leaf's documents; selectable per leaf as
    `data.source = name` with `data.options = {...}`."""

    def wrap(factory: DataSourceFactory) -> DataSourceFactory:
        return add_entry(DATA_SOURCES, name, factory, "data source")

    return wrap


def check_data_source(name: str, where: str) -> None:
    if name not in DATA_SOURCES:
        known = ", ".join(sorted(DATA_SOURCES)) or "none"
        raise DataError(
            f"{where}.source: no data source {name!r} is registered (registered: {known}); "
            "name the module that registers it in run.plugins"
        )


def source_documents(
    name: str,
    options: Mapping[str, Any],
    *,
    text_field: str,
    max_chars: int | None,
    where: str,
) -> list[Document]:
    """The documents the source yields, until `max_chars` characters (the last text cut)."""
    check_data_source(name, where)
    docs: list[Document] = []
    total = 0
    for number, item in enumerate(DATA_SOURCES[name](options)):
        if max_chars is not None and total >= max_chars:
            break
        if isinstance(item, Mapping) and is_instruction_record(item, text_field):
            conversation = conversation_from_record(item, f"{where}: document {number}")
            docs.append(conversation)
            total += conversation.chars
            continue
        text = item.get(text_field) if isinstance(item, Mapping) else item
        if not isinstance(text, str):
            raise DataError(
                f"{where}: data source {name!r} yielded {type(item).__name__} as document "
                f"{number}; yield strings, or dicts with a {text_field!r} string or "
                "instruction columns"
            )
        if text.strip():
            text = text if max_chars is None else text[: max_chars - total]
            docs.append(text)
            total += len(text)
    if not docs:
        raise DataError(f"{where}: data source {name!r} yielded no non-blank documents")
    return docs
