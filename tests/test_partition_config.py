"""`[partition]`: one dataset expanded into a generated tree of sharded leaves."""

from __future__ import annotations

import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from worldlm.config import dump_config
from worldlm.config_load import load_config, validate_config
from worldlm.data import partition as pt
from worldlm.data.partition_plot import describe, partition_counts, plot_partition
from worldlm.data.prepare import check_sources, read_leaf
from worldlm.errors import ConfigError, DataError
from worldlm.tree import build_tree

from .conftest import save_topic_dataset


def _config(dataset: Path | str, **partition: Any) -> dict[str, Any]:
    return {
        "run": {"seed": 5},
        "partition": {"data": {"dataset": str(dataset)}, **partition},
    }


def _leaf_docs(config: Any, tmp_path: Path) -> dict[str, int]:
    tree = build_tree(config.nodes)
    check_sources(tree)
    return {
        leaf.path: len(read_leaf(leaf, config.data, tmp_path / "cache")) for leaf in tree.leaves()
    }


def test_dirichlet_expands_into_groups_of_sharded_leaves(tmp_path: Path) -> None:
    labels = save_topic_dataset(tmp_path / "topics")
    data = _config(
        tmp_path / "topics", kind="dirichlet", leaves=4, alpha=0.5, column="label", groups=2
    )
    config = validate_config(data)
    assert list(config.nodes) == [
        "world",
        "world/g0",
        "world/g1",
        "world/g0/leaf0",
        "world/g1/leaf1",
        "world/g0/leaf2",
        "world/g1/leaf3",
    ]
    shard = build_tree(config.nodes).find("world/g1/leaf3").data.shard
    assert shard is not None
    assert (shard.kind, shard.leaves, shard.index, shard.seed) == ("dirichlet", 4, 3, 5)
    expected = pt.dirichlet_partition(labels, 4, 0.5, seed=5, min_size=2)
    docs = _leaf_docs(config, tmp_path)
    assert docs == {f"world/g{i % 2}/leaf{i}": len(expected[i]) for i in range(4)}
    assert sum(docs.values()) == len(labels)


def test_the_expanded_config_is_a_plain_tree_that_reloads_as_itself(tmp_path: Path) -> None:
    save_topic_dataset(tmp_path / "topics")
    config = validate_config(_config(tmp_path / "topics", kind="iid", leaves=3))
    text = dump_config(config)
    assert "partition" not in tomllib.loads(text)
    (tmp_path / "run.toml").write_text(text, encoding="utf-8")
    assert load_config(tmp_path / "run.toml") == config


def test_relative_dataset_paths_are_read_from_the_config_directory(tmp_path: Path) -> None:
    save_topic_dataset(tmp_path / "topics", n_docs=40)
    (tmp_path / "c.toml").write_text(
        '[partition]\nkind = "size_skew"\nleaves = 3\nsigma = 1.0\ndata = { dataset = "topics" }\n'
        '[nodes."world/leaf1"]\ndp = { local_noise_multiplier = 0.5 }\n',
        encoding="utf-8",
    )
    config = load_config(tmp_path / "c.toml")
    tree = build_tree(config.nodes)
    assert tree.find("world/leaf0").data.dataset == str(tmp_path / "topics")
    assert tree.find("world/leaf1").leaf.dp.local_noise_multiplier == 0.5  # laid over
    assert sum(_leaf_docs(config, tmp_path).values()) == 40
    assert config.nodes["world/leaf0"] != config.nodes["world/leaf1"]


def test_column_kind_makes_a_leaf_per_value_grouped_by_another_column(tmp_path: Path) -> None:
    save_topic_dataset(tmp_path / "topics")
    from datasets import load_from_disk

    rows = load_from_disk(str(tmp_path / "topics"))
    config = validate_config(
        _config(tmp_path / "topics", kind="column", column="label", group_column="lang")
    )
    tree = build_tree(config.nodes)
    leaves = {leaf.name: leaf for leaf in tree.leaves()}
    assert sorted(leaves) == ["code", "law", "med"]  # the ClassLabel's names
    for name, leaf in leaves.items():
        langs = Counter(
            lang
            for lang, label in zip(rows["lang"], rows["label"], strict=True)
            if rows.features["label"].int2str(label) == name
        )
        top = max(langs.values())
        assert leaf.path == f"world/{min(v for v, c in langs.items() if c == top)}/{name}"
    docs = _leaf_docs(config, tmp_path)
    counts = Counter(rows.features["label"].int2str(v) for v in rows["label"])
    assert {path.rsplit("/", 1)[1]: n for path, n in docs.items()} == counts


