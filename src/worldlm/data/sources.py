"""Read a leaf's documents from JSON Lines, Parquet, Arrow and plain-text files.

Files are read as streams so that `max_chars` can sample the start of a huge corpus without
loading it; every error names the file and says what to do about it.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from worldlm.errors import DataError

# Suffixes picked up when walking a directory; a file named explicitly is read whatever its suffix.
DATA_SUFFIXES = (".jsonl", ".json", ".txt", ".md", ".text", ".parquet", ".arrow")
_JSONL_SUFFIXES = (".jsonl", ".json")
_READ_BYTES = 1 << 20
_PARQUET_BATCH_ROWS = 1024


def read_documents(
    paths: Sequence[Path], *, text_field: str = "text", max_chars: int | None = None
) -> list[str]:
    """Documents from every file or directory in `paths`, in order; blank documents are dropped.

    `max_chars` caps the total characters returned: reading stops once it is reached and the last
    document is truncated.
    """
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be a positive integer or None, got {max_chars}")
    if not paths:
        raise DataError("no data paths given; list at least one file or directory for this leaf")
    docs: list[str] = []
    total = 0
    for path in paths:
        for file in data_files(Path(path)):
            limit = None if max_chars is None else max_chars - total
            with closing(_read_file(file, text_field, limit)) as reader:
                for doc in reader:
                    text = doc if max_chars is None else doc[: max_chars - total]
                    if text.strip():
                        docs.append(text)
                        total += len(text)
                    if max_chars is not None and total >= max_chars:
                        return docs
    return docs


def data_files(path: Path) -> list[Path]:
    """`path` itself if it is a file, else the data files under it (recursive, sorted)."""
    if path.is_file():
        return [path]
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; check the leaf's data paths")
    if not path.is_dir():
        raise DataError(f"{path}: not a regular file or directory; point to data files instead")
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        # Its JSON files describe the dataset; read as JSONL documents they would fail oddly.
        raise DataError(
            f"{path}: a Hugging Face dataset saved with save_to_disk; set data.dataset = "
            f"{str(path)!r} instead of listing it under data.paths"
        )
    files = list(_walk(path))
    if not files:
        wanted = ", ".join(DATA_SUFFIXES)
        raise DataError(
            f"{path}: directory has no readable data files (looked for {wanted}, hidden files "
            "skipped); add documents or point to the right directory"
        )
    return files


def _walk(directory: Path) -> Iterator[Path]:
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _walk(entry)
        elif entry.is_file() and entry.suffix.lower() in DATA_SUFFIXES:
            yield entry


def _read_file(path: Path, text_field: str, limit: int | None) -> Generator[str]:
    """Documents of one file; `limit` is how many characters are still wanted (None: all)."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err}); check that it is readable") from None
    if size == 0:
        raise DataError(f"{path}: file is empty; remove it or fill it with documents")
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        records = _read_jsonl(path, text_field)
    elif suffix == ".parquet":
        records = _read_parquet(path, text_field)
    elif suffix == ".arrow":
        records = _read_arrow(path, text_field)
    else:
        yield from _read_text(path, limit)
        return
    found = False
    with closing(records):
        for doc in records:
            found = found or bool(doc.strip())
            yield doc
    if not found:
        raise DataError(
            f"{path}: yields no documents (no non-blank {text_field!r} values); "
            "remove the file or fill it with text"
        )


