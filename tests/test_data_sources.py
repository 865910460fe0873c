"""Reading documents from JSON Lines, Parquet, plain text and directories."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from worldlm.data.sources import read_documents
from worldlm.errors import DataError


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list[object]]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_jsonl_reads_field_and_skips_blank_lines_and_blank_docs(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(
        '{"text": "first doc", "id": 1}\n\n   \n{"text": "  "}\n{"text": "second\\ndoc"}\n',
        encoding="utf-8",
    )
    assert read_documents([path]) == ["first doc", "second\ndoc"]


def test_json_suffix_is_read_as_json_lines_with_custom_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "b.json", [{"content": "héllo"}, {"content": "wörld"}])
    assert read_documents([path], text_field="content") == ["héllo", "wörld"]


def test_parquet_reads_column_and_skips_nulls(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "c.parquet", {"text": ["one", None, "two", ""], "n": [1, 2, 3, 4]}
    )
    assert read_documents([path]) == ["one", "two"]


def test_plain_text_file_is_one_document(tmp_path: Path) -> None:
    body = "line one\n\nline two — Привет 🙂\n"
    for name in ("d.txt", "e.md", "f.text", "g.log"):
        (tmp_path / name).write_text(body, encoding="utf-8")
        assert read_documents([tmp_path / name]) == [body]


def test_directory_is_walked_recursively_sorted_skipping_hidden_and_other_files(
    tmp_path: Path,
) -> None:
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.txt").write_text("B", encoding="utf-8")
    (root / "a.txt").write_text("A", encoding="utf-8")
    write_jsonl(root / "sub" / "c.jsonl", [{"text": "C1"}, {"text": "C2"}])
    write_parquet(root / "sub" / "deeper" / "d.parquet", {"text": ["D"]})
    (root / "sub" / "z.md").write_text("Z", encoding="utf-8")
    (root / ".secret.txt").write_text("hidden", encoding="utf-8")
    (root / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    (root / "notes.csv").write_text("ignored", encoding="utf-8")
    (root / "model.bin").write_bytes(b"\xff\xfe")
    assert read_documents([root]) == ["A", "B", "C1", "C2", "D", "Z"]


def test_several_paths_are_read_in_order(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("X", encoding="utf-8")
    (tmp_path / "y.txt").write_text("Y", encoding="utf-8")
    assert read_documents([tmp_path / "y.txt", tmp_path / "x.txt"]) == ["Y", "X"]


def test_max_chars_caps_total_and_truncates_last_document(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "abcde"}, {"text": "fghij"}, {"text": "k"}])
    assert read_documents([path], max_chars=7) == ["abcde", "fg"]
    assert read_documents([path], max_chars=5) == ["abcde"]
    assert read_documents([path], max_chars=100) == ["abcde", "fghij", "k"]


def test_max_chars_stops_before_reading_later_broken_lines_and_files(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "abcdef"}\nnot json at all\n', encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"\xff broken")
    assert read_documents([path, tmp_path / "b.txt"], max_chars=4) == ["abcd"]


def test_max_chars_reads_only_a_prefix_of_a_large_text_file(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    # Invalid UTF-8 far past the prefix must not be reached.
    path.write_bytes(b"a" * (3 << 20) + b"\xff")
    assert read_documents([path], max_chars=10) == ["a" * 10]
    with pytest.raises(DataError, match="byte offset 3145728"):
        read_documents([path])


def test_max_chars_must_be_positive(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    with pytest.raises(ValueError, match="max_chars"):
        read_documents([tmp_path / "a.txt"], max_chars=0)


# --- errors: each names the file and says what to do -------------------------------------------


def error_for(paths: list[Path], **kwargs: object) -> str:
    with pytest.raises(DataError) as info:
        read_documents(paths, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_missing_path(tmp_path: Path) -> None:
    msg = error_for([tmp_path / "nope.jsonl"])
    assert "nope.jsonl" in msg and "no such file" in msg


def test_no_paths() -> None:
    assert "no data paths" in error_for([])


def test_directory_without_readable_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "data.csv").write_text("a,b", encoding="utf-8")
    (empty / ".hidden.txt").write_text("x", encoding="utf-8")
    msg = error_for([empty])
    assert "empty_dir" in msg and "no readable data files" in msg and ".jsonl" in msg


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "empty.parquet"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    msg = error_for([tmp_path / name])
    assert name in msg and "empty" in msg


def test_whitespace_only_text_file(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text(" \n\t\n", encoding="utf-8")
    msg = error_for([tmp_path / "blank.txt"])
    assert "blank.txt" in msg and "whitespace" in msg


def test_jsonl_without_documents(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "  "}])
    msg = error_for([path])
    assert "blank.jsonl" in msg and "no documents" in msg


def test_parquet_without_documents(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "nulls.parquet", {"text": pa.array([None, None], pa.string())})
    msg = error_for([path])
    assert "nulls.parquet" in msg and "no documents" in msg


def test_invalid_utf8_in_text_file_gives_byte_offset(tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 au lait")
    msg = error_for([tmp_path / "latin.txt"])
    assert "latin.txt" in msg and "invalid UTF-8" in msg and "byte offset 3" in msg


def test_invalid_utf8_split_across_read_chunks_gives_byte_offset(tmp_path: Path) -> None:
    # A lead byte right at the end of the first 1 MiB read, with a bad continuation after it.
    data = b"a" * ((1 << 20) - 1) + b"\xc3" + b"("
    (tmp_path / "split.txt").write_bytes(data)
    assert f"byte offset {(1 << 20) - 1}" in error_for([tmp_path / "split.txt"])


def test_truncated_utf8_at_end_of_text_file(tmp_path: Path) -> None:
    (tmp_path / "cut.txt").write_bytes(b"abc\xe2\x82")
    assert "byte offset 3" in error_for([tmp_path / "cut.txt"])


def test_invalid_utf8_in_jsonl_gives_byte_offset_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    msg = error_for([tmp_path / "bad.jsonl"])
    assert "bad.jsonl" in msg and "byte offset 28" in msg and "line 2" in msg


def test_invalid_json_names_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    msg = error_for([tmp_path / "bad.jsonl"])
    assert "bad.jsonl" in msg and "line 3" in msg and "not valid JSON" in msg


def test_json_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "list.jsonl", [{"text": "ok"}, ["text", "x"]])
    msg = error_for([path])
    assert "list.jsonl" in msg and "line 2" in msg and "not an object" in msg


def test_json_line_without_text_field_names_field_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "nofield.jsonl", [{"body": "x", "id": 3}])
    msg = error_for([path])
    assert "nofield.jsonl" in msg and "line 1" in msg and "'text'" in msg and "'body'" in msg
    assert "text_field" in msg


def test_json_field_that_is_not_a_string(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "num.jsonl", [{"text": "ok"}, {"text": 42}])
    msg = error_for([path])
    assert "num.jsonl" in msg and "line 2" in msg and "'text'" in msg and "not a string" in msg


def test_parquet_without_column_lists_columns(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "cols.parquet", {"body": ["x"], "lang": ["en"]})
    msg = error_for([path])
    assert "cols.parquet" in msg and "'text'" in msg and "body, lang" in msg


def test_parquet_with_non_string_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "ints.parquet", {"text": [1, 2]})
    msg = error_for([path])
    assert "ints.parquet" in msg and "not string" in msg


def test_unreadable_parquet(tmp_path: Path) -> None:
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet at all")
    msg = error_for([tmp_path / "junk.parquet"])
    assert "junk.parquet" in msg and "unreadable Parquet" in msg


def test_error_in_a_directory_names_the_inner_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("{broken\n", encoding="utf-8")
    msg = error_for([tmp_path])
    assert str(tmp_path / "b.jsonl") in msg
