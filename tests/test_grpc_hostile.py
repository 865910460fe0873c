"""TESTPLAN D16, E19 and E20 over real gRPC links with mutual TLS: a hostile child that
duplicates, replays, forges and poisons its replies, each in a live round of a real aggregator.
Every such message is refused with its reason in the round's records, and each round's result
is FedAvg over the replies that were valid."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from worldlm.config import AggregatorConfig
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
from worldlm.federation.context import RunContext
from worldlm.security.certs import create_ca, issue_node_cert
from worldlm.strategies.catalog import build_strategy
from worldlm.strategies.fedavg import fedavg
from worldlm.transport.codec import decode_message, encode_message
from worldlm.transport.grpc import ChildLink, LinkError, ParentLinkServer, TlsFiles
from worldlm.transport.grpc.child import TaskRefused, answer_parent, check_task
from worldlm.transport.grpc.transport import GrpcTransport, RoundPolicy

ROOT = "world"
HONEST = {"world/a": 0.25, "world/b": -0.5}  # child -> the shift it adds to the model
ROGUE = "world/c"
ROGUE_SHIFT = 1.0


def _shift(state: State, by: float) -> State:
    return {k: v + by for k, v in state.items()}


class HonestChild:
    def __init__(self, path: str, shift: float) -> None:
        self.path, self.shift = path, shift

    def info(self) -> ChildInfo:
        return ChildInfo(self.path, 100)

    def handle_train(self, task: TrainTask) -> Update:
        return Update(self.path, task.round, task.nonce, _shift(task.state, self.shift), 1.0)

    def handle_eval(self, task: EvalTask) -> EvalReport:
        return EvalReport(self.path, task.nonce, {})


def rogue_loop(link: ChildLink, stop: threading.Event) -> None:
    """Round by round: 0 answers twice; 1 first replays round 0's reply; 2 first sends a reply
    under another child's name; 3 answers with NaN weights; 4 sends bytes that are no update."""
    captured: tuple[str, bytes] | None = None
    while not stop.is_set():
        try:
            kind, payload = link.receive(timeout=0.2)
        except LinkError:  # nothing yet: poll until the test ends
            continue
        task = decode_message(kind, payload, verify_body=False)  # the link checked it
        assert isinstance(task, TrainTask)
        honest = encode_message(
            Update(ROGUE, task.round, task.nonce, _shift(task.state, ROGUE_SHIFT), 1.0)
        )
        if task.round == 0:
            captured = honest
            link.send(*honest)
            link.send(*honest)  # the same reply again: it must count once
        elif task.round == 1:
            assert captured is not None
            link.send(*captured)  # replayed into the next round
            link.send(*honest)
        elif task.round == 2:
            forged = Update("world/a", task.round, task.nonce, task.state, 1.0)
            link.send(*encode_message(forged))  # another child's name on its own link
            link.send(*honest)
        elif task.round == 3:
            w = _shift(task.state, ROGUE_SHIFT)
            w["w"][0, 0] = float("nan")
            link.send(*encode_message(Update(ROGUE, task.round, task.nonce, w, 1.0)))
        else:
            link.send("update", b"\x00not an update at all")


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Aggregator]:
    pki = tmp_path / "pki"
    create_ca(pki)
    for path in (ROOT, *HONEST, ROGUE):
        issue_node_cert(pki, path, pki)
    server = ParentLinkServer(
        "127.0.0.1:0", ROOT, [*HONEST, ROGUE], TlsFiles.for_node(pki, pki, ROOT)
    )
    links: list[ChildLink] = []
    stop = threading.Event()
    try:
        for path, shift in HONEST.items():
            link = ChildLink(server.address, path, TlsFiles.for_node(pki, pki, path))
            link.connect_with_backoff(30)
            links.append(link)
            handler = HonestChild(path, shift)
            threading.Thread(target=answer_parent, args=(link, handler), daemon=True).start()
        rogue = ChildLink(server.address, ROGUE, TlsFiles.for_node(pki, pki, ROGUE))
        rogue.connect_with_backoff(30)
        links.append(rogue)
        threading.Thread(target=rogue_loop, args=(rogue, stop), daemon=True).start()
        server.wait_for_children(timeout=30)
        transport = GrpcTransport(server, RoundPolicy(round_timeout=60))
        yield Aggregator(  # a float64 sum: bit for bit the reference, so any slip shows
            ROOT,
            AggregatorConfig.model_validate({"sum_dtype": "float64"}),
            transport=transport,
            strategy=build_strategy("fedavg", sum_dtype="float64"),
            ctx=RunContext("run", 0, torch.device("cpu")),
        )
    finally:
        stop.set()
        for link in links:
            link.close()
        server.stop(0.5)


