"""A parent holds a bounded number of its children's messages, whatever their number: the
receive gate (transport/grpc/admission.py) on its own and over real gRPC links with mutual TLS.
The reply a round waits for is never stuck behind the replies waiting for it, and children the
gate held back still count as having answered in time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from worldlm.core.messages import EvalReport, EvalTask, TrainTask, Update
from worldlm.core.transport import ChildInfo
from worldlm.security.certs import create_ca, issue_node_cert
from worldlm.transport.grpc import ChildLink, ParentLinkServer, TlsFiles
from worldlm.transport.grpc.admission import ReceiveGate
from worldlm.transport.grpc.child import answer_parent
from worldlm.transport.grpc.transport import GrpcTransport, RoundPolicy

ROOT = "world"
CHILDREN = [f"world/c{i}" for i in range(8)]


def _never_closed() -> bool:
    return False


def test_the_gate_admits_up_to_its_limit_then_waits_for_a_release() -> None:
    gate = ReceiveGate(limit=2)
    first = gate.admit("a", _never_closed)
    second = gate.admit("b", _never_closed)
    assert first is not None and second is not None and gate.held == 2
    admitted: list[str] = []
    waiter = threading.Thread(target=lambda: admitted.append(str(gate.admit("c", _never_closed))))
    waiter.start()
    time.sleep(0.3)
    assert admitted == [] and gate.delayed("c")  # waiting: the limit is reached
    first()
    first()  # a second release of the same admission changes nothing
    waiter.join(5)
    assert len(admitted) == 1 and gate.held == 2 and gate.peak_held == 2


def test_a_preferred_peer_passes_a_full_gate_and_a_closed_link_stops_waiting() -> None:
    gate = ReceiveGate(limit=1)
    assert gate.admit("a", _never_closed) is not None
    gate.prefer(["next"])
    assert gate.admit("next", _never_closed) is not None  # would wait without the preference
    assert gate.held == 2 and not gate.delayed("next")
    closed = threading.Event()
    threading.Timer(0.3, closed.set).start()
    assert gate.admit("other", closed.is_set) is None  # returns once its link is closed
    gate.prefer([], reset=True)
    assert not gate.delayed("other")  # a new exchange counts its delays afresh


class ChildAnswering:
    """Answers a task with the state it was sent, after `delay` seconds."""

    def __init__(self, path: str, delay: float = 0.0) -> None:
        self.path, self.delay = path, delay

    def info(self) -> ChildInfo:
        return ChildInfo(self.path, 100)

    def handle_train(self, task: TrainTask) -> Update:
        time.sleep(self.delay)
        return Update(self.path, task.round, task.nonce, dict(task.state), 1.0)

    def handle_eval(self, task: EvalTask) -> EvalReport:
        return EvalReport(self.path, task.nonce, {})


def _parent(
    tmp_path: Path, held_messages: int, delays: dict[str, float]
) -> Iterator[ParentLinkServer]:
    pki = tmp_path / "pki"
    create_ca(pki)
    for path in (ROOT, *CHILDREN):
        issue_node_cert(pki, path, pki)
    server = ParentLinkServer(
        "127.0.0.1:0",
        ROOT,
        CHILDREN,
        TlsFiles.for_node(pki, pki, ROOT),
        held_messages=held_messages,
    )
    links = []
    try:
        for path in CHILDREN:
            link = ChildLink(server.address, path, TlsFiles.for_node(pki, pki, path))
            link.connect_with_backoff(30)
            links.append(link)
            handler = ChildAnswering(path, delays.get(path, 0.0))
            threading.Thread(target=answer_parent, args=(link, handler), daemon=True).start()
        server.wait_for_children(timeout=30)
        yield server
    finally:
        for link in links:
            link.close()
        server.stop(0.5)


@pytest.fixture
def parent(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ParentLinkServer]:
    held_messages, delays = request.param
    yield from _parent(tmp_path, held_messages, delays)


def _tasks(state: dict[str, torch.Tensor]) -> list[TrainTask]:
    return [TrainTask("run", 1, 1, ROOT, p, f"nonce-{p}", state) for p in CHILDREN]


@pytest.mark.parametrize(
    ("parent", "bounded"),
    [((2, {}), True), ((100, {}), False)],  # the second is the teeth: no bound
    indirect=["parent"],
)
def test_a_slow_consumer_holds_at_most_the_gate_limit_plus_two_replies(
    parent: ParentLinkServer, bounded: bool
) -> None:
    transport = GrpcTransport(parent, RoundPolicy(round_timeout=60))
    state = {"w": torch.randn(64, 1024)}  # 256 KiB per reply
    senders = []
    for update in transport.train(_tasks(state)):
        assert torch.equal(update.state["w"], state["w"])
        senders.append(update.sender)
        time.sleep(0.2)  # the aggregator folding it; meanwhile every child has answered
        del update
    assert senders == CHILDREN and not transport.dropouts()
    if bounded:  # the limit, the reply being folded and the next one awaited (admission.py)
        assert parent.gate.peak_held <= 2 + 2
    else:
        assert parent.gate.peak_held == len(CHILDREN)
    assert parent.gate.held == 0  # every admission released once its reply was let go


@pytest.mark.parametrize(
    "parent", [(1, {CHILDREN[0]: 4.0})], indirect=["parent"]
)  # the first child answers after the round's timeout
def test_children_held_back_by_the_gate_answered_in_time(parent: ParentLinkServer) -> None:
    transport = GrpcTransport(parent, RoundPolicy(round_timeout=2.0))
    senders = [u.sender for u in transport.train(_tasks({"w": torch.ones(8)}))]
    # Only the straggler is out; the others waited at the gate behind the reply held for it.
    assert senders == CHILDREN[1:]
    dropouts = transport.dropouts()
    assert [d.path for d in dropouts] == [CHILDREN[0]] and "timeout" in dropouts[0].reason.lower()
