"""FedBuff (strategies.fedbuff, federation.buffered_round): buffered asynchronous steps on a
simulated clock, against synchronous FedAvg, hand-computed steps, a straggler, the settings it
refuses, a resume, and a malformed reply."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from worldlm.config import AggregatorConfig, SpeedConfig
from worldlm.core.inprocess import InProcessTransport
from worldlm.core.messages import EvalReport, EvalTask, Record, State, TrainTask, Update
from worldlm.core.transport import ChildInfo
from worldlm.errors import ConfigError
from worldlm.federation.aggregator import Aggregator
from worldlm.federation.context import RunContext
from worldlm.federation.sim_clock import training_seconds
from worldlm.metrics.jsonl import read_metrics
from worldlm.progress import QuietProgress
from worldlm.runner import resume, run
from worldlm.session import open_session
from worldlm.strategies.catalog import build_strategy
from worldlm.strategies.fedbuff import (
    buffered_fold,
    check_fedbuff_deployable,
    staleness_weight,
)

from .conftest import TWO_LEVEL, tiny_config
from .test_engine import StopAtRound

FLAT = {"world/a": "med", "world/b": "law", "world/c": "code", "world/d": "med"}


class ShiftChild:
    """A child whose reply is the model it was sent plus a change fixed by (child, its
    session), with a fixed weight: what it sent back is known exactly."""

    def __init__(self, path: str, index: int, weight: float, *, bad_session: int = -1) -> None:
        self.path, self.index, self.weight = path, index, weight
        self.sessions = 0
        self.bad_session = bad_session  # this session replies with a malformed shape
        self.sent: list[State] = []

    def change(self, session: int) -> State:
        gen = torch.Generator().manual_seed(1000 * self.index + session)
        return {"w": torch.randn(6, 4, generator=gen), "b": torch.randn(4, generator=gen)}

    def info(self) -> ChildInfo:
        return ChildInfo(self.path, 100)

    def handle_train(self, task: TrainTask) -> Update:
        session, self.sessions = self.sessions, self.sessions + 1
        self.sent.append(task.state)
        if session == self.bad_session:
            state = {"w": torch.zeros(5, 4), "b": torch.zeros(4)}
        else:
            state = {k: v + self.change(session)[k] for k, v in task.state.items()}
        return Update(self.path, task.round, task.nonce, state, self.weight)

    def handle_eval(self, task: EvalTask) -> EvalReport:
        raise AssertionError("not used")


class ListAudit:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def append(self, event: str, *, node: str, round: int, **fields: Any) -> None:
        self.events.append((event, {"node": node, "round": round, **fields}))


def _children(n: int, **bad: int) -> dict[str, ShiftChild]:
    paths = [f"root/{chr(ord('a') + i)}" for i in range(n)]
    return {
        p: ShiftChild(p, i, float(10 * (i + 1)), bad_session=bad.get(p[-1], -1))
        for i, p in enumerate(paths)
    }


def _root(
    children: dict[str, ShiftChild],
    settings: dict[str, Any],
    slowdowns: dict[str, float] | None = None,
    audit: ListAudit | None = None,
) -> Aggregator:
    transport = InProcessTransport({"root": list(children)})
    for child in children.values():
        transport.register(child)
    config = AggregatorConfig.model_validate(settings)
    ctx = RunContext("r", 7, torch.device("cpu"))
    if audit is not None:
        ctx = RunContext("r", 7, torch.device("cpu"), audit=audit)
    return Aggregator(
        "root",
        config,
        transport=transport,
        strategy=build_strategy(config.strategy, sum_dtype=config.sum_dtype),
        ctx=ctx,
        child_slowdowns=slowdowns,
    )


def _start() -> State:
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(6, 4, generator=gen), "b": torch.randn(4, generator=gen)}


def _aggregate(records: list[Record]) -> Record:
    (row,) = [r for r in records if r["kind"] == "aggregate"]
    return row


CONSTANT = {"distribution": "constant", "mean": 1.0}


def test_a_buffer_of_the_whole_cohort_is_synchronous_fedavg() -> None:
    """K = concurrency = every child, equal durations: every update is fresh (staleness 0),
    so each step is FedAvg's round. Both sum in float64 and round once to float32; FedBuff adds
    the mean change to the model, FedAvg takes the mean of the models, two float64 results
    within about 1e-16 of each other and of the exact value. They round to the same float32
    unless that value lies within 1e-16 of a float32 rounding boundary, which none of these
    seeded values does: torch.equal (a wrong weight or staleness factor moves them by 1e-2)."""
    fedbuff = _root(
        _children(4),
        {"strategy": "fedbuff", "sum_dtype": "float64", "fedbuff": {"speed": CONSTANT}},
    )
    fedavg = _root(_children(4), {"strategy": "fedavg", "sum_dtype": "float64"})
    ours = theirs = _start()
    for r in range(3):
        outcome = fedbuff.run_round(ours, r)
        expected = fedavg.run_round(theirs, r)
        row = _aggregate(outcome.records)
        assert row["status"] == "ok" and row["version"] == r + 1 and row["clock"] == r + 1.0
        assert [f["staleness"] for f in row["folded"]] == [0, 0, 0, 0]
        assert row["participants"] == ["root/a", "root/b", "root/c", "root/d"]
        assert outcome.weight == expected.weight == 100.0
        for key in ours:
            assert torch.equal(outcome.state[key], expected.state[key]), key
        ours, theirs = outcome.state, expected.state
    assert (ours["w"] - _start()["w"]).abs().max() > 0.1  # the model really moved


def _root_models(config: Any, run_dir: Path, rounds: int) -> tuple[list[State], list[Record]]:
    """The root's model after each of `rounds` rounds through real leaves, and its rows."""
    session = open_session(config, QuietProgress(), run_dir)
    state, models, rows = session.fed.root.state, [], []
    for r in range(1, rounds + 1):
        outcome = session.fed.root.run_round(state, r)
        state = outcome.state
        models.append(state)
        rows.append(_aggregate(outcome.records))
    return models, rows