def _problems(records: list[Record]) -> list[tuple[str, str, str]]:
    return [
        (r["kind"], r["sender"], r["reason"])
        for r in records
        if r["kind"] in ("rejected", "refused", "dropped")
    ]


def test_duplicates_replays_forgeries_and_poison_are_refused_round_after_round(
    federation: Aggregator,
) -> None:
    gen = torch.Generator().manual_seed(0)
    model: State = {"w": torch.randn(8, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    shifts = {**HONEST, ROGUE: ROGUE_SHIFT}
    valid_children = [
        [*HONEST, ROGUE],
        [*HONEST, ROGUE],
        [*HONEST, ROGUE],
        list(HONEST),
        list(HONEST),
    ]
    problems = []
    for r, valid in enumerate(valid_children):
        outcome = federation.run_round(model, r + 1)
        expected = fedavg([_shift(model, shifts[c]) for c in valid], [1.0] * len(valid))
        assert all(torch.equal(outcome.state[k], expected[k].float()) for k in model), r
        problems.append(_problems(outcome.records))
        model = outcome.state
    # round 0: nothing refused yet (the duplicate waits on the link)
    assert problems[0] == []
    # round 1: the duplicate of round 0, then the replay of round 0, are refused
    assert [(kind, who) for kind, who, _ in problems[1]] == [("refused", ROGUE)] * 2
    assert all("answers another task" in reason for *_, reason in problems[1])
    # round 2: a reply under another child's name, on the rogue's own link
    assert problems[2] == [
        (
            "refused",
            ROGUE,
            "refused its update: it claims to come from 'world/a', "
            "but the link belongs to 'world/c'",
        )
    ]
    # round 3: NaN values; round 4: bytes that do not decode. The others still count.
    assert problems[3] == [("rejected", ROGUE, "w: NaN or infinite values")]
    assert [(kind, who) for kind, who, _ in problems[4]] == [("dropped", ROGUE)]
    assert "WireError" in problems[4][0][2]


def test_a_child_refuses_tasks_for_another_child_or_run() -> None:
    task = TrainTask("run", 0, 1, ROOT, "world/a", "n", {})
    assert check_task(task, "world/a", "run") is task
    with pytest.raises(TaskRefused, match="a task addressed to 'world/a'"):
        check_task(task, "world/b", "run")
    with pytest.raises(TaskRefused, match="a task of run 'run', not 'other'"):
        check_task(replace(task), "world/a", "other")
    with pytest.raises(TaskRefused, match="not a task"):
        check_task(Update("world/a", 0, "n", {}, 1.0), "world/a", "run")


def test_children_report_availability_on_attaching_and_unavailable_ones_sit_out(
    tmp_path: Path,
) -> None:
    pki = tmp_path / "pki"
    create_ca(pki)
    for path in (ROOT, *HONEST):
        issue_node_cert(pki, path, pki)
    server = ParentLinkServer("127.0.0.1:0", ROOT, list(HONEST), TlsFiles.for_node(pki, pki, ROOT))
    links = []
    try:
        for (path, shift), available in zip(HONEST.items(), (True, False), strict=True):
            link = ChildLink(
                server.address,
                path,
                TlsFiles.for_node(pki, pki, path),
                resources={"available": available, "memory_gb": 16.0},
            )
            link.connect_with_backoff(30)
            links.append(link)
            handler = HonestChild(path, shift)
            threading.Thread(target=answer_parent, args=(link, handler), daemon=True).start()
        server.wait_for_children(timeout=30)
        transport = GrpcTransport(server, RoundPolicy(round_timeout=60))
        reported = {c.path: dict(c.resources) for c in transport.children(ROOT)}
        assert reported["world/b"] == {"available": False, "memory_gb": 16.0}
        root = Aggregator(
            ROOT,
            AggregatorConfig.model_validate({}),
            transport=transport,
            strategy=build_strategy("fedavg"),
            ctx=RunContext("run", 0, torch.device("cpu")),
        )
        outcome = root.run_round({"w": torch.zeros(2)}, 1)
        row = next(r for r in outcome.records if r["kind"] == "aggregate")
        assert row["selected"] == ["world/a"] and row["participants"] == ["world/a"]
        assert torch.equal(outcome.state["w"], torch.full((2,), HONEST["world/a"]))
    finally:
        for link in links:
            link.close()
        server.stop(0.5)
