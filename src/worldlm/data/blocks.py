"""Token ids for language-model training: encode documents, pack them into fixed-size blocks.

A block is an (N, T) int64 tensor of token ids. A token that the model reads but is not a
target of the loss (a prompt token, or padding) is stored as `~id` (= -id - 1, always
negative), so that masks travel inside the blocks themselves: every container of blocks stays
as it is, and plain text, which has no negative ids, is trained exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from tokenizers import Tokenizer

from worldlm.data.instructions import Example
from worldlm.data.tokenizer import eos_id
from worldlm.errors import DataError

# Bounds on one encode_batch call, so a corpus of huge documents does not balloon memory.
_BATCH_DOCS = 512
_BATCH_CHARS = 4_000_000
IGNORE_INDEX = -100  # the label transformers' loss skips


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


def inputs_and_labels(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) of blocks (B, T): a token stored as ~id is read but its label is
    IGNORE_INDEX. Blocks without masked tokens are their own labels (the same tensor)."""
    masked = blocks < 0
    if not bool(masked.any()):
        return blocks, blocks
    return torch.where(masked, ~blocks, blocks), torch.where(masked, IGNORE_INDEX, blocks)


def pack_examples(examples: Sequence[Example], block_size: int, pad_id: int) -> torch.Tensor:
    """(N, block_size) blocks holding whole examples one after another; a block is closed
    with non-target padding when the next example does not fit. An example longer than a
    block is cut to one block; one left without a target token is dropped."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    rows: list[list[int]] = []
    row: list[int] = []
    for ids, targets in examples:
        stored = [t if target else ~t for t, target in zip(ids, targets, strict=True)]
        stored = stored[:block_size]
        if not any(t >= 0 for t in stored):
            continue
        if len(row) + len(stored) > block_size:
            rows.append(row + [~pad_id] * (block_size - len(row)))
            row = []
        row += stored
    if row:
        rows.append(row + [~pad_id] * (block_size - len(row)))
    if not rows:
        raise DataError(
            f"no example has a response token within block_size={block_size}; add examples "
            "or raise model.block_size"
        )
    return torch.tensor(rows, dtype=torch.int64)  # (N, T)