def test_through_real_leaves_a_whole_cohort_buffer_is_fedavg(tmp_path: Path) -> None:
    """The same equality with leaves that train, and a straggler: with K = every child, each
    step waits for all of them, every update is fresh, and d's slowdown only moves the clock."""
    common = ["train.local_steps=2", "nodes.world.sum_dtype=float64"]
    fedbuff = [
        "nodes.world.strategy=fedbuff",
        "nodes.world.fedbuff.buffer=4",
        "nodes.world.fedbuff.speed.distribution=constant",
        "nodes.world/d.slowdown=100.0",
    ]
    ours, rows = _root_models(tiny_config(tmp_path, FLAT, [*common, *fedbuff]), tmp_path / "b", 2)
    theirs, _ = _root_models(tiny_config(tmp_path, FLAT, common), tmp_path / "s", 2)
    assert [row["clock"] for row in rows] == [100.0, 200.0]  # d's slowdown, from its config
    assert all(f["staleness"] == 0 for row in rows for f in row["folded"])
    for mine, expected in zip(ours, theirs, strict=True):
        for key in expected:
            assert torch.equal(mine[key], expected[key]), key


def test_an_inner_fedbuff_aggregator_answers_its_synchronous_parent(tmp_path: Path) -> None:
    overrides = [
        "stop.rounds=3",
        "train.local_steps=2",
        "nodes.world/med.strategy=fedbuff",
        "nodes.world/med.fedbuff.buffer=1",
        "nodes.world/med/b.slowdown=2.5",
        "nodes.world/med.fedbuff.speed.distribution=constant",
    ]
    result = run(tiny_config(tmp_path, TWO_LEVEL, overrides, n_docs=30), QuietProgress())
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert not [r for r in rows if r["kind"] in ("rejected", "refused")]
    med = [r for r in rows if r["kind"] == "aggregate" and r["node"] == "world/med"]
    root = [r for r in rows if r["kind"] == "aggregate" and r["node"] == "world"]
    assert [r["status"] for r in med] == ["ok"] * 3
    assert [r["participants"] for r in root] == [["world/med", "world/soft"]] * 3
    # a (1 s) is folded at t = 1, 2; b (2.5 s, sent the first model) at t = 2.5, 2 steps stale
    assert [(r["clock"], [(f["sender"], f["staleness"]) for f in r["folded"]]) for r in med] == [
        (1.0, [("world/med/a", 0)]),
        (2.0, [("world/med/a", 0)]),
        (2.5, [("world/med/b", 2)]),
    ]


