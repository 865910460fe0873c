"""Encoding documents into one id stream and packing it into training blocks."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

from worldlm.data.blocks import encode_documents, pack_blocks
from worldlm.data.tokenizer import EOS_TOKEN, eos_id, train_tokenizer
from worldlm.errors import DataError


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = ["hello world, hello tokens", "packing blocks of ids", "ünïcödé ✓"] * 3
    return train_tokenizer(texts, vocab_size=300, cache_dir=None)


def test_encode_appends_eos_after_each_document(tok: Tokenizer) -> None:
    docs = ["hello world", "ünïcödé", "blocks"]
    ids = encode_documents(tok, docs)
    eos = eos_id(tok)
    assert ids.count(eos) == 3 and ids[-1] == eos
    ends = [k for k, i in enumerate(ids) if i == eos]
    starts = [0, *(k + 1 for k in ends[:-1])]
    assert [tok.decode(ids[s:e]) for s, e in zip(starts, ends, strict=True)] == docs


def test_encode_matches_single_encodes_across_batches(
    tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worldlm.data.blocks as blocks

    monkeypatch.setattr(blocks, "_BATCH_DOCS", 2)
    docs = [f"doc {i} hello" for i in range(7)]
    expected = [i for d in docs for i in [*tok.encode(d).ids, eos_id(tok)]]
    assert encode_documents(tok, docs) == expected


def test_encode_ignores_truncation_set_on_the_tokenizer(tok: Tokenizer) -> None:
    truncating = Tokenizer.from_str(tok.to_str())
    truncating.enable_truncation(max_length=2)
    ids = encode_documents(truncating, ["hello world hello tokens"])
    assert len(ids) > 3
    assert truncating.truncation is not None  # the caller's tokenizer is left as it was


def test_encode_requires_an_eos_token() -> None:
    from tokenizers import models

    bare = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(DataError, match="no end-of-text token"):
        encode_documents(bare, ["a"])
    assert EOS_TOKEN not in bare.get_vocab()


def test_pack_blocks_shapes_and_content() -> None:
    blocks = pack_blocks(list(range(10)), 4)
    assert blocks.dtype == torch.int64 and blocks.shape == (2, 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    exact = pack_blocks(torch.arange(12, dtype=torch.int32), 3)
    assert exact.dtype == torch.int64 and exact.shape == (4, 3)
    assert torch.equal(exact.flatten(), torch.arange(12))
    assert pack_blocks([7, 8], 2).tolist() == [[7, 8]]


def test_pack_blocks_too_few_tokens_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"only 5 tokens.*block_size=8.*smaller block_size"):
        pack_blocks([1, 2, 3, 4, 5], 8)


def test_pack_blocks_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="block_size"):
        pack_blocks([1, 2], 0)
    with pytest.raises(ValueError, match="one-dimensional"):
        pack_blocks(torch.zeros(2, 2, dtype=torch.int64), 2)
