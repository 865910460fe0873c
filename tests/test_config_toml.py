"""The TOML writer of run configs: any string round-trips, and the layout (which a run's id
hashes, `session.config_digest`) stays as it was."""

from __future__ import annotations

import tomllib
from pathlib import Path

from worldlm.config import dump_config, to_toml
from worldlm.config_load import load_config, validate_config

from .conftest import TWO_LEVEL, tiny_config_dict


def test_a_run_name_with_a_newline_round_trips(tmp_path: Path) -> None:
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    for name in ("two\nlines", 'quote " and \\ backslash', "tab\there", "bell\x07\x7f", "café €"):
        data["run"]["name"] = name
        config = validate_config(data)
        text = dump_config(config)
        file = tmp_path / "config.toml"
        file.write_text(text, encoding="utf-8")
        assert load_config(file).run.name == name
        assert validate_config(tomllib.loads(text)).model_dump() == config.model_dump()


def test_keys_that_are_not_bare_are_quoted() -> None:
    data = {"nodes": {"world/a": {"x": 1}, "café": {"y": 2}, 'q"k': {"z": 3}}}
    assert tomllib.loads(to_toml(data)) == data


def test_the_layout_is_unchanged() -> None:
    data = {
        "run": {"name": "n", "seed": 0, "tags": ["a", "b"], "on": True, "lr": 0.001},
        "nodes": {"world": {"strategy": "fedavg"}, "world/a": {"data": {"paths": ["x.jsonl"]}}},
    }
    assert to_toml(data) == (
        '[run]\nname = "n"\nseed = 0\ntags = ["a", "b"]\non = true\nlr = 0.001\n\n'
        '[nodes]\n[nodes.world]\nstrategy = "fedavg"\n\n'
        '[nodes."world/a"]\n[nodes."world/a".data]\npaths = ["x.jsonl"]\n'
    )
