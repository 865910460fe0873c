"""docs/api.md runs as written: its code blocks, in order, in one namespace (a notebook), and
the public names it documents are what `worldlm` exports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import worldlm
from worldlm.strategies.registry import STRATEGIES
from worldlm.train.trainer import TRAINERS

DOC = Path(__file__).parent.parent / "docs" / "api.md"


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_api_page_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = code_blocks(DOC.read_text("utf-8"))
    assert len(blocks) == 4  # the data, then the three worked examples
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "api_docs"}
    try:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
    finally:
        STRATEGIES.pop("uniform", None)
        TRAINERS.pop("smoothed", None)
    out = capsys.readouterr().out
    # Example 1: the custom rule ran and every leaf has a finite perplexity.
    uniform = namespace["result"]
    assert isinstance(uniform, worldlm.RunResult)
    assert len(uniform.perplexity) == 4  # the partition's four leaves
    assert all(path.startswith(("world/g0/", "world/g1/")) for path in uniform.perplexity)
    assert "worst leaf:" in out
    # Example 2: label smoothing trained a different model from example 1's default loss.
    smoothed = namespace["smoothed"]
    assert isinstance(smoothed, worldlm.RunResult)
    assert smoothed.mean_perplexity != pytest.approx(uniform.mean_perplexity, rel=1e-6)
    # Example 3: four methods, each a row of the printed table's header, and their files.
    results = namespace["results"]
    assert [r.method for r in results] == ["local", "fedavg", "fedper", "worldlm"]  # type: ignore[attr-defined]
    assert (tmp_path / "study" / "results.md").is_file()
    assert "best mean:" in out
    # Each run trained: perplexity fell below the first evaluation's at every leaf.
    for leaf, after in uniform.after.items():
        assert after.loss < uniform.before[leaf].loss


def test_every_public_name_resolves() -> None:
    errors = {"CheckpointError", "ConfigError", "DataError", "ModelError", "TransportError"}
    errors |= {"UpdateRejected", "WireError", "WorldLMError", "__version__"}
    assert set(worldlm.__all__) == errors | set(worldlm._EXPORTS)
    for name in worldlm.__all__:
        assert getattr(worldlm, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = worldlm.nope  # type: ignore[attr-defined]


def test_the_uniform_rule_differs_from_fedavg_on_unequal_children() -> None:
    """The doc's custom rule is not FedAvg under another name: with children of unequal
    weight the two aggregates differ (FedAvg weighs by tokens, the rule does not)."""
    import torch

    from worldlm.core.messages import Update
    from worldlm.strategies.catalog import build_strategy

    namespace: dict[str, object] = {"__name__": "api_docs"}
    exec(
        compile(code_blocks(DOC.read_text("utf-8"))[1].split("config = ")[0], "doc", "exec"),
        namespace,
    )
    try:
        current = {"w": torch.zeros(2)}
        updates = [
            Update("a", 1, "n", {"w": torch.tensor([1.0, 1.0])}, 3.0),
            Update("b", 1, "n", {"w": torch.tensor([3.0, 3.0])}, 1.0),
        ]
        means = {}
        for name in ("uniform", "fedavg"):
            rnd = build_strategy(name).start_round(current)
            for update in updates:
                rnd.add(update)
            total, scale = rnd.result()
            means[name] = total["w"] / scale
    finally:
        STRATEGIES.pop("uniform", None)
    torch.testing.assert_close(means["uniform"], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(means["fedavg"], torch.tensor([1.5, 1.5]))
