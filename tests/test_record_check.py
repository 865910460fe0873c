"""A child reports rows about its own subtree only, of the kinds the engine writes (issue 19,
item 5): a forged sibling's ε, a root aggregate row or a row with a round that is not an
integer is refused with the reply, and the round goes on."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from worldlm.core.messages import TrainTask, Update
from worldlm.core.transport import ChildInfo, NodeHandler
from worldlm.federation import aggregator as aggregator_module
from worldlm.progress import QuietProgress
from worldlm.session import open_session

from .conftest import TWO_LEVEL, tiny_config

FORGED_EPSILON = {"round": 1, "node": "world/soft/c", "kind": "privacy", "epsilon": 0.01}


class Reporting:
    """Answers like `leaf`, adding `extra` to the rows it reports."""

    def __init__(self, leaf: NodeHandler, extra: dict[str, Any]) -> None:
        self.leaf, self.path, self.extra = leaf, leaf.path, extra

    def info(self) -> ChildInfo:
        return self.leaf.info()

    def handle_train(self, task: TrainTask) -> Update:
        honest = self.leaf.handle_train(task)
        return replace(honest, records=[*honest.records, self.extra])

    def handle_eval(self, task):  # type: ignore[no-untyped-def]
        return self.leaf.handle_eval(task)


def _round(tmp_path: Path, extra: dict[str, Any]) -> list[dict[str, Any]]:
    config = tiny_config(tmp_path, TWO_LEVEL, ["run.method=hierfavg", "train.local_steps=1"])
    session = open_session(config, QuietProgress(), tmp_path / "run")
    session.fed.transport.register(Reporting(session.fed.leaves["world/med/a"], extra))
    return session.fed.root.run_round(session.fed.root.state, 1).records


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (FORGED_EPSILON, "about 'world/soft/c', outside its own subtree"),
        ({"round": 1, "node": "world", "kind": "aggregate"}, "about 'world', outside"),
        ({"round": 1, "node": "world/med/a", "kind": "eval", "loss": 0.0}, "unknown kind 'eval'"),
        ({"round": "x", "node": "world/med/a", "kind": "train"}, "has round 'x'"),
    ],
    ids=["sibling-epsilon", "root-aggregate", "unknown-kind", "round-not-integer"],
)
def test_a_forged_row_is_refused_with_its_reply(
    tmp_path: Path, extra: dict[str, Any], named: str
) -> None:
    records = _round(tmp_path, extra)
    rejected = [r for r in records if r["kind"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["sender"] == "world/med/a"
    assert named in rejected[0]["reason"]
    assert extra not in records
    med = next(r for r in records if r["kind"] == "aggregate" and r["node"] == "world/med")
    assert med["status"] == "ok" and med["participants"] == ["world/med/b"]


def test_without_the_check_a_sibling_epsilon_reaches_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aggregator_module, "check_records", lambda sender, records: None)
    assert FORGED_EPSILON in _round(tmp_path, FORGED_EPSILON)
