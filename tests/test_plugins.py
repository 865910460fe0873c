"""Plugins named in run.plugins are imported before the config is checked, so that the names
they register are valid there; a plugin that cannot be imported is a clear refusal."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from worldlm.config_load import validate_config
from worldlm.config_toml import apply_overrides
from worldlm.errors import ConfigError
from worldlm.progress import QuietProgress
from worldlm.registration import add_entry
from worldlm.runner import run
from worldlm.strategies.registry import STRATEGIES
from worldlm.strategies.server_optimizer import SERVER_OPTIMIZERS

from .conftest import tiny_config_dict

PLUGIN = """
import torch
from worldlm import register_server_optimizer, register_strategy
from worldlm.strategies.fedavg import FedAvg

CALLS = []


@register_strategy("plugin_fedavg")
def make(settings):
    return FedAvg()


@register_server_optimizer("halfway")
def halfway(config):
    def step(x, g, slots):
        CALLS.append(x.shape)
        x.sub_(g, alpha=0.5)  # half of the way to the aggregate
    return step
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    (tmp_path / "plugin_dir").mkdir()
    (tmp_path / "plugin_dir" / "my_worldlm_plugin.py").write_text(PLUGIN, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path / "plugin_dir"))
    yield "my_worldlm_plugin"
    STRATEGIES.pop("plugin_fedavg", None)
    SERVER_OPTIMIZERS.pop("halfway", None)
    sys.modules.pop("my_worldlm_plugin", None)


def _config(tmp_path: Path, overrides: list[str]):  # type: ignore[no-untyped-def]
    data = tiny_config_dict(tmp_path, {"world/a": "med", "world/b": "law"})
    return validate_config(apply_overrides(data, overrides))


def test_a_plugin_strategy_and_server_optimizer_run(tmp_path: Path, plugin: str) -> None:
    overrides = [
        f'run.plugins=["{plugin}"]',
        'nodes.world.strategy="plugin_fedavg"',
        'nodes.world.server_optimizer.name="halfway"',
    ]
    result = run(_config(tmp_path, overrides), QuietProgress())
    calls = sys.modules[plugin].CALLS
    assert len(calls) > 0  # the plugin's step ran on the root's tensors
    assert result.rounds == 2


def test_without_the_plugin_its_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown strategy 'plugin_fedavg'"):
        _config(tmp_path, ['nodes.world.strategy="plugin_fedavg"'])
    with pytest.raises(ConfigError, match="unknown server optimizer 'halfway'"):
        _config(tmp_path, ['nodes.world.server_optimizer.name="halfway"'])


def test_a_missing_plugin_is_a_clear_refusal(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run.plugins: cannot import 'no_such_plugin_xyz'"):
        _config(tmp_path, ['run.plugins=["no_such_plugin_xyz"]'])


def test_a_plugin_that_fails_while_importing_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_worldlm_plugin.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"'broken_worldlm_plugin' failed: RuntimeError: boom"):
        _config(tmp_path, ['run.plugins=["broken_worldlm_plugin"]'])


def test_one_name_cannot_hold_two_different_extensions() -> None:
    table: dict[str, object] = {}

    def first() -> None: ...

    def second() -> None: ...

    add_entry(table, "x", first, "strategy")
    add_entry(table, "x", first, "strategy")  # the same function again: a re-run cell
    with pytest.raises(ValueError, match="strategy 'x' is registered twice"):
        add_entry(table, "x", second, "strategy")
    assert table["x"] is first


def test_the_server_optimizer_step_moves_half_way(plugin: str) -> None:
    """The plugin's optimizer is the one built for its name (not FedAvg's identity step)."""
    import importlib

    from worldlm.config import ServerOptimizerConfig
    from worldlm.strategies.server_optimizer import ServerOptimizer

    importlib.import_module(plugin)
    opt = ServerOptimizer(ServerOptimizerConfig(name="halfway"))
    new = opt.step({"w": torch.zeros(3)}, {"w": torch.ones(3)}, ["w"])
    torch.testing.assert_close(new["w"], torch.full((3,), 0.5))


def test_a_registered_model_builder_is_a_preset(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from worldlm.model.build import register_model_builder
    from worldlm.presets import MODEL_BUILDERS

    built: list[int] = []

    @register_model_builder("gpt2-test")
    def gpt2(model_config, vocab_size):  # type: ignore[no-untyped-def]
        built.append(vocab_size)
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=model_config.block_size,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
        )
        return GPT2LMHeadModel(config)

    try:
        result = run(_config(tmp_path, ['model.preset="gpt2-test"']), QuietProgress())
    finally:
        MODEL_BUILDERS.pop("gpt2-test", None)
    assert built and built[0] == 320  # the run's tokenizer size
    assert all(after.loss < result.before[leaf].loss for leaf, after in result.after.items())
    with pytest.raises(ConfigError, match="unknown preset 'gpt2-test'"):
        _config(tmp_path, ['model.preset="gpt2-test"'])  # gone once unregistered


def test_a_registered_data_source_feeds_its_leaf(tmp_path: Path) -> None:
    from worldlm.data.custom_sources import DATA_SOURCES, register_data_source

    asked: list[dict[str, object]] = []

    @register_data_source("synthetic-test")
    def synthetic(options):  # type: ignore[no-untyped-def]
        asked.append(dict(options))
        word = options["word"]
        for i in range(int(options["docs"])):
            yield f"The {word} number {i} is near the {word} of {i + 1}."
        yield {"prompt": "Name the word.", "completion": f" {word}"}  # a TRL record

    leaf = {"source": "synthetic-test", "options": {"word": "harbour", "docs": 40}}
    overrides = [f"nodes.world/a.data={_inline(leaf)}"]
    try:
        result = run(_config(tmp_path, overrides), QuietProgress())
        with pytest.raises(ConfigError, match=r"options applies to data\.source only"):
            bad = {"paths": ["x.jsonl"], "options": {"word": "x"}}
            _config(tmp_path / "bad", [f"nodes.world/a.data={_inline(bad)}"])
    finally:
        DATA_SOURCES.pop("synthetic-test", None)
    assert asked and asked[0] == {"word": "harbour", "docs": 40}
    assert set(result.after) == {"world/a", "world/b"}
    summary = result.summary()["leaves"]["world/a"]
    assert summary["data_sha256"]  # the documents were read and digested
    from worldlm.data.prepare import check_sources
    from worldlm.errors import DataError
    from worldlm.tree import build_tree

    with pytest.raises(DataError, match="no data source 'synthetic-test' is registered"):
        check_sources(build_tree(_config(tmp_path / "gone", overrides).nodes))


def _inline(table: dict[str, object]) -> str:
    """A TOML inline table of `table`."""
    import json

    return (
        "{" + ", ".join(f"{k} = {json.dumps(v).replace(':', ' =')}" for k, v in table.items()) + "}"
    )


def test_partials_and_presets_are_not_silently_replaced() -> None:
    import functools

    from worldlm.model.build import register_model_builder

    def factory(scale: float) -> float:
        return scale

    table: dict[str, object] = {}
    add_entry(table, "p", functools.partial(factory, 1.0), "strategy")
    with pytest.raises(ValueError, match="registered twice"):
        add_entry(table, "p", functools.partial(factory, 2.0), "strategy")
    with pytest.raises(ValueError, match="hide the built-in preset"):
        register_model_builder("small")