@pytest.mark.parametrize(
    ("partition", "nodes", "message"),
    [
        ({"kind": "dirichlet", "leaves": 4, "column": "label"}, {}, "needs alpha"),
        ({"kind": "iid", "leaves": 2, "alpha": 1.0}, {}, "takes no alpha; remove it"),
        ({"kind": "column", "column": "lang", "leaves": 3}, {}, "remove leaves"),
        ({"kind": "iid"}, {}, "kind = 'iid' needs leaves"),
        ({"kind": "iid", "leaves": 2, "groups": 3}, {}, "groups = 3 is above leaves = 2"),
        ({"kind": "iid", "leaves": 2}, {"world/x": {}}, "nodes.world/x: not a node of the tree"),
        (
            {"kind": "iid", "leaves": 2},
            {"world/leaf0": {"data": {"paths": ["f.txt"]}}},
            "nodes.world/leaf0.data: [partition] gives every leaf its data",
        ),
        ({"kind": "column", "column": "nope"}, {}, "no column 'nope' (columns: text, label, lang)"),
        ({"kind": "column", "column": "lang", "min_size": 200}, {}, "fewer than min_size = 200"),
    ],
)
def test_bad_partitions_are_refused_naming_the_key(
    tmp_path: Path, partition: dict[str, Any], nodes: dict[str, Any], message: str
) -> None:
    save_topic_dataset(tmp_path / "topics")
    data = {**_config(tmp_path / "topics", **partition), "nodes": nodes}
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    assert message in str(info.value)
    assert "partition" in str(info.value) or "nodes." in str(info.value)


def test_a_leaf_that_cannot_get_min_size_examples_fails_when_read(tmp_path: Path) -> None:
    save_topic_dataset(tmp_path / "topics", n_docs=10)
    config = validate_config(_config(tmp_path / "topics", kind="iid", leaves=4, min_size=3))
    tree = build_tree(config.nodes)
    with pytest.raises(DataError, match=r"nodes.world/leaf0.data: .*cannot partition its 10 rows"):
        read_leaf(next(tree.leaves()), config.data, tmp_path / "cache")


def test_partition_counts_and_figure(tmp_path: Path) -> None:
    labels = save_topic_dataset(tmp_path / "topics")
    config = validate_config(
        _config(tmp_path / "topics", kind="dirichlet", leaves=3, alpha=0.3, column="label")
    )
    column, counts = partition_counts(build_tree(config.nodes), tmp_path / "cache")
    expected = pt.histograms(labels, pt.dirichlet_partition(labels, 3, 0.3, seed=5, min_size=2))
    assert column == "label"
    assert [c.labels for c in counts] == expected
    assert [c.examples for c in counts] == [sum(h.values()) for h in expected]
    assert describe(counts, column)[0].startswith("world/leaf0")
    png = plot_partition(counts, column, tmp_path / "fig" / "p.png", "dirichlet")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, by_lang = partition_counts(build_tree(config.nodes), tmp_path / "cache", "lang")
    assert {k for c in by_lang for k in c.labels} == {"de", "en", "fr"}


def test_the_partition_command_prints_each_leaf_and_draws_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from worldlm.cli import main

    save_topic_dataset(tmp_path / "topics", n_docs=90)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[run]\ncache_dir = "{tmp_path / "cache"}"\n[partition]\nkind = "size_skew"\n'
        'leaves = 3\nsigma = 0.0\ndata = { dataset = "topics" }\n',
        encoding="utf-8",
    )
    png = tmp_path / "p.png"
    assert main(["partition", str(config), "--column", "lang", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "world/leaf0" in out and "30 examples  lang: " in out
    assert "3 leaves, 90 examples" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["partition", str(config), "--set", "partition.sigma=-1"]) == 2
    assert "partition.sigma" in capsys.readouterr().err
