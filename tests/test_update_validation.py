"""TESTPLAN D16 and B6 on a live aggregator: each malformed reply alone inside a round is refused
with its own reason, and the round's result is FedAvg over the valid replies; too few valid
replies leave the model as it was; chronic stragglers are benched and tried again later.
Refusals and accepted digests are in the metrics and in the audit log alike."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from worldlm.audit.digest import state_digest
from worldlm.audit.log import AuditLog, verify
from worldlm.config import AggregatorConfig
from worldlm.core.inprocess import InProcessTransport
from worldlm.core.messages import (
    EvalReport,
    EvalTask,
    Record,
    State,
    TrainTask,
    Update,
)
from worldlm.core.transport import ChildInfo
from worldlm.federation.aggregator import Aggregator
from worldlm.federation.context import NoAudit, RunContext
from worldlm.federation.selection import eligible
from worldlm.strategies.catalog import build_strategy
from worldlm.strategies.fedavg import fedavg

Tamper = Callable[[Update], Update]


def _shift(state: State, by: float) -> State:
    return {k: v + by for k, v in state.items()}


class HonestChild:
    """Replies with the model it was sent, shifted by a fixed amount, and a fixed weight."""

    def __init__(self, path: str, shift: float, weight: float, tamper: Tamper | None = None):
        self.path, self.shift, self.weight, self.tamper = path, shift, weight, tamper
        self.resources: dict[str, object] = {}
        self.silent = False

    def info(self) -> ChildInfo:
        return ChildInfo(self.path, 100, self.resources)

    def handle_train(self, task: TrainTask) -> Update:
        update = Update(
            self.path, task.round, task.nonce, _shift(task.state, self.shift), self.weight
        )
        return update if self.tamper is None else self.tamper(update)

    def handle_eval(self, task: EvalTask) -> EvalReport:
        raise AssertionError("not used")


class SilentTransport(InProcessTransport):
    """In process, but a child marked silent does not answer (as if it had died)."""

    def train(self, tasks):  # type: ignore[no-untyped-def]
        for task in tasks:
            child = self.handler(task.recipient)
            if not getattr(child, "silent", False):
                yield child.handle_train(task)


def _federation(
    tamper: Tamper | None = None,
    settings: dict[str, object] | None = None,
    audit: AuditLog | None = None,
) -> tuple[Aggregator, list[HonestChild]]:
    children = [HonestChild(f"root/c{i}", 0.1 * (i + 1), float(i + 1)) for i in range(5)]
    children[2].tamper = tamper
    transport = SilentTransport({"root": [c.path for c in children]})
    for child in children:
        transport.register(child)
    root = Aggregator(
        "root",
        # A float64 sum: the result is then FedAvg's float64 reference bit for bit, so a
        # refused reply that slipped into the sum would show.
        AggregatorConfig.model_validate({"sum_dtype": "float64", **(settings or {})}),
        transport=transport,
        strategy=build_strategy("fedavg", sum_dtype="float64"),
        ctx=RunContext("run-1", 0, torch.device("cpu"), audit=audit or NoAudit()),
    )
    return root, children


def _model() -> State:
    gen = torch.Generator().manual_seed(3)
    return {"w": torch.randn(6, 4, generator=gen), "b": torch.randn(4, generator=gen)}


def _aggregate_row(records: list[Record]) -> Record:
    return next(r for r in records if r["kind"] == "aggregate")


def _with(key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Tamper:
    return lambda u: replace(u, state={**u.state, key: make(u.state[key])})


def _poison(value: float) -> Tamper:
    def tamper(update: Update) -> Update:
        w = update.state["w"].clone()
        w[1, 2] = value
        return replace(update, state={**update.state, "w": w})

    return tamper


CASES: dict[str, tuple[Tamper, str]] = {
    "wrong shape": (_with("w", lambda w: torch.zeros(4, 6)), "w: shape (4, 6), expected (6, 4)"),
    "wrong dtype": (_with("w", lambda w: w.half()), "w: dtype torch.float16, expected"),
    "missing key": (lambda u: replace(u, state={"w": u.state["w"]}), "parameter names differ"),
    "extra key": (
        lambda u: replace(u, state={**u.state, "extra": torch.ones(2)}),
        "names the model does not have",
    ),
    "NaN": (_poison(float("nan")), "w: NaN or infinite values"),
    "+Inf": (_poison(float("inf")), "w: NaN or infinite values"),
    "-Inf": (_poison(float("-inf")), "w: NaN or infinite values"),
    "finite 1e30": (_poison(1e30), "w: a change too large to measure"),
    "norm 1e6 x": (lambda u: replace(u, state=_shift(u.state, 1e6)), "moves the model by"),
    "wrong round": (lambda u: replace(u, round=u.round + 1), "reply to another round or task"),
    "wrong run (nonce)": (lambda u: replace(u, nonce="0" * 16), "reply to another round or task"),
    "negative weight": (lambda u: replace(u, weight=-1.0), "weight -1 is outside [1, inf]"),
    "tiny weight": (lambda u: replace(u, weight=1e-300), "weight 1e-300 is outside [1, inf]"),
    "NaN weight": (lambda u: replace(u, weight=float("nan")), "weight nan is outside [1, inf]"),
    "impersonation": (lambda u: replace(u, sender="root/c0"), "duplicate reply"),
}


def _assert_fedavg_of_the_honest(
    state: dict[str, torch.Tensor], model: dict[str, torch.Tensor], children: list[HonestChild]
) -> list[HonestChild]:
    """The round's model is FedAvg over the untampered children; returns them."""
    valid = [c for c in children if c.tamper is None]
    expected = fedavg([_shift(model, c.shift) for c in valid], [c.weight for c in valid])
    for key, value in expected.items():
        assert torch.equal(state[key], value.float()), key
    return valid


