"""`compare`: all six methods on one budget, a table, a plot, and reuse of finished methods."""

from __future__ import annotations

from pathlib import Path

import pytest

import worldlm.compare as compare_module
from worldlm.compare import METHODS, compare
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
