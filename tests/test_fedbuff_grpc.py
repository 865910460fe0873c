"""FedBuff on real clocks over gRPC with mutual TLS (federation.real_arrivals, GrpcTransport's
dispatch/arrivals): steps go on while a straggler trains, its late update is folded with its
real staleness or dropped past max_staleness, forged and malformed replies arriving between
steps are refused with their reasons, work in flight at a resume is lost without a hang, and
`worldlm serve`/`join` accept clock = "real" and refuse "simulated"."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from worldlm.config import AggregatorConfig
from worldlm.core.inprocess import InProcessTransport
from worldlm.core.messages import Record, State, TrainTask, Update
from worldlm.errors import ConfigError
from worldlm.federation.aggregator import Aggregator
from worldlm.federation.context import RunContext
from worldlm.federation.real_arrivals import LOST_AT_RESUME
from worldlm.metrics.jsonl import read_metrics
from worldlm.progress import QuietProgress
from worldlm.root_loop import evaluate_tree, round_loop
from worldlm.security.certs import create_ca, issue_node_cert
from worldlm.session import open_session
from worldlm.strategies.catalog import build_strategy
from worldlm.strategies.fedbuff import check_fedbuff_deployable
from worldlm.transport.codec import decode_message, encode_message
from worldlm.transport.grpc import ChildLink, LinkError, ParentLinkServer, TlsFiles
from worldlm.transport.grpc.child import answer_parent
from worldlm.transport.grpc.transport import GrpcTransport, RoundPolicy

from .conftest import TWO_LEVEL, tiny_config
from .test_fedbuff import FLAT, ListAudit, ShiftChild, _aggregate, _start
from .test_grpc_transport import over_grpc

ROOT = "root"
KIDS = ["root/a", "root/b", "root/c"]
STRAGGLER = "root/c"
HELD_STEPS = 3  # server steps taken while the straggler's first task is held


class HeldChild(ShiftChild):
    """A child whose first task trains only once the test lets it (a straggler as slow as the
    test wants, with no guess at timings)."""

    def __init__(self, path: str, index: int, weight: float) -> None:
        super().__init__(path, index, weight)
        self.release = threading.Event()

    def handle_train(self, task: TrainTask) -> Update:
        if self.sessions == 0:
            assert self.release.wait(60), "the test never released the straggler"
        return super().handle_train(task)


def _fedbuff(**fedbuff: Any) -> AggregatorConfig:
    return AggregatorConfig.model_validate(
        {"strategy": "fedbuff", "fedbuff": {"clock": "real", "buffer": 2, **fedbuff}}
    )


def _aggregator(transport: Any, settings: AggregatorConfig, audit: ListAudit) -> Aggregator:
    return Aggregator(
        ROOT,
        settings,
        transport=transport,
        strategy=build_strategy(settings.strategy, sum_dtype=settings.sum_dtype),
        ctx=RunContext("run", 7, torch.device("cpu"), audit=audit),
    )


@contextmanager
def _served(tmp_path: Path, children: dict[str, ShiftChild], rogue: Any = None) -> Iterator[Any]:
    """A root's link server with mTLS and `children` answering over it (`rogue`: a function
    that answers for STRAGGLER's link itself); yields the root's GrpcTransport."""
    pki = tmp_path / "pki"
    create_ca(pki)
    for path in (ROOT, *KIDS):
        issue_node_cert(pki, path, pki)
    server = ParentLinkServer("127.0.0.1:0", ROOT, KIDS, TlsFiles.for_node(pki, pki, ROOT))
    links: list[ChildLink] = []
    stop = threading.Event()
    try:
        for path in KIDS:
            link = ChildLink(server.address, path, TlsFiles.for_node(pki, pki, path))
            link.connect_with_backoff(30)
            links.append(link)
            if rogue is not None and path == STRAGGLER:
                target, args = rogue, (link, stop)
            else:
                target, args = answer_parent, (link, children[path])
            threading.Thread(target=target, args=args, daemon=True).start()
        server.wait_for_children(timeout=30)
        yield GrpcTransport(server, RoundPolicy(round_timeout=60))
    finally:
        for child in children.values():
            if isinstance(child, HeldChild):
                child.release.set()
        stop.set()
        for link in links:
            link.close()
        server.stop(0.5)


def _kids() -> dict[str, ShiftChild]:
    kids: dict[str, ShiftChild] = {
        p: ShiftChild(p, i, float(10 * (i + 1))) for i, p in enumerate(KIDS[:2])
    }
    kids[STRAGGLER] = HeldChild(STRAGGLER, 2, 30.0)
    return kids


def _steps_with_a_held_straggler(
    root: Aggregator, straggler: HeldChild, until: Any
) -> tuple[list[Record], list[State], list[float], float]:
    """Run HELD_STEPS steps while the straggler's first task is held, release it, then run
    steps until `until(row)`; returns the rows, the model after each step (models[v] is the
    model of version v), each held step's seconds, and how long the straggler was held."""
    models, rows, seconds = [_start()], [], []
    held_from = time.perf_counter()
    for r in range(HELD_STEPS):
        began = time.perf_counter()
        outcome = root.run_round(models[-1], r)
        seconds.append(time.perf_counter() - began)
        rows.append(_aggregate(outcome.records))
        models.append(outcome.state)
    held = time.perf_counter() - held_from
    straggler.release.set()
    for r in range(HELD_STEPS, HELD_STEPS + 10):
        outcome = root.run_round(models[-1], r)
        rows.append(_aggregate(outcome.records))
        models.append(outcome.state)
        if until(rows[-1]):
            break
    return rows, models, seconds, held


