"""Config validation: every bad key, type and impossible value is named before anything runs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from worldlm.config import (
    LeafConfig,
    apply_overrides,
    default_config_text,
    dump_config,
)
from worldlm.config_load import load_config, validate_config
from worldlm.config_toml import parse_override
from worldlm.errors import ConfigError

from .conftest import TWO_LEVEL, tiny_config_dict

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def _error(data: dict, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(apply_overrides(data, overrides))
    return str(info.value)


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    msg = _error(tiny_config_dict(tmp_path, TWO_LEVEL), ["train.lrr=0.1"])
    assert "train.lrr" in msg and "did you mean 'lr'" in msg


def test_unknown_key_inside_a_node_is_named(tmp_path: Path) -> None:
    msg = _error(tiny_config_dict(tmp_path, TWO_LEVEL), ["nodes.world/med.inner_round=2"])
    assert "nodes.world/med.inner_round" in msg and "inner_rounds" in msg


def test_unknown_section_is_named(tmp_path: Path) -> None:
    msg = _error(tiny_config_dict(tmp_path, TWO_LEVEL), ["trian.lr=0.1"])
    assert "trian" in msg and "did you mean 'train'" in msg


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr='fast'", "train.lr"),
        ("train.local_steps=0", "train.local_steps"),
        ("stop.rounds=1.5", "stop.rounds"),
        ("data.val_fraction=1.0", "data.val_fraction"),
        ("run.method='magic'", "run.method"),
        ("nodes.world/med.sample.fraction=0", "nodes.world/med.sample.fraction"),
        ("model.preset='tiny'", "model"),  # preset and path together
    ],
)
def test_wrong_types_and_ranges_name_the_key(tmp_path: Path, override: str, key: str) -> None:
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    extra = ["model.path='somewhere'"] if override.startswith("model.preset") else []
    msg = _error(data, [override, *extra])
    assert key in msg


def test_leaf_without_data_is_rejected(tmp_path: Path) -> None:
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    data["nodes"]["world/med/empty"] = {}
    assert "nodes.world/med/empty.data" in _error(data, [])


def test_minimum_above_children_is_rejected(tmp_path: Path) -> None:
    msg = _error(tiny_config_dict(tmp_path, TWO_LEVEL), ["nodes.world/med.sample.min=3"])
    assert "nodes.world/med.sample.min" in msg and "(2)" in msg


def test_tree_shape_errors(tmp_path: Path) -> None:
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    orphan = {**data, "nodes": {**data["nodes"], "world/ghost/x": data["nodes"]["world/med/a"]}}
    assert "parent 'world/ghost'" in _error(orphan, [])
    two_roots = {**data, "nodes": {**data["nodes"], "other": {}}}
    assert "exactly one root" in _error(two_roots, [])
    dup = {**data, "nodes": {**data["nodes"], "world/soft/a": data["nodes"]["world/med/a"]}}
    assert "leaf name 'a'" in _error(dup, [])
    assert "stop.rounds" in _error(data, ["nodes.world.inner_rounds=2"])
    assert "nodes.world/med.strategy" in _error(data, ["nodes.world/med.strategy='fedmagic'"])
    assert "only aggregators" in _error(data, ["nodes.world/med/a.inner_rounds=2"])


def test_overrides_are_typed() -> None:
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("stop.rounds=3") == (["stop", "rounds"], 3)
    assert parse_override("run.name=hello") == (["run", "name"], "hello")
    assert parse_override("train.keep_optimizer_state=false")[1] is False
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("train.lr")
    # node paths, bare or quoted as in TOML (quotes allow dots inside a path)
    expected = (["nodes", "world/med", "inner_rounds"], 2)
    assert parse_override("nodes.world/med.inner_rounds=2") == expected
    assert parse_override('nodes."world/med".inner_rounds=2') == expected
    assert parse_override('nodes."w/v1.2".strategy=fedavg')[0] == ["nodes", "w/v1.2", "strategy"]
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("train..lr=1")


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("hello", encoding="utf-8")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[nodes.w]\n[nodes."w/a"]\ndata = { paths = ["d.txt"] }\n', encoding="utf-8")
    leaf = load_config(cfg).nodes["w/a"]
    assert isinstance(leaf, LeafConfig) and leaf.data is not None
    assert leaf.data.paths == [str(tmp_path / "d.txt")]


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[run\nname=1", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config(cfg)


def test_dumped_config_reloads_identically(tmp_path: Path) -> None:
    config = validate_config(tiny_config_dict(tmp_path, TWO_LEVEL))
    again = validate_config(tomllib.loads(dump_config(config)))
    assert again.model_dump() == config.model_dump()


def test_embedded_default_is_valid() -> None:
    config = load_config(None)
    assert config.run.method == "worldlm"  # the method the project is named for
    leaves = [p for p, n in config.nodes.items() if isinstance(n, LeafConfig)]
    assert len(leaves) >= 4 and all(p.count("/") == 2 for p in leaves)
    assert tomllib.loads(default_config_text()) == tomllib.loads(
        (Path(__file__).parent.parent / "configs" / "default.toml").read_text("utf-8")
    )


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_builds(path: Path) -> None:
    from worldlm.federation.methods import plan_method
    from worldlm.tree import build_tree

    config = load_config(path)
    plan = plan_method(config.run.method, build_tree(config.nodes))
    assert list(plan.tree.leaves())


def test_configs_directory_is_not_empty() -> None:
    assert len(CONFIGS) >= 4


def test_docs_reference_every_key_and_is_current() -> None:
    from worldlm.config_docs import config_reference

    doc = (Path(__file__).parent.parent / "docs" / "config.md").read_text("utf-8")
    assert doc == config_reference(), "regenerate: python -m worldlm.config_docs > docs/config.md"


def test_data_root_anchors_relative_leaf_paths(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[data]\nroot = "corpora"\n[nodes.w]\n[nodes."w/a"]\ndata = { paths = ["a.jsonl"] }\n',
        encoding="utf-8",
    )
    leaf = load_config(cfg).nodes["w/a"]
    assert isinstance(leaf, LeafConfig) and leaf.data is not None
    assert leaf.data.paths == [str(tmp_path / "corpora" / "a.jsonl")]
    moved = load_config(cfg, ["data.root='/elsewhere'"]).nodes["w/a"]
    assert isinstance(moved, LeafConfig) and moved.data is not None
    assert moved.data.paths == ["/elsewhere/a.jsonl"]


def test_a_node_is_an_aggregator_or_a_leaf_never_both(tmp_path: Path) -> None:
    config = validate_config(tiny_config_dict(tmp_path, TWO_LEVEL))
    kinds = {path: type(node).__name__ for path, node in config.nodes.items()}
    assert kinds == {
        **{p: "AggregatorConfig" for p in ("world", "world/med", "world/soft")},
        **{p: "LeafConfig" for p in TWO_LEVEL},
    }
    dumped = tomllib.loads(dump_config(config))["nodes"]
    assert "data" not in dumped["world/med"] and "strategy" in dumped["world/med"]
    assert set(dumped["world/med/a"]) == {"data", "link", "dp", "slowdown"}  # no aggregator's
    # The wrong kind of settings is refused by name, whichever side it is on.
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    leaf_error = _error(data, ["nodes.world/med/a.server_optimizer.name=fedadam"])
    assert "nodes.world/med/a.server_optimizer: only aggregators" in leaf_error
    assert "nodes.world/med.data: only leaves hold data" in _error(
        data, ["nodes.world/med.data.corpus='hpo'"]
    )
    assert "nodes.world/med/b.data: a leaf needs data" in _error(
        {**data, "nodes": {**data["nodes"], "world/med/b": {"inner_rounds": 2}}}, []
    )


def test_a_leaf_table_written_before_the_split_still_loads(tmp_path: Path) -> None:
    # Until the aggregator/leaf split, a written config kept these on every leaf, at defaults.
    legacy = {
        "min_replies": 1,
        "max_change": 10.0,
        "robust": {"byzantine": 0, "trim_fraction": 0.1},
        "secure_aggregation": {
            "enabled": False,
            "neighbours": 0,
            "threshold": 0.5,
            "bits": 32,
            "clip_range": 1.0,
        },
    }
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    data["nodes"]["world/med/a"].update(legacy)
    assert isinstance(validate_config(data).nodes["world/med/a"], LeafConfig)
    data["nodes"]["world/med/a"]["max_change"] = 5.0  # a setting, not a leftover: refused
    assert "nodes.world/med/a.max_change: only aggregators" in _error(data, [])
