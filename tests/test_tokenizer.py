"""Byte-level BPE training, caching, loading and the transformers wrapper."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer

import worldlm.data.tokenizer as tokmod
from worldlm.data.tokenizer import (
    EOS_TOKEN,
    eos_id,
    load_tokenizer,
    to_hf_tokenizer,
    train_tokenizer,
)
from worldlm.errors import DataError

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Les élèves répètent: « déjà vu », naïve café.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "emoji 🙂🚀 and CJK 漢字 かな",
    "def f(x):\n\treturn x * 2  # tabs\n\n\nclass A:\n    pass\n",
] * 4

SAMPLES = [
    "plain ASCII text, with punctuation!?",
    "accents: crème brûlée, São Paulo, Ångström",
    "Кириллица: привет, мир",
    "emoji 🙂👍🏽🇫🇷 zwj 👩‍💻",
    "code:\n\tif x:\r\n\t\treturn  y  \n\n  end ",
    "unseen ŧęxŧ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x7f",
    " leading and trailing spaces ",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(TEXTS, vocab_size=400, cache_dir=None)


def test_eos_is_id_zero_and_vocab_is_bounded(tok: Tokenizer) -> None:
    assert tok.token_to_id(EOS_TOKEN) == 0 == eos_id(tok)
    assert 257 <= tok.get_vocab_size() <= 400


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text).ids
    assert 0 not in ids  # EOS_TOKEN text is never produced from ordinary text
    assert tok.decode(ids) == text


def test_eos_token_text_encodes_to_the_special_id(tok: Tokenizer) -> None:
    assert tok.encode(f"a{EOS_TOKEN}b").ids.count(0) == 1


def test_training_is_deterministic(tok: Tokenizer) -> None:
    assert train_tokenizer(TEXTS, vocab_size=400, cache_dir=None).to_str() == tok.to_str()


def test_vocab_size_below_byte_alphabet_is_rejected() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TEXTS, vocab_size=100, cache_dir=None)


def test_cache_hit_skips_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = train_tokenizer(TEXTS, vocab_size=300, cache_dir=tmp_path)
    files = list((tmp_path / "tokenizers").iterdir())
    assert len(files) == 1 and files[0].suffix == ".json" and len(files[0].stem) == 64

    def no_training(*args: object, **kwargs: object) -> Tokenizer:
        raise AssertionError("trainer called despite a cached tokenizer")

    monkeypatch.setattr(tokmod, "_train_bpe", no_training)
    assert train_tokenizer(TEXTS, vocab_size=300, cache_dir=tmp_path).to_str() == first.to_str()
    # A different corpus or vocab size is a different key, so it must train.
    with pytest.raises(AssertionError, match="trainer called"):
        train_tokenizer(TEXTS, vocab_size=301, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="trainer called"):
        train_tokenizer([*TEXTS[:-1], TEXTS[-1] + "!"], vocab_size=300, cache_dir=tmp_path)


def test_cache_key_separates_text_boundaries() -> None:
    assert tokmod._cache_key(["ab", "c"], 300) != tokmod._cache_key(["a", "bc"], 300)


def test_corrupt_cache_entry_is_retrained(tmp_path: Path) -> None:
    first = train_tokenizer(TEXTS, vocab_size=300, cache_dir=tmp_path)
    (entry,) = (tmp_path / "tokenizers").iterdir()
    entry.write_text("{ truncated", encoding="utf-8")
    assert train_tokenizer(TEXTS, vocab_size=300, cache_dir=tmp_path).to_str() == first.to_str()
    assert Tokenizer.from_file(str(entry)).to_str() == first.to_str()
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == [entry.name]  # no tmp left


def test_load_tokenizer_from_file_and_directory(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path / "tokenizer.json").to_str() == tok.to_str()
    assert load_tokenizer(tmp_path).to_str() == tok.to_str()


def test_load_tokenizer_clears_truncation_and_padding(tok: Tokenizer, tmp_path: Path) -> None:
    saved = Tokenizer.from_str(tok.to_str())
    saved.enable_truncation(max_length=4)
    saved.enable_padding(pad_id=0, pad_token=EOS_TOKEN)
    saved.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert loaded.truncation is None and loaded.padding is None


def test_load_tokenizer_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"model_dir.*tokenizer\.json"):
        load_tokenizer(tmp_path / "model_dir")
    (tmp_path / "broken.json").write_text(json.dumps({"not": "a tokenizer"}), encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json.*not a valid tokenizer"):
        load_tokenizer(tmp_path / "broken.json")


def test_eos_id_falls_back_to_common_tokens() -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}
    assert eos_id(Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))) == 2
    llama3 = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "x": 2}
    assert eos_id(Tokenizer(models.WordLevel(llama3, unk_token="x"))) == 1
    with pytest.raises(DataError, match="no end-of-text token"):
        eos_id(Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))


def test_hf_wrapper_round_trips_through_save_pretrained(tok: Tokenizer, tmp_path: Path) -> None:
    hf = to_hf_tokenizer(tok)
    assert hf.eos_token == hf.pad_token == EOS_TOKEN and hf.pad_token_id == 0
    hf.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again.eos_token_id == 0 and again.pad_token_id == 0
    for text in SAMPLES:
        ids = again(text)["input_ids"]
        assert ids == tok.encode(text).ids
        assert again.decode(ids) == text
    batch = again(["a b", "longer text here"], padding=True)
    assert batch["input_ids"][0][-1] == 0  # padded with eos


def test_hf_wrapper_does_not_change_the_tokenizer(tok: Tokenizer) -> None:
    before = tok.to_str()
    to_hf_tokenizer(tok)(["x", "longer"], padding=True, truncation=True, max_length=3)
    assert tok.to_str() == before