def test_the_fold_against_hand_computed_numbers() -> None:
    assert staleness_weight(0, "sqrt") == 1.0
    assert staleness_weight(3, "sqrt") == 0.5
    assert staleness_weight(3, "none") == 1.0
    assert staleness_weight(3, "poly", 1.0) == 0.25
    assert staleness_weight(8, "poly", 0.5) == staleness_weight(8, "sqrt") == 1 / 3
    model = {"w": torch.tensor([1.0, 2.0]), "kept": torch.tensor([7.0])}
    changes = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}]
    # weights 1 and 3 (total 4), staleness 0 and 3 under sqrt (factors 1 and 1/2), lr 2:
    # w += 2 * (1 * 1 * [1, 0] + 3 * 0.5 * [0, 4]) / 4 = [0.5, 3]
    out = buffered_fold(model, changes, [1.0, 3.0], [1.0, 0.5], 2.0)
    assert torch.equal(out["w"], torch.tensor([1.5, 5.0]))
    assert torch.equal(out["kept"], torch.tensor([7.0]))  # what no change carries stays
    assert out["w"].dtype == torch.float32


@pytest.mark.parametrize(
    ("rule", "factor"), [("sqrt", 1 / math.sqrt(3)), ("none", 1.0), ("poly", 1 / 3)]
)
def test_a_stale_update_is_weighted_as_configured(rule: str, factor: float) -> None:
    """a, b take 1 s, c 2.5 s; K = 2. Steps: {a, b} at t=1, {a, b} at t=2, then c (sent the
    first model, 2 steps stale) with a's third update at t=3."""
    kids = _children(3)
    settings = {
        "strategy": "fedbuff",
        "fedbuff": {"buffer": 2, "staleness": rule, "exponent": 1.0, "speed": CONSTANT},
    }
    root = _root(kids, settings, slowdowns={"root/c": 2.5})
    state = _start()
    for r in range(2):
        state = root.run_round(state, r).state
    before = state
    outcome = root.run_round(state, 2)
    row = _aggregate(outcome.records)
    assert row["clock"] == 3.0 and row["participants"] == ["root/a", "root/c"]
    assert [(f["sender"], f["staleness"]) for f in row["folded"]] == [
        ("root/c", 2),
        ("root/a", 0),
    ]
    assert row["folded"][0]["factor"] == pytest.approx(factor, rel=1e-15)
    # c's change is its reply minus the very first model; a's, its third reply minus `before`.
    a, c = kids["root/a"], kids["root/c"]
    assert torch.equal(c.sent[0]["w"], _start()["w"]) and len(c.sent) == 1
    for key in before:
        delta_c = (c.sent[0][key] + c.change(0)[key]).double() - c.sent[0][key].double()
        delta_a = (a.sent[2][key] + a.change(2)[key]).double() - a.sent[2][key].double()
        step = (30.0 * factor * delta_c + 10.0 * delta_a) / 40.0
        expected = (before[key].double() + step).float()
        torch.testing.assert_close(outcome.state[key], expected, rtol=1e-6, atol=1e-6)
    assert outcome.weight == 40.0


def _straggler_run(max_staleness: int | None, rounds: int) -> tuple[list[Record], ListAudit]:
    audit = ListAudit()
    settings: dict[str, Any] = {
        "strategy": "fedbuff",
        "fedbuff": {"buffer": 2, "max_staleness": max_staleness, "speed": CONSTANT},
    }
    root = _root(_children(4), settings, slowdowns={"root/d": 100.0}, audit=audit)
    state, rows = _start(), []
    for r in range(rounds):
        outcome = root.run_round(state, r)
        state = outcome.state
        rows.append(_aggregate(outcome.records))
    return rows, audit


