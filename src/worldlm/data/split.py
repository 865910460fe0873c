"""Deterministic train/validation split of a leaf's text, by chunks rather than whole documents.

Documents are cut into chunks first so that a leaf made of one large file still gets a
validation set; a conversation (instruction data) is never cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worldlm.data.instructions import Document
from worldlm.errors import DataError
from worldlm.seeding import generator

# Boundaries tried in order of preference when cutting a document.
_SEPARATORS = ("\n\n", "\n", " ")


def chunk_document(doc: str, chunk_chars: int) -> list[str]:
    """Cut `doc` into pieces of at most `chunk_chars` characters, at paragraph, line or space
    boundaries when one lies in the back half of the window; blank pieces are dropped.
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
    chunks: list[str] = []
    start = 0
    while start < len(doc):
        end = min(start + chunk_chars, len(doc))
        if end < len(doc):
            end = _cut_point(doc, start, end)
        piece = doc[start:end]
        if piece.strip():
            chunks.append(piece)
        start = end
    return chunks


def _cut_point(doc: str, start: int, end: int) -> int:
    # A boundary in the front half would leave a tiny chunk; a hard cut is better then.
    floor = start + (end - start) // 2
    for sep in _SEPARATORS:
        at = doc.rfind(sep, floor, end)
        if at != -1:
            return at + len(sep)
    return end


def split_documents(
    docs: Sequence[Document],
    *,
    val_fraction: float,
    seed: int,
    leaf: str,
    chunk_chars: int = 2000,
) -> tuple[list[Document], list[Document]]:
    """(train, val) chunks of `docs`: round(val_fraction * n) chunks, chosen by a seeded shuffle,
    go to validation (at least one when val_fraction > 0); each side keeps the original order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    chunks: list[Document] = [
        piece
        for doc in docs
        for piece in (chunk_document(doc, chunk_chars) if isinstance(doc, str) else [doc])
    ]
    n = len(chunks)
    if val_fraction == 0.0:
        return chunks, []
    if n < 2:
        raise DataError(
            f"leaf {leaf!r}: only {n} chunk(s) of text, too few for a train/validation split; "
            "add data, use a smaller chunk size, or set val_fraction = 0"
        )
    # At least one validation chunk, and never so many that training gets none.
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    order = torch.randperm(n, generator=generator(seed, leaf, "split"))
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[order[:n_val]] = True
    flags = is_val.tolist()
    train = [c for c, v in zip(chunks, flags, strict=True) if not v]
    val = [c for c, v in zip(chunks, flags, strict=True) if v]
    return train, val
