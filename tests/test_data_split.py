"""Chunking documents and the deterministic train/validation split."""

from __future__ import annotations

import pytest

from worldlm.data.split import chunk_document, split_documents
from worldlm.errors import DataError

DOCS = [f"document {i} " + "word " * (i % 7) for i in range(40)]


def test_chunks_respect_size_and_are_lossless_for_plain_text() -> None:
    paragraph = "The quick brown fox jumps over the lazy dog.\n"
    doc = (paragraph * 5 + "\n") * 30
    chunks = chunk_document(doc, 300)
    assert len(chunks) > 10
    assert all(len(c) <= 300 for c in chunks)
    assert "".join(chunks) == doc


def test_chunks_prefer_paragraph_then_line_then_space_boundaries() -> None:
    doc = "a" * 60 + "\n\n" + "b" * 20 + "\n" + "c" * 10 + " " + "d" * 50
    assert chunk_document(doc, 100) == [
        "a" * 60 + "\n\n",
        "b" * 20 + "\n" + "c" * 10 + " " + "d" * 50,
    ]
    no_para = "a" * 70 + "\n" + "b" * 10 + " " + "c" * 50
    assert chunk_document(no_para, 100)[0] == "a" * 70 + "\n"
    words = "x" * 60 + " " + "y" * 60
    assert chunk_document(words, 100) == ["x" * 60 + " ", "y" * 60]


def test_chunks_hard_cut_without_boundaries_and_drop_blank_pieces() -> None:
    assert chunk_document("z" * 250, 100) == ["z" * 100, "z" * 100, "z" * 50]
    # A boundary in the front half of a window is not used: it would leave a tiny chunk.
    assert chunk_document("ab " + "z" * 197, 100)[0] == "ab " + "z" * 97
    assert chunk_document("   ", 100) == []
    assert chunk_document("short", 100) == ["short"]


def test_split_is_disjoint_and_covers_every_chunk_in_order() -> None:
    train, val = split_documents(DOCS, val_fraction=0.25, seed=1, leaf="eu/fr", chunk_chars=2000)
    assert len(val) == 10 and len(train) == 30
    # Chunks are distinct here, so membership identifies them.
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(DOCS)
    assert train == [d for d in DOCS if d in set(train)]
    assert val == [d for d in DOCS if d in set(val)]


def test_split_is_deterministic_and_depends_on_seed_and_leaf() -> None:
    def val_of(seed: int, leaf: str) -> list[str]:
        return split_documents(DOCS, val_fraction=0.25, seed=seed, leaf=leaf)[1]

    assert val_of(1, "a") == val_of(1, "a")
    assert val_of(1, "a") != val_of(2, "a")
    assert val_of(1, "a") != val_of(1, "b")


def test_one_big_document_is_split_by_chunks() -> None:
    doc = "\n\n".join(f"Paragraph {i}. " + "text " * 30 for i in range(50))
    train, val = split_documents([doc], val_fraction=0.1, seed=0, leaf="solo", chunk_chars=500)
    n = len(chunk_document(doc, 500))
    assert len(val) == round(0.1 * n) and len(train) + len(val) == n
    assert sorted(train + val) == sorted(chunk_document(doc, 500))


def test_small_fraction_still_gives_one_validation_chunk_and_train_is_never_empty() -> None:
    train, val = split_documents(["a", "b", "c"], val_fraction=0.01, seed=0, leaf="x")
    assert len(val) == 1 and len(train) == 2
    train, val = split_documents(["a", "b"], val_fraction=0.9, seed=0, leaf="x")
    assert len(val) == 1 and len(train) == 1


def test_zero_fraction_keeps_everything_for_training() -> None:
    assert split_documents(["only"], val_fraction=0.0, seed=0, leaf="x") == (["only"], [])


def test_too_few_chunks_for_validation_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"'tiny'.*1 chunk"):
        split_documents(["one doc"], val_fraction=0.1, seed=0, leaf="tiny")


def test_invalid_fraction_is_rejected() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(DOCS, val_fraction=1.0, seed=0, leaf="x")
