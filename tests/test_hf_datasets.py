"""Hugging Face datasets as leaf data: saved on disk, in the hub cache, Arrow files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from worldlm.config import DataConfig, LeafConfig
from worldlm.config_load import validate_config
from worldlm.data.instructions import Conversation, Message
from worldlm.data.prepare import check_sources, read_leaf
from worldlm.errors import ConfigError, DataError
from worldlm.tree import FederationNode

DATA = DataConfig()


def _leaf(data: dict[str, Any]) -> FederationNode:
    return FederationNode("world/a", LeafConfig.model_validate({"data": data}))


def _read(data: dict[str, Any], tmp_path: Path, cfg: DataConfig = DATA) -> list[Any]:
    leaf = _leaf(data)
    check_sources(leaf)
    return read_leaf(leaf, cfg, tmp_path / "cache")


def _save(ds: Dataset | DatasetDict, path: Path) -> str:
    ds.save_to_disk(str(path))
    return str(path)


def test_saved_dataset_gives_its_texts_without_blank_ones(tmp_path: Path) -> None:
    ds = Dataset.from_dict({"text": ["one two", "  ", None, "three"], "label": [0, 1, 2, 3]})
    path = _save(ds, tmp_path / "ds")
    assert _read({"dataset": path}, tmp_path) == ["one two", "three"]
    capped = DataConfig.model_validate({"max_chars": 5})
    assert _read({"dataset": path}, tmp_path, capped) == ["one t"]


def test_dataset_dict_reads_train_by_default_and_the_split_named(tmp_path: Path) -> None:
    splits = DatasetDict(
        {
            "train": Dataset.from_dict({"text": ["train text"]}),
            "test": Dataset.from_dict({"text": ["test text"]}),
        }
    )
    path = _save(splits, tmp_path / "dd")
    assert _read({"dataset": path}, tmp_path) == ["train text"]
    assert _read({"dataset": path, "split": "test"}, tmp_path) == ["test text"]
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: train, test\)"):
        _read({"dataset": path, "split": "validation"}, tmp_path)


def test_a_plain_dataset_refuses_a_split(tmp_path: Path) -> None:
    path = _save(Dataset.from_dict({"text": ["a"]}), tmp_path / "ds")
    with pytest.raises(DataError, match="has no splits; remove split"):
        _read({"dataset": path, "split": "train"}, tmp_path)


def test_text_column_is_configurable_and_a_missing_one_is_named(tmp_path: Path) -> None:
    path = _save(Dataset.from_dict({"body": ["b1", "b2"], "n": [1, 2]}), tmp_path / "ds")
    assert _read({"dataset": path, "text_field": "body"}, tmp_path) == ["b1", "b2"]
    with pytest.raises(DataError, match=r"no text column 'text'.*columns: body, n"):
        _read({"dataset": path}, tmp_path)
    with pytest.raises(DataError, match=r"column 'n' is .*not text"):
        _read({"dataset": path, "text_field": "n"}, tmp_path)


def test_chat_columns_give_conversations(tmp_path: Path) -> None:
    messages = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    ]
    path = _save(Dataset.from_dict({"messages": messages}), tmp_path / "chat")
    assert _read({"dataset": path}, tmp_path) == [
        Conversation((Message("user", "hi"), Message("assistant", "hello")))
    ]
    pairs = Dataset.from_dict({"prompt": ["2+2?"], "response": ["4"], "system": [None]})
    path = _save(pairs, tmp_path / "pairs")
    assert _read({"dataset": path}, tmp_path) == [
        Conversation((Message("user", "2+2?"), Message("assistant", "4")))
    ]


def _hub_cache(root: Path, repo_id: str) -> Path:
    """A hub cache holding dataset `repo_id` as `hf download` leaves it (parquet per split)."""
    repo = root / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    (snapshot / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["hub one", "hub two"]}), snapshot / "data/train-0.parquet")
    pq.write_table(pa.table({"text": ["hub test"]}), snapshot / "data/test-0.parquet")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return root


def test_hub_dataset_is_read_offline_from_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", "someone/notes")))
    assert _read({"hub": "someone/notes"}, tmp_path) == ["hub one", "hub two"]
    assert _read({"hub": "someone/notes", "split": "test"}, tmp_path) == ["hub test"]
    with pytest.raises(DataError) as info:
        _read({"hub": "someone/absent"}, tmp_path)
    message = str(info.value)
    assert "nodes.world/a.data.hub" in message and "'someone/absent'" in message
    assert str(tmp_path / "hub") in message and "hf download" in message


def test_arrow_files_under_paths_are_read_in_both_ipc_formats(tmp_path: Path) -> None:
    table = pa.table({"text": ["ipc file"], "x": [1]})
    with (
        pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as writer,
    ):
        writer.write_table(table)
    saved = Path(_save(Dataset.from_dict({"text": ["ipc stream"]}), tmp_path / "ds"))
    stream = next(saved.glob("*.arrow"))  # what save_to_disk writes: the stream format
    assert _read({"paths": [str(tmp_path / "file.arrow"), str(stream)]}, tmp_path) == [
        "ipc file",
        "ipc stream",
    ]
    with pytest.raises(DataError, match="Arrow file has no column 'body'"):
        _read({"paths": [str(stream)], "text_field": "body"}, tmp_path)
    with pytest.raises(DataError, match=r"set data\.dataset"):
        _read({"paths": [str(saved)]}, tmp_path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "give exactly one of data.paths, data.corpus, data.dataset, data.hub or data.source"),
        ({"dataset": "d", "hub": "a/b"}, "(got dataset, hub)"),
        ({"dataset": "d", "subset": "x"}, "data.subset applies to data.hub only"),
        ({"paths": ["f.jsonl"], "split": "train"}, "data.split applies to data.dataset or"),
        (
            {"corpus": "hpo", "shard": {"kind": "iid", "leaves": 2, "index": 0, "seed": 0}},
            "data.shard applies to",
        ),
    ],
)
def test_leaf_data_takes_exactly_one_source(data: dict[str, Any], message: str) -> None:
    config = {"nodes": {"world": {}, "world/a": {"data": data}}}
    with pytest.raises(ConfigError, match=r"nodes\.world/a\.data") as info:
        validate_config(config)
    assert message in str(info.value)


def test_a_missing_saved_dataset_is_refused_before_the_run(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nodes.world/a.data.dataset: .*does not exist"):
        check_sources(_leaf({"dataset": str(tmp_path / "nothing")}))