@pytest.mark.parametrize("recorded", [True, False], ids=["audited", "unaudited"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_malformed_reply_is_refused_and_the_round_goes_on(
    case: str, recorded: bool, tmp_path: Path
) -> None:
    """Unaudited, the check takes its shortcut (the reply's own norm); the verdicts are the
    same."""
    tamper, reason = CASES[case]
    audit = AuditLog.open(tmp_path / "audit.sqlite", "run-1") if recorded else None
    root, children = _federation(tamper, audit=audit)
    model = _model()
    outcome = root.run_round(model, 1)
    valid = _assert_fedavg_of_the_honest(outcome.state, model, children)
    rejected = [r for r in outcome.records if r["kind"] == "rejected"]
    assert len(rejected) == 1 and reason in rejected[0]["reason"], rejected
    aggregate = _aggregate_row(outcome.records)
    assert aggregate["status"] == "ok" and len(aggregate["participants"]) == 4
    if not recorded:
        return
    # The audit log holds the same story: four accepted digests, one refusal and its reason.
    entries = _audit_entries(tmp_path / "audit.sqlite")
    refused = [f for event, f in entries if event == "update_rejected"]
    assert len(refused) == 1 and reason in refused[0]["reason"]
    accepted = {f["sender"]: f["digest"] for event, f in entries if event == "update_accepted"}
    assert accepted == {c.path: state_digest(_shift(model, c.shift)) for c in valid}
    (round_entry,) = [f for event, f in entries if event == "round"]
    assert round_entry["result_digest"] == state_digest(outcome.state)
    assert verify(tmp_path / "audit.sqlite").ok


def test_a_reply_of_weight_zero_abstains_it_is_neither_folded_nor_counted() -> None:
    """An inner aggregator whose own round had no valid replies answers with weight 0: its
    model is not folded in, it does not count toward min_replies, and a dropped row says why
    (its own rows, if any, are kept)."""
    root, children = _federation(lambda u: replace(u, weight=0.0))
    model = _model()
    outcome = root.run_round(model, 1)
    _assert_fedavg_of_the_honest(outcome.state, model, children)
    dropped = [r for r in outcome.records if r["kind"] == "dropped"]
    assert len(dropped) == 1 and "trained nothing" in dropped[0]["reason"]
    assert not [r for r in outcome.records if r["kind"] == "rejected"]
    assert len(_aggregate_row(outcome.records)["participants"]) == 4


@pytest.mark.parametrize("factor", [-999.0, 0.5, 998.0, 999.5, 1000.5, 1001.0, 1e4])
@pytest.mark.parametrize("scale", [1.0, 250.0])
def test_the_unmeasured_check_decides_as_the_measured_one(factor: float, scale: float) -> None:
    """reply = sent + factor * sent (times `scale`, as a forwarded sum), so its change is
    |factor| times the model's norm against max_change 1000. Near the bound the reply's own
    norm cannot settle it, and the check measures the change after all."""
    from worldlm.errors import UpdateRejected
    from worldlm.federation.reply_check import check_reply

    sent = _model()
    task = TrainTask("run-1", 1, 1, "root", "root/c0", "n" * 16, sent)
    reply = {k: (v + factor * v).double() * scale for k, v in sent.items()}
    update = Update("root/c0", 1, "n" * 16, reply, 1.0, scale=scale)
    verdicts = []
    for measure in (True, False):
        try:
            verdicts.append(
                check_reply(update, {"root/c0": task}, set(), None, 1000.0, measure=measure)
            )
        except UpdateRejected as exc:
            verdicts.append(exc.reason.split(" by ")[0])
    measured, unmeasured = verdicts
    if abs(factor) > 1000:
        assert measured == unmeasured == "the update moves the model"
        return
    assert isinstance(measured, float)
    assert measured == pytest.approx(abs(factor) * _norm(sent), rel=1e-5)
    # Far from the bound the reply's norm settles it: nothing measured.
    assert unmeasured is None if abs(factor) < 998 else unmeasured == measured


def _norm(state: State) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in state.values())))


