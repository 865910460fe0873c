"""Small data and configs that tests make for themselves (never ../shared)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from worldlm.config import RunConfig, apply_overrides
from worldlm.config_load import validate_config

_TOPICS = {
    "med": [
        "fever",
        "cough",
        "patient",
        "symptom",
        "chronic",
        "acute",
        "infection",
        "therapy",
        "diagnosis",
        "syndrome",
        "renal",
        "cardiac",
        "tissue",
        "dose",
    ],
    "law": [
        "licence",
        "copyright",
        "warranty",
        "software",
        "permission",
        "notice",
        "holder",
        "distribute",
        "modify",
        "terms",
        "liability",
        "contributor",
        "grant",
        "source",
    ],
    "code": [
        "def",
        "return",
        "self",
        "import",
        "class",
        "for",
        "in",
        "if",
        "None",
        "value",
        "list",
        "dict",
        "print",
        "yield",
    ],
}


def synthetic_documents(topic: str, n_docs: int, seed: int) -> list[str]:
    """Documents with learnable structure: topic words in templated sentences."""
    rng = random.Random(f"{topic}-{seed}")
    words = _TOPICS[topic]
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            a, b, c = rng.sample(words, 3)
            sentences.append(f"The {a} of the {b} is {c}.")
        docs.append(" ".join(sentences))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def aggregator_paths(leaves: dict[str, str]) -> list[str]:
    """The inner nodes of the tree whose leaves are `leaves`, sorted."""
    return sorted(
        {"/".join(p.split("/")[:depth]) for p in leaves for depth in range(1, p.count("/") + 1)}
    )


def tiny_config_dict(tmp_path: Path, leaves: dict[str, str], *, n_docs: int = 60) -> dict[str, Any]:
    """A tiny run over `leaves` (path -> topic); inner nodes are filled in automatically."""
    nodes: dict[str, Any] = {path: {} for path in aggregator_paths(leaves)}
    for i, (path, topic) in enumerate(sorted(leaves.items())):
        file = write_jsonl(
            tmp_path / "data" / f"{path.replace('/', '_')}.jsonl",
            synthetic_documents(topic, n_docs, seed=i),
        )
        nodes[path] = {"data": {"paths": [str(file)]}}
    return {
        "run": {
            "name": "t",
            "out_dir": str(tmp_path / "runs"),
            "seed": 7,
            "cache_dir": str(tmp_path / "cache"),
            "device": "cpu",
        },
        "model": {"preset": "tiny", "block_size": 32},
        "tokenizer": {"vocab_size": 320},
        "data": {"val_fraction": 0.2, "max_chars": 0, "chunk_chars": 200},
        "train": {"local_steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2},
        "eval": {"max_blocks": 8, "batch_size": 8},
        "stop": {"rounds": 2},
        "checkpoint": {"every": 1, "keep": 3},
        "nodes": nodes,
    }


def tiny_config(
    tmp_path: Path, leaves: dict[str, str], overrides: list[str] | None = None, **kwargs: Any
) -> RunConfig:
    data = tiny_config_dict(tmp_path, leaves, **kwargs)
    return validate_config(apply_overrides(data, overrides or []))


TWO_LEVEL = {
    "world/med/a": "med",
    "world/med/b": "med",
    "world/soft/c": "law",
    "world/soft/d": "code",
}


@pytest.fixture
def two_level(tmp_path: Path) -> RunConfig:
    return tiny_config(tmp_path, TWO_LEVEL)


def save_topic_dataset(path: Path, n_docs: int = 300, seed: int = 0) -> list[str]:
    """A Hugging Face dataset saved at `path`: short documents, each with its topic as `label`
    (a ClassLabel) and a `lang` column; returns the labels, row by row."""
    from datasets import ClassLabel, Dataset

    rng = random.Random(seed)
    topics = sorted(_TOPICS)
    labels = [topics[rng.randrange(len(topics))] for _ in range(n_docs)]
    texts = [synthetic_documents(t, 1, seed=i)[0] for i, t in enumerate(labels)]
    langs = [rng.choice(["de", "en", "fr"]) for _ in range(n_docs)]
    rows = {"text": texts, "label": [topics.index(t) for t in labels], "lang": langs}
    ds = Dataset.from_dict(rows).cast_column("label", ClassLabel(names=topics))
    ds.save_to_disk(str(path))
    return labels
