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
        STRATEGIES.pop("clipped_mean", None)
        TRAINERS.pop("smoothed", None)
    out = capsys.readouterr().out
    # Example 1: the custom rule aggregated the root's two rounds, and its models are not
    # what FedAvg makes of the same replies.
    clipped = namespace["result"]
    assert isinstance(clipped, worldlm.RunResult)
    assert namespace["ROUNDS_AGGREGATED"] == [2, 2]  # two rounds of two sub-federations
    assert len(clipped.perplexity) == 4  # the partition's four leaves
    assert all(path.startswith(("world/g0/", "world/g1/")) for path in clipped.perplexity)
    assert "worst leaf:" in out
    plain = worldlm.run(worldlm.config_from_dict(namespace["base"], ['run.name="plain"']))  # type: ignore[arg-type]
    assert plain.perplexity != clipped.perplexity
    # Example 2: label smoothing trained a different model from example 1's default loss.
    smoothed = namespace["smoothed"]
    assert isinstance(smoothed, worldlm.RunResult)
    assert smoothed.mean_perplexity != pytest.approx(clipped.mean_perplexity, rel=1e-6)
    # Example 3: four methods, each a row of the printed table's header, and their files.
    results = namespace["results"]
    assert [r.method for r in results] == ["local", "fedavg", "fedper", "worldlm"]  # type: ignore[attr-defined]
    assert (tmp_path / "study" / "results.md").is_file()
    assert "best mean:" in out
    # Each run trained: perplexity fell below the first evaluation's at every leaf.
    for leaf, after in clipped.after.items():
        assert after.loss < clipped.before[leaf].loss


def test_every_public_name_resolves() -> None:
    errors = {"CheckpointError", "ConfigError", "DataError", "ModelError", "TransportError"}
    errors |= {"UpdateRejected", "WireError", "WorldLMError", "__version__"}
    assert set(worldlm.__all__) == errors | set(worldlm._EXPORTS)
    for name in worldlm.__all__:
        assert getattr(worldlm, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = worldlm.nope  # type: ignore[attr-defined]


def test_the_clipped_mean_differs_from_fedavg() -> None:
    """The doc's custom rule is not FedAvg under another name: of two equally weighted
    children, the one that moved three times as far is clipped to the median norm."""
    import torch

    from worldlm.core.messages import Update
    from worldlm.strategies.catalog import build_strategy

    namespace: dict[str, object] = {"__name__": "api_docs"}
    rule = code_blocks(DOC.read_text("utf-8"))[1].split("config = ")[0]
    exec(compile(rule, str(DOC), "exec"), namespace)
    try:
        current = {"w": torch.zeros(2)}
        updates = [
            Update("a", 1, "n", {"w": torch.tensor([1.0, 1.0])}, 1.0),
            Update("b", 1, "n", {"w": torch.tensor([3.0, 3.0])}, 1.0),
        ]
        means = {}
        for name in ("clipped_mean", "fedavg"):
            rnd = build_strategy(name).start_round(current)
            for update in updates:
                rnd.add(update)
            total, scale = rnd.result()
            means[name] = total["w"] / scale
    finally:
        STRATEGIES.pop("clipped_mean", None)
    torch.testing.assert_close(means["fedavg"], torch.tensor([2.0, 2.0]))
    # torch.median of two norms is the lower one: b is clipped to a's length.
    torch.testing.assert_close(means["clipped_mean"], torch.tensor([1.0, 1.0]))