def test_a_straggler_no_longer_holds_the_round() -> None:
    rows, _ = _straggler_run(None, 220)
    # Synchronous rounds would each wait 100 s for d. Here a step folds the update left over
    # from the last one (a, b, c arrive together at first) and one sent at the last step.
    assert all(row["status"] == "ok" for row in rows)
    assert [row["clock"] for row in rows[:6]] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert rows[49]["clock"] == 50.0  # 50 steps where synchronous rounds would take 5000 s
    late = [(i, f) for i, row in enumerate(rows) for f in row["folded"] if f["sender"] == "root/d"]
    assert late, "the straggler's update never arrived"
    step, folded = late[0]
    assert rows[step]["clock"] == 100.0
    assert folded["staleness"] == step  # sent the first model; `step` steps were taken since
    assert folded["factor"] == pytest.approx(1 / math.sqrt(1 + step), rel=1e-15)


def test_an_update_past_max_staleness_is_dropped_and_recorded() -> None:
    rows, audit = _straggler_run(5, 220)
    dropped = [(i, d) for i, row in enumerate(rows) for d in row["dropped_stale"]]
    assert dropped and dropped[0][1]["sender"] == "root/d"
    step, entry = dropped[0]
    assert entry["staleness"] == step > 5 and entry["arrived"] == 100.0
    assert all(f["staleness"] <= 5 for row in rows for f in row["folded"])
    events = [e for name, e in audit.events if name == "update_dropped_stale"]
    assert events[0]["sender"] == "root/d" and events[0]["staleness"] == step
    assert events[0]["max_staleness"] == 5


def test_a_malformed_reply_is_refused_and_the_round_goes_on() -> None:
    audit = ListAudit()
    kids = _children(3, b=0)  # b's first reply has a wrong shape
    settings = {"strategy": "fedbuff", "fedbuff": {"buffer": 2, "speed": CONSTANT}}
    root = _root(kids, settings, audit=audit)
    outcome = root.run_round(_start(), 0)
    rejected = [r for r in outcome.records if r["kind"] == "rejected"]
    assert [(r["sender"], r["reason"]) for r in rejected] == [
        ("root/b", "w: shape (5, 4), expected (6, 4)")
    ]
    assert (
        audit.events[1][0],
        {k: audit.events[1][1][k] for k in ("node", "round", "sender")},
    ) == ("update_rejected", {"node": "root", "round": 0, "sender": "root/b"})
    row = _aggregate(outcome.records)
    assert row["status"] == "ok" and row["participants"] == ["root/a", "root/c"]
    assert row["missing"] == ["root/b"]
    # b is sent work again next step, and its valid reply is folded like any other.
    second = _aggregate(root.run_round(outcome.state, 1).records)
    assert second["status"] == "ok" and second["participants"] == ["root/a", "root/b"]


def test_durations_are_reproducible_and_have_the_configured_mean() -> None:
    speed = SpeedConfig(distribution="lognormal", mean=2.0, sigma=0.5)
    draws = [training_seconds(speed, 7, "world/a", i) for i in range(4000)]
    assert draws == [training_seconds(speed, 7, "world/a", i) for i in range(4000)]
    assert draws != [training_seconds(speed, 8, "world/a", i) for i in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(2.0, rel=0.03)
    assert training_seconds(speed, 7, "world/a", 3, 10.0) == 10.0 * draws[3]
    assert training_seconds(SpeedConfig(distribution="constant", mean=2.0), 7, "x", 5) == 2.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["nodes.world/med.secure_aggregation.enabled=true"],
            "secure_aggregation: refused with strategy 'fedbuff': secure aggregation's "
            "pairwise masks cancel only",
        ),
        (["nodes.world/med.dp.enabled=true"], "dp: central DP is refused with strategy"),
        (["run.method=worldlm"], "'fedbuff' is refused under run.method = 'worldlm'"),
        (["nodes.world/med.fedbuff.buffer=3"], r"buffer: K = 3 is above the children"),
        (["nodes.world/med.fedbuff.concurrency=3"], r"concurrency: 3 is above the number"),
        (["nodes.world/med.server_optimizer.name=fedadam"], "takes its step with fedbuff"),
        (["nodes.world/med.sample.fraction=0.5"], "set concurrency instead"),
    ],
)
def test_what_fedbuff_refuses_is_a_config_error(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, TWO_LEVEL, ["nodes.world/med.strategy=fedbuff", *overrides])


