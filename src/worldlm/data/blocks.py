"""Token ids for language-model training: encode documents, pack them into fixed-size blocks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from tokenizers import Tokenizer

from worldlm.data.tokenizer import eos_id
from worldlm.errors import DataError

# Bounds on one encode_batch call, so a corpus of huge documents does not balloon memory.
_BATCH_DOCS = 512
_BATCH_CHARS = 4_000_000


def encode_documents(tok: Tokenizer, docs: Sequence[str]) -> list[int]:
    """One flat list of token ids: each document's ids followed by the end-of-text id.

    Documents are encoded without the tokenizer's own special tokens (e.g. a BOS added by a
    pretrained tokenizer's post-processor) so every document is delimited the same way.
    """
    eos = eos_id(tok)
    if tok.truncation is not None or tok.padding is not None:
        # Truncation would silently cut documents and padding would add fake tokens.
        tok = Tokenizer.from_str(tok.to_str())
        tok.no_truncation()
        tok.no_padding()
    ids: list[int] = []
    for batch in _batches(docs):
        for encoding in tok.encode_batch(batch, add_special_tokens=False):
            ids.extend(encoding.ids)
            ids.append(eos)
    return ids


def _batches(docs: Sequence[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    n_chars = 0
    for doc in docs:
        if batch and (len(batch) >= _BATCH_DOCS or n_chars + len(doc) > _BATCH_CHARS):
            yield batch
            batch, n_chars = [], 0
        batch.append(doc)
        n_chars += len(doc)
    if batch:
        yield batch


def pack_blocks(ids: Sequence[int] | torch.Tensor, block_size: int) -> torch.Tensor:
    """A (n_blocks, block_size) int64 tensor of consecutive, non-overlapping blocks of `ids`;
    the tail shorter than a block is dropped. May share memory with an int64 tensor `ids`.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    flat = torch.as_tensor(ids, dtype=torch.int64)
    if flat.dim() != 1:
        raise ValueError(f"ids must be one-dimensional, got shape {tuple(flat.shape)}")
    n_blocks = flat.numel() // block_size
    if n_blocks < 1:
        raise DataError(
            f"only {flat.numel()} tokens, fewer than one block of block_size={block_size}; "
            "add more data or use a smaller block_size"
        )
    return flat[: n_blocks * block_size].reshape(n_blocks, block_size)  # (N, T)