def _session_sent(child: ShiftChild, model: State) -> int:
    """Which of `child`'s tasks carried `model`."""
    (session,) = [i for i, s in enumerate(child.sent) if torch.equal(s["w"], model["w"])]
    return session


def test_steps_go_on_without_a_straggler_whose_late_update_is_folded_stale(
    tmp_path: Path,
) -> None:
    kids, audit = _kids(), ListAudit()
    with _served(tmp_path, kids) as transport:
        root = _aggregator(transport, _fedbuff(), audit)

        def folds_straggler(row: Record) -> bool:
            return any(f["sender"] == STRAGGLER for f in row["folded"])

        straggler = kids[STRAGGLER]
        assert isinstance(straggler, HeldChild)
        rows, models, seconds, held = _steps_with_a_held_straggler(root, straggler, folds_straggler)
    # While the straggler trained, K = 2 of the 3 children made each step: none waited for it
    # (each step ended while it was still held: measured, the steps fit in its delay).
    for row in rows[:HELD_STEPS]:
        assert row["status"] == "ok" and row["in_flight"] == 1
        assert sorted(row["participants"]) == ["root/a", "root/b"]
    assert sum(seconds) <= held and max(seconds) < held
    assert [row["version"] for row in rows] == list(range(1, len(rows) + 1))  # a step a round
    # Its update, sent the very first model, is folded with its real staleness.
    step = next(i for i, row in enumerate(rows) if folds_straggler(row))
    row = rows[step]
    late = next(f for f in row["folded"] if f["sender"] == STRAGGLER)
    assert late["staleness"] == row["version"] - 1 >= HELD_STEPS
    assert late["factor"] == pytest.approx(1 / math.sqrt(1 + late["staleness"]), rel=1e-15)
    assert late["arrived"] > late["sent_at"]
    # The step is FedBuff's fold of exactly what the children sent back.
    before, total = models[step], sum(f["weight"] for f in row["folded"])
    step_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in before.items()}
    for f in row["folded"]:
        child = kids[f["sender"]]
        session = _session_sent(child, models[row["version"] - 1 - f["staleness"]])
        for k in step_sum:
            step_sum[k] += f["weight"] * f["factor"] * child.change(session)[k].double()
    for k in before:
        expected = (before[k].double() + step_sum[k] / total).float()
        torch.testing.assert_close(models[step + 1][k], expected, rtol=1e-5, atol=1e-5)
    assert [e for name, e in audit.events if name == "fedbuff_step"][-1]["version"] == len(rows)


def test_a_straggler_past_max_staleness_is_dropped_and_recorded(tmp_path: Path) -> None:
    kids, audit = _kids(), ListAudit()
    with _served(tmp_path, kids) as transport:
        root = _aggregator(transport, _fedbuff(max_staleness=1), audit)
        straggler = kids[STRAGGLER]
        assert isinstance(straggler, HeldChild)
        rows, *_ = _steps_with_a_held_straggler(
            root, straggler, lambda row: bool(row["dropped_stale"])
        )
        # Its child is idle again: it is sent the current model and its next update counts.
        while not _folded(rows, STRAGGLER) and len(rows) < 40:
            rows.append(_aggregate(root.run_round(root.state, len(rows)).records))
    # On a real clock a fast child's update may be overtaken too and dropped for it: only the
    # straggler's is sure to be, and only updates past the bound are.
    dropped = [d for row in rows for d in row["dropped_stale"]]
    assert dropped[0]["sender"] == STRAGGLER and dropped[0]["staleness"] >= HELD_STEPS > 1
    assert all(d["staleness"] > 1 for d in dropped)
    assert all(f["staleness"] <= 1 for row in rows for f in row["folded"])
    events = [e for name, e in audit.events if name == "update_dropped_stale"]
    assert [e["staleness"] for e in events] == [d["staleness"] for d in dropped]
    assert events[0]["sender"] == STRAGGLER and events[0]["max_staleness"] == 1
    assert events[0]["dispatched_version"] == 0
    assert _folded(rows, STRAGGLER) == 1  # its next update, from a fresh model
    assert all(row["status"] == "ok" for row in rows)


