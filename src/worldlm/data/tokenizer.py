"""Byte-level BPE tokenizers: train (cached by content hash), load, and wrap for transformers.

Byte-level BPE covers every Unicode string without an unknown token, so decode(encode(text))
gives the text back exactly.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from worldlm.errors import DataError

EOS_TOKEN = "<|endoftext|>"
# End-of-text tokens of common pretrained tokenizers, tried in order after EOS_TOKEN.
_COMMON_EOS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>")
_COMMON_BOS = ("<s>", "<|begin_of_text|>", "<|startoftext|>")
_COMMON_UNK = ("<unk>", "<|unk|>")
# Bump when training settings change so that old cache entries are not reused.
_CACHE_FORMAT = 1
_MIN_VOCAB = 257  # 256 byte symbols + EOS_TOKEN


def train_tokenizer(texts: Sequence[str], *, vocab_size: int, cache_dir: Path | None) -> Tokenizer:
    """A byte-level BPE tokenizer of at most `vocab_size` tokens trained on `texts`, with EOS_TOKEN
    as id 0; reused from `cache_dir/tokenizers/<content hash>.json` when present.
    """
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {_MIN_VOCAB} for byte-level BPE")
    if cache_dir is None:
        return _train_bpe(texts, vocab_size)
    path = Path(cache_dir) / "tokenizers" / f"{_cache_key(texts, vocab_size)}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:
            pass  # a corrupt cache entry is retrained and overwritten below
    tok = _train_bpe(texts, vocab_size)
    _write_atomic(path, tok.to_str())
    return tok


def _train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],  # first special token gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def _cache_key(texts: Sequence[str], vocab_size: int) -> str:
    digest = hashlib.sha256()
    header = f"worldlm-bpe\x1f{_CACHE_FORMAT}\x1f{tokenizers.__version__}\x1f{vocab_size}\x1f"
    digest.update(header.encode())
    digest.update(len(texts).to_bytes(8, "little"))
    for text in texts:
        # Length prefixes keep ["ab", "c"] and ["a", "bc"] apart.
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temp file in the same directory, then os.replace, so a reader never sees half a file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer in `path`: a tokenizer.json file or a directory holding one (e.g. a Hugging
    Face model directory). Truncation and padding settings are cleared so documents stay whole.
    """
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"{file}: no tokenizer file found; point to a tokenizer.json file or a "
            "Hugging Face model directory that contains one"
        )
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as err:
        raise DataError(
            f"{file}: not a valid tokenizer.json ({err}); re-save it with "
            "`tokenizers` or `save_pretrained`"
        ) from None
    tok.no_truncation()
    tok.no_padding()
    return tok


def eos_id(tok: Tokenizer) -> int:
    """Id of the end-of-text token: EOS_TOKEN, else a common one such as "</s>"."""
    token = _eos_token(tok)
    token_id = tok.token_to_id(token)
    assert token_id is not None  # _eos_token only returns tokens in the vocabulary
    return int(token_id)


def _eos_token(tok: Tokenizer) -> str:
    for token in (EOS_TOKEN, *_COMMON_EOS):
        if tok.token_to_id(token) is not None:
            return token
    wanted = ", ".join(repr(t) for t in dict.fromkeys((EOS_TOKEN, *_COMMON_EOS)))
    raise DataError(
        f"tokenizer has no end-of-text token (looked for {wanted}); use a tokenizer with one "
        "or train a worldlm tokenizer"
    )


def _first_present(tok: Tokenizer, candidates: Sequence[str], default: str) -> str:
    return next((t for t in candidates if tok.token_to_id(t) is not None), default)


def to_hf_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """`tok` wrapped for transformers, with eos/bos/unk set from its vocabulary and pad = eos."""
    eos = _eos_token(tok)
    # Wrap a copy: the wrapper may change padding or truncation settings on the object it gets.
    copy = Tokenizer.from_str(tok.to_str())
    return PreTrainedTokenizerFast(
        tokenizer_object=copy,
        eos_token=eos,
        bos_token=_first_present(tok, _COMMON_BOS, eos),
        unk_token=_first_present(tok, _COMMON_UNK, eos),
        pad_token=eos,
        # The default clean-up rewrites " ." to "." and would break decode(encode(text)) == text.
        clean_up_tokenization_spaces=False,
    )
