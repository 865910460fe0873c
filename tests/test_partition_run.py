"""End to end: a saved Hugging Face dataset split by [partition] into 4 leaves, one tiny run."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import load_from_disk

from worldlm.config_load import load_config
from worldlm.data import partition as pt
from worldlm.data.prepare import documents_digest
from worldlm.progress import QuietProgress
from worldlm.runner import run

from .conftest import save_topic_dataset

CONFIG = """
[run]
name = "partitioned"
seed = 11
device = "cpu"

[model]
preset = "tiny"
block_size = 32

[tokenizer]
vocab_size = 320

[data]
val_fraction = 0.2
max_chars = 0
chunk_chars = 200

[train]
local_steps = 2
batch_size = 4
warmup_steps = 1

[eval]
max_blocks = 4
batch_size = 8

[stop]
rounds = 1

[partition]
kind = "dirichlet"
leaves = 4
alpha = 0.5
column = "label"
groups = 2
data = { dataset = "topics" }
"""


def test_a_partitioned_dataset_trains_as_four_leaves_in_two_groups(tmp_path: Path) -> None:
    labels = save_topic_dataset(tmp_path / "topics", n_docs=300)
    (tmp_path / "partitioned.toml").write_text(CONFIG, encoding="utf-8")
    where = [f"run.out_dir={str(tmp_path / 'runs')!r}", f"run.cache_dir={str(tmp_path / 'c')!r}"]
    config = load_config(tmp_path / "partitioned.toml", where)
    result = run(config, QuietProgress())

    parts = pt.dirichlet_partition(labels, 4, 0.5, seed=11, min_size=2)
    texts = load_from_disk(str(tmp_path / "topics"))["text"]
    expected = {
        f"world/g{i % 2}/leaf{i}": [texts[int(j)] for j in part] for i, part in enumerate(parts)
    }
    summary = json.loads((result.run_dir / "summary.json").read_text("utf-8"))
    assert set(summary["leaves"]) == set(expected)
    assert sorted(len(docs) for docs in expected.values()) != [75] * 4  # skewed, not equal
    assert sum(len(docs) for docs in expected.values()) == 300
    for path, docs in expected.items():
        # Each leaf trained on exactly its rows of the dataset, in the dataset's order.
        assert summary["leaves"][path]["data_sha256"] == documents_digest(docs)
        assert result.after[path].ppl < result.before[path].ppl
    # The run's own config.toml is the expanded tree: it reloads (resume) without [partition].
    saved = load_config(result.run_dir / "config.toml")
    assert list(saved.nodes) == list(config.nodes)