def _rogue(link: ChildLink, stop: threading.Event) -> None:
    """STRAGGLER's link, answered by hand: task 0 is first answered under another child's name
    and with another task's nonce, then honestly; task 1 with a tensor of the wrong shape; the
    later ones honestly. Each answer comes while the parent's steps go on."""
    honest = ShiftChild(STRAGGLER, 2, 30.0)
    tasks = 0
    while not stop.is_set():
        try:
            kind, payload = link.receive(timeout=0.2)
        except LinkError:
            continue
        task = decode_message(kind, payload, verify_body=False)
        assert isinstance(task, TrainTask)
        reply = honest.handle_train(task)
        if tasks == 0:
            forged = Update("root/a", task.round, task.nonce, reply.state, 10.0)
            link.send(*encode_message(forged))
            stale = Update(STRAGGLER, task.round, "0123456789abcdef", reply.state, 30.0)
            link.send(*encode_message(stale))
        elif tasks == 1:
            wrong = {"w": torch.zeros(5, 4), "b": torch.zeros(4)}
            reply = Update(STRAGGLER, task.round, task.nonce, wrong, 30.0)
        time.sleep(0.05)  # let a step or two go by before it arrives
        try:
            link.send(*encode_message(reply))
        except LinkError:
            return  # the test is over
        tasks += 1


def test_forged_and_malformed_replies_arriving_between_steps_are_refused(
    tmp_path: Path,
) -> None:
    kids, audit = _kids(), ListAudit()
    del kids[STRAGGLER]
    with _served(tmp_path, kids, rogue=_rogue) as transport:
        root = _aggregator(transport, _fedbuff(), audit)
        records: list[Record] = []
        state = _start()
        r, deadline = 0, time.monotonic() + 30
        while _folded(records, STRAGGLER) < 2 and time.monotonic() < deadline:
            outcome = root.run_round(state, r)
            state, r = outcome.state, r + 1
            records.extend(outcome.records)
    problems = [
        (row["kind"], row["reason"])
        for row in records
        if row["kind"] in ("refused", "rejected", "dropped") and row["sender"] == STRAGGLER
    ]
    assert problems == [
        (
            "refused",
            "refused its update: it claims to come from 'root/a', but the link belongs to 'root/c'",
        ),
        (
            "refused",
            "refused its update: it answers another task (a replay, or a reply to an "
            "earlier round)",
        ),
        ("rejected", "w: shape (5, 4), expected (6, 4)"),
    ]
    rows = _rows(records)
    assert all(row["status"] == "ok" for row in rows)  # the steps went on
    # Its honest first reply and its third are folded; the malformed second frees its child.
    assert _folded(records, STRAGGLER) == 2
    assert [row["missing"] for row in rows if row["missing"]] == [[STRAGGLER]]
    assert [e["sender"] for name, e in audit.events if name == "update_rejected"] == [STRAGGLER]


def _rows(records: list[Record]) -> list[Record]:
    return [r for r in records if r["kind"] == "aggregate"]


def _folded(records: list[Record], child: str) -> int:
    """How many of `child`'s updates the steps of `records` folded."""
    return sum(f["sender"] == child for row in _rows(records) for f in row["folded"])