def _read_text(path: Path, limit: int | None) -> Generator[str]:
    """The whole file as one document, decoded incrementally and cut at `limit` characters."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts: list[str] = []
    n_chars = 0
    consumed = 0  # bytes handed to the decoder before the current chunk
    at_end = False
    with path.open("rb") as fh:
        while not at_end and (limit is None or n_chars < limit):
            chunk = fh.read(_READ_BYTES)
            at_end = not chunk
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(chunk, final=at_end)
            except UnicodeDecodeError as err:
                # err.start counts from the bytes the decoder buffered from the previous chunk.
                raise _utf8_error(path, consumed - pending + err.start) from None
            consumed += len(chunk)
            parts.append(text)
            n_chars += len(text)
    doc = "".join(parts).removeprefix("\ufeff")
    if at_end and not doc.strip():
        # Only a file read to its end is known to be blank; a sampled prefix may just start blank.
        raise DataError(f"{path}: holds only whitespace; remove it or fill it with text")
    yield doc if limit is None else doc[:limit]


def _read_jsonl(path: Path, text_field: str) -> Generator[str]:
    offset = 0
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _utf8_error(path, offset + err.start, line_no) from None
            offset += len(raw)
            if line_no == 1 and line.startswith("\ufeff"):
                line = line[1:]
            if not line.strip():
                continue
            yield _jsonl_text(path, line, line_no, text_field)


def _jsonl_text(path: Path, line: str, line_no: int, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: line {line_no} is not valid JSON ({err.msg}, column {err.colno}); "
            "a .jsonl/.json data file must hold one JSON object per line"
        ) from None
    except RecursionError:
        raise DataError(
            f"{path}: line {line_no} nests JSON arrays or objects too deeply to read; "
            "a .jsonl/.json data file must hold one JSON object per line"
        ) from None
    if not isinstance(record, dict):
        raise DataError(
            f"{path}: line {line_no} is a JSON {type(record).__name__}, not an object; "
            f'each line must be an object like {{"{text_field}": "..."}}'
        )
    if text_field not in record:
        have = ", ".join(repr(k) for k in record) or "none"
        raise DataError(
            f"{path}: line {line_no} has no field {text_field!r} (fields: {have}); "
            "set text_field to the field that holds the text"
        )
    value = record[text_field]
    if not isinstance(value, str):
        raise DataError(
            f"{path}: line {line_no}: field {text_field!r} is a JSON {type(value).__name__}, "
            "not a string; store the document text as a string"
        )
    return value


def _read_parquet(path: Path, text_field: str) -> Generator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(
            f"{path}: unreadable Parquet file ({err}); re-export it or check it is not truncated"
        ) from None
    with pfile:
        _check_text_column(path, "Parquet", pfile.schema_arrow, text_field)
        try:
            for batch in pfile.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
                for value in batch.column(0).to_pylist():
                    if value is not None:
                        yield value
        except (pa.ArrowException, OSError) as err:
            raise DataError(
                f"{path}: unreadable Parquet file ({err}); re-export it or check it is not "
                "truncated"
            ) from None


def _read_arrow(path: Path, text_field: str) -> Generator[str]:
    """An Arrow IPC file or stream (what Dataset.save_to_disk writes), memory-mapped."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                reader: pa.RecordBatchFileReader | pa.RecordBatchStreamReader = pa.ipc.open_file(
                    source
                )
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:  # not the file format: the stream format
                source.seek(0)
                reader = pa.ipc.open_stream(source)
                batches = iter(reader)
            _check_text_column(path, "Arrow", reader.schema, text_field)
            for batch in batches:
                for value in batch.column(text_field).to_pylist():
                    if value is not None:
                        yield value
    except (pa.ArrowException, OSError) as err:
        raise DataError(
            f"{path}: unreadable Arrow file ({err}); re-export it or check it is not truncated"
        ) from None


def _check_text_column(path: Path, kind_of_file: str, schema: Any, text_field: str) -> None:
    import pyarrow as pa

    if text_field not in schema.names:
        raise DataError(
            f"{path}: {kind_of_file} file has no column {text_field!r} (columns: "
            f"{', '.join(schema.names) or 'none'}); set text_field to the text column"
        )
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)) and not (
        pa.types.is_string_view(kind)
    ):
        raise DataError(
            f"{path}: {kind_of_file} column {text_field!r} has type {kind}, not string; "
            "set text_field to a string column"
        )


def _utf8_error(path: Path, offset: int, line_no: int | None = None) -> DataError:
    where = f"byte offset {offset}" + ("" if line_no is None else f" (line {line_no})")
    return DataError(
        f"{path}: invalid UTF-8 at {where}; re-encode the file as UTF-8 "
        "(e.g. `iconv -f latin1 -t utf-8`)"
    )
