"""Turn every leaf's files into token blocks: read, split, tokenize, pack.

In simulation the tokenizer is trained on the union of the leaves' training splits (never their
validation splits), or loaded from a file or the model's directory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from worldlm.config import DataConfig, ModelConfig, TokenizerConfig
from worldlm.data.blocks import encode_documents, pack_blocks
from worldlm.data.corpora import CORPORA, load_corpus
from worldlm.data.sources import read_documents
from worldlm.data.split import split_documents
from worldlm.data.tokenizer import load_tokenizer, train_tokenizer
from worldlm.errors import DataError
from worldlm.federation.leaf import LeafData
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


def read_leaf(leaf: FederationNode, cfg: DataConfig, cache_dir: Path) -> list[str]:
    """A leaf's documents from its files or its named corpus."""
    spec = leaf.data
    limit = cfg.max_chars if spec.max_chars is None else spec.max_chars
    max_chars = limit or None  # 0 means no cap
    if spec.corpus is not None:
        return load_corpus(spec.corpus, cache_dir, max_chars=max_chars)
    assert spec.paths is not None
    return read_documents(
        [Path(p) for p in spec.paths], text_field=cfg.text_field, max_chars=max_chars
    )


def documents_digest(docs: list[str]) -> str:
    h = hashlib.sha256()
    for doc in docs:
        raw = doc.encode("utf-8")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def choose_tokenizer(
    cfg: TokenizerConfig, model: ModelConfig, train_texts: list[str], cache_dir: Path
) -> Tokenizer:
    """tokenizer.path if set, else the model directory's, else one trained on `train_texts`."""
    if cfg.path is not None:
        return load_tokenizer(Path(cfg.path))
    if model.path is not None:
        return load_tokenizer(Path(model.path))
    return train_tokenizer(train_texts, vocab_size=cfg.vocab_size, cache_dir=cache_dir)


Splits = dict[str, tuple[list[str], list[str]]]  # leaf name -> (train, validation) documents


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
    """The tokenizer's training text: every leaf's training split, never a validation split."""
    return [doc for name in sorted(splits) for doc in splits[name][0]]


def prepare_data(
    tree: FederationNode,
    *,
    data_cfg: DataConfig,
    tokenizer_cfg: TokenizerConfig,
    model_cfg: ModelConfig,
    seed: int,
    cache_dir: Path,
    status: Status = lambda _msg: None,
) -> PreparedData:
    """Blocks for every leaf of the configured tree (leaf names are unique)."""
    splits, digests = read_splits(tree, data_cfg, seed, cache_dir, status)
    status("preparing the tokenizer")
    tokenizer = choose_tokenizer(tokenizer_cfg, model_cfg, training_union(splits), cache_dir)
    leaves: dict[str, LeafData] = {}
    for name, (train_docs, val_docs) in splits.items():
        status(f"tokenizing {name}")
        try:
            train = pack_blocks(encode_documents(tokenizer, train_docs), model_cfg.block_size)
            val = pack_blocks(encode_documents(tokenizer, val_docs), model_cfg.block_size)
        except DataError as exc:
            raise DataError(f"leaf {name}: {exc}") from None
        leaves[name] = LeafData(name, train, {name: val})
    return PreparedData(tokenizer, leaves, digests)