def test_work_in_flight_at_a_resume_is_lost_and_its_late_reply_refused(tmp_path: Path) -> None:
    """An aggregator restored from a checkpoint taken while the straggler trained (as a
    journaled inner aggregator is, in a process that keeps its links): that task is forgotten,
    its late reply is refused with the reason, and nothing waits for it."""
    kids, audit = _kids(), ListAudit()
    straggler = kids[STRAGGLER]
    assert isinstance(straggler, HeldChild)
    with _served(tmp_path, kids) as transport:
        first = _aggregator(transport, _fedbuff(), audit)
        state = first.run_round(_start(), 0).state
        tensors, meta = first.snapshot()
        assert meta["runner"]["lost_in_flight"] == [STRAGGLER]
        resumed = _aggregator(transport, _fedbuff(), audit)
        resumed.restore(tensors, meta)
        row = _aggregate(resumed.run_round(state, 1).records)
        assert row["lost_in_flight"] == [STRAGGLER] and row["status"] == "ok"
        assert row["selected"] == ["root/a", "root/b", STRAGGLER]  # sent work again at once
        straggler.release.set()
        records: list[Record] = []
        for r in range(2, 12):
            outcome = resumed.run_round(resumed.state, r)
            records.extend(outcome.records)
            if any(f["sender"] == STRAGGLER for row in _rows(records) for f in row["folded"]):
                break
    refused = [r for r in records if r["kind"] == "refused"]
    assert [(r["sender"], r["reason"]) for r in refused] == [(STRAGGLER, LOST_AT_RESUME)]
    # Its answer to the task the resumed aggregator sent (version 1) is folded.
    late = [f for row in _rows(records) for f in row["folded"] if f["sender"] == STRAGGLER]
    assert len(late) == 1 and straggler.sessions == 2
    assert [e["children"] for name, e in audit.events if name == "fedbuff_lost_in_flight"] == [
        [STRAGGLER]
    ]


def test_a_deployed_federation_runs_real_clock_fedbuff_with_evaluation(tmp_path: Path) -> None:
    """Real leaves over over_grpc (signed tasks, mTLS): the root keeps them in flight across
    rounds, evaluations of children still training wait their turn on the link, and the run
    ends."""
    overrides = [
        "stop.rounds=3",
        "train.local_steps=1",
        "eval.every=1",
        "nodes.world.strategy=fedbuff",
        "nodes.world.fedbuff.clock=real",
        "nodes.world.fedbuff.buffer=2",
    ]
    config = tiny_config(tmp_path, FLAT, overrides, n_docs=20)
    check_fedbuff_deployable(config.nodes)
    session = open_session(config, QuietProgress(), tmp_path / "run")
    with over_grpc(session, tmp_path / "pki") as transports:
        before = evaluate_tree(session, session.fed.root.state, 0)
        result = round_loop(session, QuietProgress(), before, first_round=1, tokens=0.0)
        refused = [d for t in transports.values() for d in t.dropouts()]
    assert refused == []
    assert result.rounds == 3 and set(result.after) == set(before)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    steps = [r for r in rows if r["kind"] == "aggregate" and r["node"] == "world"]
    assert [(r["status"], r["version"], len(r["folded"])) for r in steps] == [
        ("ok", 1, 2),
        ("ok", 2, 2),
        ("ok", 3, 2),
    ]
    assert not [r for r in rows if r["kind"] in ("rejected", "refused", "dropped")]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["nodes.world/med.secure_aggregation.enabled=true"],
            "secure_aggregation: refused with strategy 'fedbuff'",
        ),
        (["nodes.world/med.dp.enabled=true"], "dp: central DP is refused with strategy"),
        (["run.method=worldlm"], "'fedbuff' is refused under run.method = 'worldlm'"),
        (["nodes.world/med.fedbuff.speed.mean=2.0"], "speed: describes the simulated clock"),
    ],
)
def test_real_clock_keeps_the_other_refusals(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    real = ["nodes.world/med.strategy=fedbuff", "nodes.world/med.fedbuff.clock=real"]
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, TWO_LEVEL, [*real, *overrides])


def test_serve_and_join_accept_the_real_clock_and_refuse_the_simulated_one(
    tmp_path: Path,
) -> None:
    fedbuff = ["nodes.world/med.strategy=fedbuff"]
    real = tiny_config(tmp_path, TWO_LEVEL, [*fedbuff, "nodes.world/med.fedbuff.clock=real"])
    check_fedbuff_deployable(real.nodes)  # what `worldlm serve` and `join` check first
    simulated = tiny_config(tmp_path, TWO_LEVEL, fedbuff)
    with pytest.raises(ConfigError) as refused:
        check_fedbuff_deployable(simulated.nodes)
    assert str(refused.value).startswith(
        "nodes.world/med.fedbuff.clock: 'simulated' cannot be deployed: a deployed federation "
        "has real clocks"
    )


def test_the_real_clock_is_refused_where_tasks_cannot_stay_in_flight() -> None:
    transport = InProcessTransport({ROOT: KIDS})
    for i, path in enumerate(KIDS):
        transport.register(ShiftChild(path, i, 10.0))
    root = _aggregator(transport, _fedbuff(), ListAudit())
    with pytest.raises(ConfigError, match=r"fedbuff\.clock: 'real' needs a transport that keeps"):
        root.run_round(_start(), 0)
