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
from worldlm.errors import UpdateRejected
from worldlm.federation import aggregator as aggregator_module
from worldlm.federation import build as build_module
from worldlm.federation.record_check import (
    INCIDENTS_PER_CHILD,
    check_records,
    record_limits,
    trim_incidents,
)
from worldlm.progress import QuietProgress
from worldlm.session import open_session
from worldlm.tree import build_tree

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


def _refused_with_its_reply(
    tmp_path: Path, extra: dict[str, Any], named: str
) -> list[dict[str, Any]]:
    """The round's rows, after checking that world/med/a's reply carrying `extra` was
    refused for the reason `named` and that the row went nowhere."""
    records = _round(tmp_path, extra)
    rejected = [r for r in records if r["kind"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["sender"] == "world/med/a"
    assert named in rejected[0]["reason"]
    assert extra not in records
    return records


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
    records = _refused_with_its_reply(tmp_path, extra, named)
    med = next(r for r in records if r["kind"] == "aggregate" and r["node"] == "world/med")
    assert med["status"] == "ok" and med["participants"] == ["world/med/b"]


def test_without_the_check_a_sibling_epsilon_reaches_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aggregator_module, "check_records", lambda *args: None)
    assert FORGED_EPSILON in _round(tmp_path, FORGED_EPSILON)


def _flood(count: int) -> list[dict[str, Any]]:
    row = {"round": 1, "node": "world/med/a", "kind": "train", "loss": 1.0}
    return [{**row, "tokens": 512, "steps": 1}] * count


class Flooding(Reporting):
    def handle_train(self, task: TrainTask) -> Update:
        honest = self.leaf.handle_train(task)
        return replace(honest, records=[*honest.records, *self.extra["rows"]])


def _flood_round(tmp_path: Path, rows: int) -> list[dict[str, Any]]:
    config = tiny_config(tmp_path, TWO_LEVEL, ["run.method=hierfavg", "train.local_steps=1"])
    session = open_session(config, QuietProgress(), tmp_path / "run")
    leaf = session.fed.leaves["world/med/a"]
    session.fed.transport.register(Flooding(leaf, {"rows": _flood(rows)}))
    return session.fed.root.run_round(session.fed.root.state, 1).records


def test_more_rows_than_a_leaf_writes_are_refused(tmp_path: Path) -> None:
    records = _flood_round(tmp_path, 10_000)
    rejected = [r for r in records if r["kind"] == "rejected"]
    assert len(rejected) == 1 and "more than the 2 its subtree writes" in rejected[0]["reason"]
    assert sum(r["kind"] == "train" for r in records) == 3  # the three honest leaves


def test_without_the_limit_the_flood_reaches_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build_module, "record_limits", lambda t: {n.path: None for n in t.walk()})
    records = _flood_round(tmp_path, 10_000)
    assert sum(r["kind"] == "train" for r in records) > 10_000


def test_an_aggregator_keeps_only_as_many_incidents_as_its_parent_accepts(
    tmp_path: Path,
) -> None:
    """A child that floods an honest aggregator with refused messages cannot get the
    aggregator's own reply refused for having too many rows."""
    incident = {"round": 1, "node": "world/med", "kind": "refused", "sender": "x", "reason": "r"}
    rows = [incident] * 500
    rows += [{"round": 1, "node": "world/med/a", "kind": "train", "loss": 1.0, "tokens": 8}]
    rows[-1]["steps"] = 1
    kept = trim_incidents(rows, "world/med", INCIDENTS_PER_CHILD * 2)
    assert len(kept) == INCIDENTS_PER_CHILD * 2 + 1 and kept[-1]["node"] == "world/med/a"
    tree = build_tree(tiny_config(tmp_path, TWO_LEVEL).nodes)
    check_records("world/med", kept, record_limits(tree)["world/med"])
    with pytest.raises(UpdateRejected, match="metrics rows, more than"):
        check_records("world/med", rows, record_limits(tree)["world/med"])


OWN = {"round": 1, "node": "world/med/a"}


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({**OWN, "kind": "privacy", "epsilon": "lots", "delta": 1e-5, "steps": 1}, "'epsilon'"),
        ({**OWN, "kind": "privacy", "epsilon": -1.0, "delta": 1e-5, "steps": 1}, "'epsilon'"),
        ({**OWN, "kind": "train", "tokens": 1, "steps": 1}, "without 'loss'"),
        ({**OWN, "kind": "train", "loss": "low", "tokens": 1, "steps": 1}, "'loss'"),
        (
            {**OWN, "kind": "aggregate", "local_round": 1, "status": "ok", "participants": "x"},
            "'participants'",
        ),
        ({**OWN, "kind": "refused", "sender": "x", "reason": "r" * 5000}, "'reason'"),
        (
            {**OWN, "kind": "train", "loss": 1.0, "tokens": 1, "steps": 1, "x": [[[1]]]},
            "'x'",
        ),
    ],
    ids=[
        "epsilon-text",
        "epsilon-negative",
        "no-loss",
        "loss-text",
        "participants-text",
        "long-reason",
        "nested-extra",
    ],
)
def test_a_row_that_breaks_its_schema_is_refused(
    tmp_path: Path, extra: dict[str, Any], named: str
) -> None:
    _refused_with_its_reply(tmp_path, extra, named)


def test_without_the_schema_a_text_epsilon_breaks_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accepted, a privacy row whose ε is text is written to metrics.jsonl and makes the
    report (and model cards) fail at the end of the run."""
    from worldlm.federation import record_check
    from worldlm.metrics.report import last_privacy

    forged = {**OWN, "kind": "privacy", "epsilon": "lots", "delta": 1e-5, "steps": 1}
    monkeypatch.setattr(record_check, "schema_problem", lambda kind, row: None)
    records = _round(tmp_path, forged)
    assert forged in records
    with pytest.raises(ValueError, match="could not convert"):
        last_privacy(records)


def test_honest_rows_of_every_kind_fit_their_schema(tmp_path: Path) -> None:
    """What the engine itself writes passes: a run with central DP, local DP and refusals."""
    from worldlm.federation.record_schema import SCHEMAS, schema_problem

    overrides = ["run.method=hierfavg", "train.local_steps=1", "nodes.world/med.dp.enabled=true"]
    overrides += ["nodes.world/med.dp.noise_multiplier=0.001"]  # small: within max_change
    overrides += ["nodes.world/soft/c.dp.local_noise_multiplier=0.001"]
    config = tiny_config(tmp_path, TWO_LEVEL, overrides)
    session = open_session(config, QuietProgress(), tmp_path / "run")
    records = session.fed.root.run_round(session.fed.root.state, 1).records
    kinds = {r["kind"] for r in records}
    assert {"train", "privacy", "aggregate"} <= kinds and "rejected" not in kinds
    assert sum(r["kind"] == "privacy" for r in records) == 2  # central at world/med, local at c
    for row in records:
        if row["kind"] in SCHEMAS:
            assert schema_problem(row["kind"], row) is None, row