def test_fedbuff_settings_without_fedbuff_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="apply only with strategy = 'fedbuff'"):
        tiny_config(tmp_path, TWO_LEVEL, ["nodes.world/med.fedbuff.buffer=2"])


def test_simulated_fedbuff_is_refused_in_a_deployment(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL, ["nodes.world/med.strategy=fedbuff"])
    with pytest.raises(ConfigError, match="a deployed federation has real clocks"):
        check_fedbuff_deployable(config.nodes)  # what `worldlm serve` and `join` check first


def _fedbuff_run_config(tmp_path: Path) -> Any:
    overrides = [
        "stop.rounds=4",
        "train.local_steps=2",
        "eval.every=4",
        "nodes.world.strategy=fedbuff",
        "nodes.world.fedbuff.buffer=2",
        "nodes.world/d.slowdown=3.0",
    ]
    return tiny_config(tmp_path, FLAT, overrides, n_docs=30)


def test_a_resumed_fedbuff_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    config = _fedbuff_run_config(tmp_path)
    whole = run(config, QuietProgress(), out=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(config, StopAtRound(3), out=tmp_path / "cut")
    resumed = resume(tmp_path / "cut", QuietProgress())
    assert resumed.rounds == 4
    final = "checkpoints/round-000004.wlm"
    assert (tmp_path / "cut" / final).read_bytes() == (tmp_path / "whole" / final).read_bytes()

    def steps(run_dir: Path) -> list[tuple[Any, ...]]:
        rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "aggregate"]
        return [(r["round"], r["clock"], r["folded"], r["in_flight"]) for r in rows]

    ran = steps(whole.run_dir)
    assert steps(resumed.run_dir) == ran
    # The checkpoint of round 2 held work in flight (d, three times slower, never folded yet).
    assert ran[1][3] > 0 and all(f["sender"] != "world/d" for _, _, fs, _ in ran[:2] for f in fs)


class _AlwaysMalformed(ShiftChild):
    """A child every reply of which has a wrong shape (hostile, or broken for good)."""

    def handle_train(self, task: TrainTask) -> Update:
        self.bad_session = self.sessions
        return super().handle_train(task)


@pytest.mark.parametrize("min_replies", [1, 4])
def test_a_child_refused_every_time_does_not_hold_the_steps(min_replies: int) -> None:
    """K is the whole cohort of 4 and d is refused in every round: once nothing is left in
    flight, the step folds the 3 updates it has (at least min_replies), as a synchronous round
    goes on without a refused reply. (min_replies = 4 is the teeth: then no step is taken, the
    buffer waiting for d forever.)"""
    kids = _children(3)
    kids["root/d"] = _AlwaysMalformed("root/d", 3, 40.0)
    settings = {
        "strategy": "fedbuff",
        "fedbuff": {"buffer": 4, "speed": CONSTANT},
        "min_replies": min_replies,
    }
    root = _root(kids, settings)
    state = _start()
    rows = []
    for r in range(3):
        outcome = root.run_round(state, r)
        state = outcome.state
        rows.append(_aggregate(outcome.records))
    if min_replies == 1:
        assert [row["status"] for row in rows] == ["ok"] * 3
        assert all(row["participants"] == ["root/a", "root/b", "root/c"] for row in rows)
        assert all(row["missing"] == ["root/d"] for row in rows)
    else:
        assert [row["status"] for row in rows] == ["too_few_replies"] * 3
        assert torch.equal(state["w"], _start()["w"])
