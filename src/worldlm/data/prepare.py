"""Turn every leaf's files into token blocks: read, split, tokenize, pack.

In simulation the tokenizer is trained on the union of the leaves' training splits (never their
validation splits), or loaded from a file or the model's directory (a GGUF file's tokenizer comes
from its cached conversion). Instruction and chat files (see `instructions`) become blocks whose
prompt tokens are masked out of the loss, rendered with the tokenizer's chat template if it has
one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from worldlm.config import DataConfig, TokenizerConfig
from worldlm.core.leaf_data import LeafData
from worldlm.data.blocks import encode_documents, pack_blocks, pack_examples
from worldlm.data.corpora import CORPORA, load_corpus
from worldlm.data.custom_sources import check_data_source, source_documents
from worldlm.data.hf_datasets import (
    check_dataset_source,
    dataset_documents,
    open_dataset,
    source_name,
)
from worldlm.data.instructions import (
    Conversation,
    Document,
    document_chars,
    encode_conversations,
    holds_instructions,
    plain_text,
    read_conversations,
)
from worldlm.data.shards import shard_indices
from worldlm.data.sources import data_files, read_documents
from worldlm.data.split import split_documents
from worldlm.data.tokenizer import eos_id, load_tokenizer, to_hf_tokenizer, train_tokenizer
from worldlm.errors import DataError
from worldlm.tree import FederationNode

Status = Callable[[str], None]


@dataclass(frozen=True)
class PreparedData:
    tokenizer: Tokenizer
    leaves: dict[str, LeafData]  # by leaf name
    digests: dict[str, str]  # by leaf name: SHA-256 of its documents (provenance, not data)


def check_sources(tree: FederationNode) -> None:
    """Fail fast, before a run starts, when a leaf's file or directory does not exist."""
    for leaf in tree.leaves():
        for raw in leaf.data.paths or []:
            if not Path(raw).exists():
                raise DataError(
                    f"nodes.{leaf.path}.data.paths: {raw} does not exist (check the path; "
                    "relative paths are read from data.root, or else from the config file's "
                    "directory)"
                )
        if leaf.data.corpus is not None and leaf.data.corpus not in CORPORA:
            raise DataError(
                f"nodes.{leaf.path}.data.corpus: unknown corpus {leaf.data.corpus!r}; "
                f"choose one of {', '.join(CORPORA)}"
            )
        check_dataset_source(leaf.data, f"nodes.{leaf.path}.data")
        if leaf.data.source is not None:
            check_data_source(leaf.data.source, f"nodes.{leaf.path}.data")


def read_leaf(leaf: FederationNode, cfg: DataConfig, cache_dir: Path) -> list[Document]:
    """A leaf's documents from its files, its named corpus or its Hugging Face dataset (its
    shard of one, if partitioned); JSONL files and datasets of instruction records give
    conversations."""
    spec = leaf.data
    limit = cfg.max_chars if spec.max_chars is None else spec.max_chars
    max_chars = limit or None  # 0 means no cap
    text_field = spec.text_field or cfg.text_field
    if spec.corpus is not None:
        return list(load_corpus(spec.corpus, cache_dir, max_chars=max_chars))
    if spec.source is not None:
        return source_documents(
            spec.source,
            spec.options or {},
            text_field=text_field,
            max_chars=max_chars,
            where=f"nodes.{leaf.path}.data",
        )
    if spec.dataset is not None or spec.hub is not None:
        where = f"nodes.{leaf.path}.data"
        rows = None if spec.shard is None else shard_indices(spec, cache_dir, where)
        return dataset_documents(
            open_dataset(spec, cache_dir),
            rows,
            text_field=text_field,
            max_chars=max_chars,
            where=f"{where} ({source_name(spec)})",
        )
    assert spec.paths is not None
    paths = [Path(p) for p in spec.paths]
    files = [file for path in paths for file in data_files(path)]
    if not any(holds_instructions(file, text_field) for file in files):
        return list(read_documents(paths, text_field=text_field, max_chars=max_chars))
    docs: list[Document] = []
    total = 0
    for file in files:
        left = None if max_chars is None else max_chars - total
        if left is not None and left <= 0:
            break
        part: list[Document] = []
        if holds_instructions(file, text_field):
            part.extend(read_conversations(file, max_chars=left))
        else:
            part.extend(read_documents([file], text_field=text_field, max_chars=left))
        docs += part
        total += sum(document_chars(d) for d in part)
    return docs


