"""`compare`: all six methods on one budget, a table, a plot, and reuse of finished methods."""

from __future__ import annotations

from pathlib import Path

import pytest

import worldlm.comparison as compare_module
from worldlm.comparison import (
    FEDPROX_MU,
    METHODS,
    SERVER_OPTIMIZERS,
    MethodSpec,
    compare,
    method_config,
    parse_method,
)
from worldlm.config import RunConfig, ServerOptimizerConfig, dump_config
from worldlm.config_load import load_config
from worldlm.errors import ConfigError
from worldlm.metrics.jsonl import read_metrics
from worldlm.progress import QuietProgress

from .conftest import TWO_LEVEL, tiny_config


def test_compare_runs_every_method_and_writes_table_and_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL)
    out = tmp_path / "cmp"
    results = compare(config, out, lambda _m: QuietProgress(), METHODS)
    assert [r.method for r in results] == list(METHODS)
    for result in results:
        assert set(result.ppl) == set(TWO_LEVEL)
        assert [r for r, _ in result.curve] == [0, 1, 2]
        assert result.curve[-1][1] < result.curve[0][1]
    text = (out / "results.md").read_text("utf-8")
    assert "FedAvg / WorldLM" in text and all(m in text for m in METHODS)
    assert (out / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # same budget: the centralized node takes n_leaves x local_steps per round
    central = [
        r for r in read_metrics(out / "centralized" / "metrics.jsonl") if r["kind"] == "train"
    ]
    local = [r for r in read_metrics(out / "local" / "metrics.jsonl") if r["kind"] == "train"]
    assert sum(r["tokens"] for r in central) == sum(r["tokens"] for r in local)

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a finished method was run again")

    monkeypatch.setattr(compare_module, "run", refuse)
    again = compare(config, out, lambda _m: QuietProgress(), METHODS)
    assert [r.ppl for r in again] == [r.ppl for r in results]

    # a changed config must not silently reuse the finished runs
    changed = config.model_copy(update={"train": config.train.model_copy(update={"lr": 1e-3})})
    with pytest.raises(ConfigError, match=r"it has lr = 0\.003; asked: lr = 0\.001"):
        compare(changed, out, lambda _m: QuietProgress(), METHODS)


def test_method_names_are_a_base_and_an_optional_server_optimizer() -> None:
    assert parse_method("fedavg") == MethodSpec("fedavg", "fedavg", None)
    assert parse_method("hierfavg+fedadam") == MethodSpec("hierfavg+fedadam", "hierfavg", "fedadam")
    assert parse_method("fedprox+nesterov").method == "fedavg"
    assert parse_method("worldlm+nesterov").method == "worldlm"
    for base in (*METHODS, "fedprox"):
        assert parse_method(base).method == ("fedavg" if base == "fedprox" else base)
    for optimizer in SERVER_OPTIMIZERS:
        assert parse_method(f"fedper+{optimizer}").optimizer == optimizer
    for bad in (
        "fedsgd",
        "fedavg+",
        "fedavg+sgd",
        "fedavg+fedavg",
        "+nesterov",
        "FedAvg",
        "fedavg+nesterov+fedadam",
        "",
    ):
        with pytest.raises(ConfigError, match=r"BASE or BASE\+OPTIMIZER.*fedprox.*fedyogi"):
            parse_method(bad)
    for base in ("centralized", "local"):  # nothing aggregated at the root to step on
        with pytest.raises(ConfigError, match="no server optimizer"):
            parse_method(f"{base}+nesterov")


def _root_optimizer(config: RunConfig) -> ServerOptimizerConfig:
    return config.nodes["world"].server_optimizer


def test_method_config_sets_the_base_method_and_the_root_optimizer(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL)
    nesterov = method_config(config, "fedavg+nesterov")
    assert nesterov.run.method == "fedavg" and nesterov.run.name == "fedavg+nesterov"
    assert _root_optimizer(nesterov) == ServerOptimizerConfig(name="nesterov")
    assert nesterov.nodes["world/med"] == config.nodes["world/med"]  # the root's alone
    assert nesterov.train == config.train
    plain = method_config(config, "hierfavg")
    assert _root_optimizer(plain).name == "fedavg" and plain.nodes == config.nodes
    # it stays a valid config, and what the run directory stores reads back the same
    path = tmp_path / "config.toml"
    path.write_text(dump_config(nesterov), encoding="utf-8")
    assert dump_config(load_config(path)) == dump_config(nesterov)

    # the config's own root optimizer is kept when it is the one asked for (a tuned lr) ...
    tuned = tiny_config(
        tmp_path,
        TWO_LEVEL,
        ["nodes.world.server_optimizer.name=nesterov", "nodes.world.server_optimizer.lr=0.5"],
    )
    assert _root_optimizer(method_config(tuned, "worldlm+nesterov")).learning_rate == 0.5
    # ... and replaced by the defaults of the one asked for otherwise
    adam = _root_optimizer(method_config(tuned, "worldlm+fedadam"))
    assert adam == ServerOptimizerConfig(name="fedadam")


def test_method_config_fedprox_turns_the_proximal_term_on(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL)
    prox = method_config(config, "fedprox")
    assert prox.run.method == "fedavg" and prox.run.name == "fedprox"
    assert prox.train.prox_mu == FEDPROX_MU
    assert prox.train.model_copy(update={"prox_mu": 0.0}) == config.train
    both = method_config(config, "fedprox+fedyogi")
    assert both.train.prox_mu == FEDPROX_MU and _root_optimizer(both).name == "fedyogi"
    # the config's mu is fedprox's; the other methods run without the term
    tuned = tiny_config(tmp_path, TWO_LEVEL, ["train.prox_mu=0.5"])
    assert method_config(tuned, "fedprox").train.prox_mu == 0.5
    assert method_config(tuned, "fedavg").train.prox_mu == 0.0
    assert method_config(tuned, "centralized").train.prox_mu == 0.0


def test_compare_refuses_bad_names_before_running_anything(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL)
    out = tmp_path / "cmp"
    with pytest.raises(ConfigError, match="fedavg\\+sgd"):
        compare(config, out, lambda _m: QuietProgress(), ["fedavg", "fedavg+sgd"])
    assert not out.exists()


def test_compare_runs_a_method_with_a_server_optimizer_and_fedprox(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL, ["stop.rounds=1"])
    out = tmp_path / "cmp"
    [result] = compare(config, out, lambda _m: QuietProgress(), ["fedprox+nesterov"])
    assert result.method == "fedprox+nesterov" and set(result.ppl) == set(TWO_LEVEL)
    stored = load_config(out / "fedprox+nesterov" / "config.toml")
    assert stored.run.method == "fedavg" and stored.train.prox_mu == FEDPROX_MU
    assert _root_optimizer(stored).name == "nesterov"
    assert "| fedprox+nesterov |" in (out / "results.md").read_text("utf-8")
