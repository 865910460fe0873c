"""A `--set` under `nodes.` changes a node the config has; a misspelt node path is refused with
the nodes there are, never turned into a new node."""

from __future__ import annotations

from pathlib import Path

import pytest

from worldlm.cli import main
from worldlm.config import AggregatorConfig, to_toml
from worldlm.config_load import load_config
from worldlm.errors import ConfigError

from .conftest import TWO_LEVEL, save_topic_dataset, tiny_config_dict


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(to_toml(tiny_config_dict(tmp_path, TWO_LEVEL)), encoding="utf-8")
    return path


def test_a_setting_on_an_existing_node_applies(tmp_path: Path) -> None:
    config = load_config(_config_file(tmp_path), ["nodes.world/med.inner_rounds=2"])
    node = config.nodes["world/med"]
    assert isinstance(node, AggregatorConfig) and node.inner_rounds == 2


@pytest.mark.parametrize(
    "override",
    [
        "nodes.world/mde.inner_rounds=2",  # a typo of world/med
        'nodes."world/mde".inner_rounds=2',
        "nodes.world/med/z.data.paths=['x.jsonl']",  # a leaf that is not there
        "nodes.world/new={}",
    ],
)
def test_a_setting_on_an_unknown_node_is_refused(tmp_path: Path, override: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_config_file(tmp_path), [override])
    message = str(info.value)
    assert "has no node" in message and "world/med, world/med/a" in message
    if "mde" in override:
        assert "did you mean 'world/med'?" in message


def test_with_a_partition_a_set_names_a_generated_node(tmp_path: Path) -> None:
    save_topic_dataset(tmp_path / "topics", n_docs=40)
    path = tmp_path / "p.toml"
    path.write_text(
        '[partition]\nkind = "iid"\nleaves = 4\ngroups = 2\ndata = { dataset = "topics" }\n',
        encoding="utf-8",
    )
    node = load_config(path, ["nodes.world/g1.inner_rounds=3"]).nodes["world/g1"]
    assert isinstance(node, AggregatorConfig) and node.inner_rounds == 3
    with pytest.raises(ConfigError, match="not a node of the tree"):
        load_config(path, ["nodes.world/g7.inner_rounds=3"])


def test_the_command_line_refuses_it_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = _config_file(tmp_path)
    assert main(["check", str(path), "--set", "nodes.world/typo.inner_rounds=2"]) == 2
    err = capsys.readouterr().err
    assert "world/typo" in err and "Traceback" not in err
    assert main(["run", str(path), "--quiet", "--set", "nodes.world/soft/cc.dp.enabled=true"]) == 2
    assert "did you mean 'world/soft/c'?" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