def documents_digest(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for doc in docs:
        raw = (doc if isinstance(doc, str) else doc.canonical()).encode("utf-8")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def choose_tokenizer(
    cfg: TokenizerConfig, model_dir: Path | None, train_texts: list[str], cache_dir: Path
) -> Tokenizer:
    """tokenizer.path if set, else the pretrained model's own (`model_dir`, its Hugging Face
    directory, see `model.pretrained.pretrained_dir`), else one trained on `train_texts`."""
    if cfg.path is not None:
        return load_tokenizer(Path(cfg.path))
    if model_dir is not None:
        return load_tokenizer(model_dir)
    return train_tokenizer(train_texts, vocab_size=cfg.vocab_size, cache_dir=cache_dir)


def tokenizer_dir(cfg: TokenizerConfig, model_dir: Path | None) -> Path | None:
    """The Hugging Face directory the tokenizer comes from, if any (it may hold a chat
    template and the model's own special tokens)."""
    if cfg.path is not None:
        path = Path(cfg.path)
        return path if (path / "tokenizer_config.json").is_file() else None
    return model_dir


def hf_tokenizer(
    tok: Tokenizer, cfg: TokenizerConfig, model_dir: Path | None
) -> PreTrainedTokenizerBase:
    """`tok` for transformers: its own directory's files (chat template included) when it
    came from one, else wrapped by `to_hf_tokenizer`."""
    directory = tokenizer_dir(cfg, model_dir)
    if directory is None or not (directory / "tokenizer_config.json").is_file():
        return to_hf_tokenizer(tok)
    try:
        loaded = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"{directory}: cannot load its tokenizer: {exc}") from exc
    assert isinstance(loaded, PreTrainedTokenizerBase)
    return loaded


Splits = dict[str, tuple[list[Document], list[Document]]]  # leaf name -> (train, validation)


def read_splits(
    tree: FederationNode, data_cfg: DataConfig, seed: int, cache_dir: Path, status: Status
) -> tuple[Splits, dict[str, str]]:
    """Every leaf's documents split into train and validation, and their digests."""
    splits: Splits = {}
    digests: dict[str, str] = {}
    for leaf in tree.leaves():
        status(f"reading {leaf.path}")
        docs = read_leaf(leaf, data_cfg, cache_dir)
        digests[leaf.name] = documents_digest(docs)
        splits[leaf.name] = split_documents(
            docs,
            val_fraction=data_cfg.val_fraction,
            seed=seed,
            leaf=leaf.name,
            chunk_chars=data_cfg.chunk_chars,
        )
    return splits, digests


def training_union(splits: Splits) -> list[str]:
    """The tokenizer's training text: every leaf's training split, never a validation split
    (conversations as plain text)."""
    return [
        doc if isinstance(doc, str) else plain_text(doc)
        for name in sorted(splits)
        for doc in splits[name][0]
    ]


def prepare_data(
    tree: FederationNode,
    *,
    data_cfg: DataConfig,
    tokenizer_cfg: TokenizerConfig,
    block_size: int,
    model_dir: Path | None,
    seed: int,
    cache_dir: Path,
    status: Status = lambda _msg: None,
) -> PreparedData:
    """Blocks for every leaf of the configured tree (leaf names are unique); `model_dir` is a
    pretrained model's directory, whose tokenizer is used unless tokenizer.path is set."""
    splits, digests = read_splits(tree, data_cfg, seed, cache_dir, status)
    status("preparing the tokenizer")
    tokenizer = choose_tokenizer(tokenizer_cfg, model_dir, training_union(splits), cache_dir)
    chat: PreTrainedTokenizerBase | None = None
    if any(isinstance(d, Conversation) for pair in splits.values() for d in pair[0]):
        chat = hf_tokenizer(tokenizer, tokenizer_cfg, model_dir)
        chat = chat if chat.chat_template else None  # none: the plain format
    leaves: dict[str, LeafData] = {}
    for name, (train_docs, val_docs) in splits.items():
        status(f"tokenizing {name}")
        try:
            train = encode_blocks(tokenizer, train_docs, block_size, chat)
            val = encode_blocks(tokenizer, val_docs, block_size, chat)
        except DataError as exc:
            raise DataError(f"leaf {name}: {exc}") from None
        leaves[name] = LeafData(name, train, {name: val})
    return PreparedData(tokenizer, leaves, digests)


def encode_blocks(
    tok: Tokenizer,
    docs: list[Document],
    block_size: int,
    chat: PreTrainedTokenizerBase | None,
) -> torch.Tensor:
    """(N, block_size) blocks: plain text packed end to end, then conversations packed whole
    with their prompt tokens masked (see `blocks`)."""
    texts = [d for d in docs if isinstance(d, str)]
    conversations = [d for d in docs if isinstance(d, Conversation)]
    parts = []
    if texts or not conversations:
        parts.append(pack_blocks(encode_documents(tok, texts), block_size))
    if conversations:
        examples = encode_conversations(tok, conversations, chat)
        parts.append(pack_examples(examples, block_size, pad_id=eos_id(tok)))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