def _audit_entries(path: Path) -> list[tuple[str, dict[str, Any]]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT event, fields FROM entries ORDER BY seq").fetchall()
    return [(event, json.loads(fields)) for event, fields in rows]


def test_teeth_without_validation_the_poisoned_reply_would_wreck_the_model() -> None:
    root, children = _federation(_poison(float("nan")))
    model = _model()
    states = [_shift(model, c.shift) for c in children]
    states[2] = _poison(float("nan"))(Update("x", 0, "", states[2], 1.0)).state
    plain = fedavg(states, [c.weight for c in children])
    assert not bool(torch.isfinite(plain["w"]).all())  # plain FedAvg takes the poison in
    assert bool(torch.isfinite(root.run_round(model, 1).state["w"]).all())


def test_too_few_valid_replies_leave_the_model_unchanged() -> None:
    root, children = _federation(settings={"min_replies": 3})
    for child in children[:3]:
        child.silent = True
    model = _model()
    outcome = root.run_round(model, 1)
    assert all(torch.equal(outcome.state[k], model[k]) for k in model)
    assert outcome.weight == 0.0
    aggregate = _aggregate_row(outcome.records)
    assert aggregate["status"] == "too_few_replies"
    assert aggregate["missing"] == ["root/c0", "root/c1", "root/c2"]
    # with enough of them back, the next round aggregates again
    for child in children[:3]:
        child.silent = False
    assert _aggregate_row(root.run_round(model, 2).records)["status"] == "ok"


def test_chronic_stragglers_are_benched_then_tried_again() -> None:
    settings = {"sample": {"straggler_misses": 2, "straggler_cooldown": 3}}
    root, children = _federation(settings=settings)
    children[4].silent = True
    model = _model()
    selected = []
    for r in range(7):
        outcome = root.run_round(model, r)
        selected.append(_aggregate_row(outcome.records)["selected"])
    straggler = "root/c4"
    # missed rounds 0 and 1, sat out 2-4, tried again in 5 and 6 (missing both, benched again)
    assert [straggler in s for s in selected] == [True, True, False, False, False, True, True]
    snapshot_meta = root.snapshot()[1]
    assert snapshot_meta["benched_until"] == {straggler: 10}


def test_reported_unavailable_or_small_children_are_not_selected() -> None:
    from worldlm.config import SampleConfig

    reported = {
        "a": {"available": True, "memory_gb": 64},
        "b": {"available": False, "memory_gb": 64},
        "c": {"available": True, "memory_gb": 2},
        "d": {},  # reported nothing: eligible
    }
    cfg = SampleConfig.model_validate({"min_memory_gb": 8})
    assert eligible(reported, cfg, {}, 0) == ["a", "d"]
    lenient = SampleConfig.model_validate({"skip_unavailable": False})
    assert eligible(reported, lenient, {"d": 3}, 2) == ["a", "b", "c"]
    assert eligible(reported, lenient, {"d": 3}, 3) == ["a", "b", "c", "d"]
