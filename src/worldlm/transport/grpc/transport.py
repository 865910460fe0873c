"""The round engine's `Transport` over gRPC: a parent's children are the processes that dialed in.

Tasks go out concurrently (a send returns only once gRPC has taken the whole payload, so one
slow link must not hold up the others) and each child's reply is decoded on its own thread. A
child that is not attached, disconnects, times out or answers with something malformed is left
out of that round and logged; a late reply to an old task is recognized by its nonce and refused.

Order: with `ordered` (the default) replies are handed to the engine in task order, so the
float64 sums and the attention over key layers see the same sequence as the in-process engine
and a deployment reproduces it bit for bit; a reply that overtakes an earlier one waits decoded
in memory. Without it, replies are handed over as they arrive.

Memory: the server's receive gate (admission.py) bounds the replies held at once, whatever the
number of children: the links of children beyond it stop reading, so those children wait in
their send. The child the round waits for next is always let in, and a child the gate held
back past the round's timeout answered in time: it gets one more `round_timeout`.

In flight across rounds (FedBuff on real clocks): `dispatch` sends train tasks and returns, and
`arrivals` hands their replies over as they come, each checked as `train` checks one, each task
waiting at most `round_timeout` from its dispatch (in_flight.py). Threads waiting for replies
from one child read its link in turns, in the order their tasks were sent.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from worldlm.core.messages import EvalReport, EvalTask, TaskRefusal, TrainTask, Update
from worldlm.core.secure_messages import (
    SecureMessage,
    SecureReply,
    SecureSetup,
    SecureStage,
    answers,
)
from worldlm.core.transport import ChildInfo, Dropout
from worldlm.errors import WireError, shown
from worldlm.transport.codec import decode_message, encode_message_parts
from worldlm.transport.grpc.admission import ReceiveGate
from worldlm.transport.grpc.chunking import DEFAULT_MAX_MESSAGE_BYTES
from worldlm.transport.grpc.connection import ChildConnection
from worldlm.transport.grpc.errors import LinkError, LinkTimeout
from worldlm.transport.grpc.in_flight import InFlightTasks, ReaderTurns, Turn
from worldlm.transport.grpc.server import ParentLinkServer

log = logging.getLogger(__name__)
Reply = TypeVar("Reply", Update, EvalReport, SecureReply)
Request = TrainTask | EvalTask | SecureMessage


@dataclass(frozen=True)
class RoundPolicy:
    """How long a parent waits for its children, and how much it accepts from each."""

    round_timeout: float = 3600.0  # seconds from sending the tasks to the last reply
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ordered: bool = True  # hand replies over in task order (exact reproducibility)
    rejoin_wait: float = 0.0  # seconds to wait for children that went away to attach again


class GrpcTransport:
    """`Transport` for the aggregator at `server.node_path`; other paths have no children here."""

    def __init__(self, server: ParentLinkServer, policy: RoundPolicy | None = None) -> None:
        self.server = server
        self.policy = policy or RoundPolicy()
        self.dropped: list[Dropout] = []  # exclusions not yet collected by `dropouts()`
        self._dropped_lock = threading.Lock()  # reply threads add to it while rounds run
        self._waited_for: frozenset[str] = frozenset()  # the absent children last waited for
        self.turns = ReaderTurns()
        self.flights = InFlightTasks(self._drop)

    def children(self, parent: str) -> list[ChildInfo]:
        if parent != self.server.node_path:
            return []
        attached = self._await_rejoining()
        return [
            ChildInfo(path, attached[path].info.train_tokens, attached[path].info.resources)
            for path in sorted(attached)
        ]

    def _await_rejoining(self) -> dict[str, ChildConnection]:
        """The attached children, after waiting up to `rejoin_wait` for absent ones to attach
        again (a restarted sub-federation rejoins the next round). The same absent set is
        waited for once, so a child that is gone for good costs one wait, not one per round."""
        attached = self.server.children()
        absent = frozenset(self.server.child_paths - attached.keys())
        if not absent:
            self._waited_for = frozenset()
        if not absent or absent == self._waited_for or self.policy.rejoin_wait <= 0:
            return attached
        log.info("waiting up to %ss for %s to attach", self.policy.rejoin_wait, sorted(absent))
        deadline = time.monotonic() + self.policy.rejoin_wait
        while time.monotonic() < deadline and not absent <= self.server.children().keys():
            time.sleep(0.05)
        attached = self.server.children()
        self._waited_for = frozenset(self.server.child_paths - attached.keys())
        return attached

    def dropouts(self) -> list[Dropout]:
        with self._dropped_lock:
            taken, self.dropped = self.dropped, []
        return taken

    def train(self, tasks: Sequence[TrainTask]) -> Iterator[Update]:
        return self._exchange(tasks, Update)

    def evaluate(self, tasks: Sequence[EvalTask]) -> Iterator[EvalReport]:
        return self._exchange(tasks, EvalReport)

    def exchange(self, messages: Sequence[SecureMessage]) -> Iterator[SecureReply]:
        """One stage of a secure aggregation round, each stage with the round's whole timeout."""
        return self._exchange(messages, SecureReply)

    def _exchange(self, tasks: Sequence[Request], reply_type: type[Reply]) -> Iterator[Reply]:
        round_: _Exchange[Reply] = _Exchange(tasks, self.policy, self.server.gate)
        attached = self.server.children()
        for index, task in enumerate(tasks):
            if task.recipient in attached:
                round_.expected.append(index)
            else:
                self._drop(Dropout(task.recipient, "not attached when the round started"))
        round_.outstanding = set(round_.expected)
        round_.prefer(reset=True)
        for index in round_.expected:
            turn = self.turns.take(tasks[index].recipient)  # here: in the order tasks are sent
            threading.Thread(
                target=self._ask,
                args=(
                    attached[tasks[index].recipient],
                    tasks[index],
                    reply_type,
                    (round_, index),
                    turn,
                ),
                name=f"ask-{tasks[index].recipient}",
                daemon=True,
            ).start()
        extended = False
        while round_.outstanding:
            try:
                index, outcome = round_.arrivals.get(timeout=round_.seconds_left())
            except queue.Empty:
                # Children the receive gate held back answered in time: they get the time the
                # wait cost them, once. Everyone else still missing is out of this round.
                held = {i for i in round_.outstanding if round_.was_held_back(i)}
                late = round_.outstanding if extended else round_.outstanding - held
                for index in sorted(late):
                    self._drop(Dropout(tasks[index].recipient, "no reply before the timeout"))
                    yield from round_.settle(index, None)
                if extended or not held:
                    break
                extended = True
                round_.deadline = time.monotonic() + self.policy.round_timeout
                continue
            if index not in round_.outstanding:
                continue  # its task was settled at the deadline; this came after
            if isinstance(outcome, Dropout):
                self._drop(outcome)
                ready = round_.settle(index, None)
            else:
                ready = round_.settle(index, outcome)
            # This frame lets go of the reply before handing it over: while the engine folds
            # a later one, an earlier one must not stay alive here (it holds an admission).
            del outcome
            yield from ready

    def _ask(
        self,
        conn: ChildConnection,
        task: Request,
        reply_type: type[Reply],
        where: tuple[_Exchange[Reply], int],
        turn: Turn,
    ) -> None:
        """One task of an exchange (`where`: the exchange and the task's index in it)."""
        round_, index = where
        try:
            outcome = self._answer(
                conn, task, reply_type, round_.deadline, turn, lambda: round_.was_held_back(index)
            )
            round_.arrivals.put((index, outcome))
            del outcome
        finally:
            turn.done()

    def _answer(
        self,
        conn: ChildConnection,
        task: Request,
        reply_type: type[Reply],
        deadline: float,
        turn: Turn,
        held_back: Callable[[], bool],
    ) -> Reply | Dropout:
        """Send one task and wait, in `turn`, for its reply; anything else read is refused.
        `held_back` says whether the receive gate held the child back (it answered in time,
        so it gets one more `round_timeout`)."""
        extended = False
        try:
            # The link digests every payload whole (chunking.py), so the codec's body digest
            # would be a second pass over the same bytes.
            kind, parts = encode_message_parts(task, body_digest=False)
            conn.send(kind, parts, timeout=_remaining(deadline))
            del parts
            if not turn.wait(_remaining(deadline)):
                reason = "no reply before the timeout: it was still answering an earlier task"
                return Dropout(conn.path, reason)
            while True:
                try:
                    kind, payload = conn.receive(timeout=_remaining(deadline))
                except LinkTimeout:
                    if extended or not held_back():
                        raise
                    # The receive gate held it back, so it answered in time: see _exchange.
                    deadline, extended = time.monotonic() + self.policy.round_timeout, True
                    continue
                reply = decode_message(
                    kind,
                    payload,
                    max_bytes=self.policy.max_message_bytes,
                    copy=False,
                    verify_body=False,
                )
                del payload
                if (
                    isinstance(reply, TaskRefusal)
                    and reply.sender == conn.path
                    and reply.nonce == task.nonce
                ):
                    # The child will not act on this task (its provenance did not verify).
                    return Dropout(conn.path, f"refused the task: {shown(reply.reason)}")
                answer = _as_answer(reply, reply_type, task, conn.path)
                del reply
                if not isinstance(answer, str):
                    return answer
                # Refused and recorded, but the child may still send its real answer in time.
                self._drop(Dropout(conn.path, f"refused its {kind}: {answer}", left_out=False))
        except (LinkError, WireError) as exc:
            return Dropout(conn.path, f"{type(exc).__name__}: {exc}")

    # --- in flight across rounds (FedBuff on real clocks; core.transport.AsyncTransport) ---
    def dispatch(self, tasks: Sequence[TrainTask]) -> None:
        """Send each train task and return at once; `arrivals` hands over the outcomes."""
        attached = self.server.children()
        for task in tasks:
            self.flights.start(task.nonce, task.recipient)
            conn = attached.get(task.recipient)
            if conn is None:
                reason = "not attached when its task was dispatched"
                self.flights.land(task.nonce, Dropout(task.recipient, reason))
                continue
            turn = self.turns.take(task.recipient)  # here: in the order tasks are sent
            flight = threading.Thread(
                target=self._fly,
                args=(conn, task, turn),
                name=f"dispatch-{task.recipient}",
                daemon=True,
            )
            try:
                flight.start()
            except RuntimeError as exc:  # no thread to spare: the task must not stay pending
                turn.done()
                self.flights.land(task.nonce, Dropout(task.recipient, f"not sent: {exc}"))

    def _fly(self, conn: ChildConnection, task: TrainTask, turn: Turn) -> None:
        outcome: Update | Dropout = Dropout(conn.path, "its reply was lost to an internal error")
        try:
            deadline = time.monotonic() + self.policy.round_timeout
            gate = self.server.gate
            outcome = self._answer(
                conn, task, Update, deadline, turn, lambda: gate.delayed(conn.path)
            )
            if isinstance(outcome, Dropout) and outcome.reason.startswith("LinkTimeout"):
                outcome = Dropout(conn.path, "no reply within round_timeout of its dispatch")
        finally:
            self.flights.land(task.nonce, outcome)
            del outcome
            turn.done()

    def arrivals(self, timeout: float | None = None) -> Iterator[Update | Dropout]:
        """The outcome of each dispatched task, in the order they arrive; ends once nothing is
        in flight, or after `timeout` seconds without an arrival."""
        while True:
            outcome = self.flights.take(timeout)
            if outcome is None:
                return
            if isinstance(outcome, Dropout):
                log.warning("%s: its dispatched task ended: %s", outcome.path, outcome.reason)
            yield outcome
            del outcome  # the engine lets go of a reply before the next: see _exchange

    def abandon(self, reason: str) -> list[str]:
        """Forget every task in flight; a reply that still comes for one is refused."""
        children = self.flights.abandon(reason)
        if children:
            log.warning("forgot the tasks in flight to %s: %s", ", ".join(children), reason)
        return children

    def stop_children(self) -> None:
        """Tell every attached child the run is over (inner aggregators pass it on)."""
        from worldlm.transport.grpc.child import STOP_KIND

        for conn in self.server.children().values():
            try:
                conn.send(STOP_KIND, b"", timeout=10.0)
            except LinkError as exc:
                log.warning("%s: could not be told to stop: %s", conn.path, exc)

    def _drop(self, dropped: Dropout) -> None:
        what = "left out of this round" if dropped.left_out else "message refused"
        log.warning("%s: %s: %s", dropped.path, what, dropped.reason)
        with self._dropped_lock:
            self.dropped.append(dropped)


class _Exchange(Generic[Reply]):
    """One call of `_exchange`: its tasks, the replies on their way, and the order they are
    handed over in."""

    def __init__(
        self, tasks: Sequence[Request], policy: RoundPolicy, gate: ReceiveGate | None
    ) -> None:
        self.tasks, self.policy, self.gate = tasks, policy, gate
        self.deadline = time.monotonic() + policy.round_timeout
        self.arrivals: queue.Queue[tuple[int, Reply | Dropout]] = queue.Queue()
        self.expected: list[int] = []  # indices of the tasks sent
        self.outstanding: set[int] = set()
        self.waiting: dict[int, Reply | None] = {}  # arrived out of order (None: dropped)
        self.next_up = 0  # position in `expected` of the next reply to hand over (ordered)

    def seconds_left(self) -> float:
        return max(self.deadline - time.monotonic(), 0.0)

    def was_held_back(self, index: int) -> bool:
        return self.gate is not None and self.gate.delayed(self.tasks[index].recipient)

    def prefer(self, *, reset: bool = False) -> None:
        """Tell the gate whose message the round waits for next, so that it is never stuck
        behind messages that wait for it."""
        if self.gate is None:
            return
        if self.policy.ordered:
            ahead = self.expected[self.next_up : self.next_up + 1]
        else:
            ahead = [min(self.outstanding)] if self.outstanding else []
        self.gate.prefer([self.tasks[i].recipient for i in ahead], reset=reset)

    def settle(self, index: int, reply: Reply | None) -> Iterator[Reply]:
        """Record task `index`'s outcome (None: no reply) and yield whatever may go out now."""
        self.outstanding.discard(index)
        if not self.policy.ordered:
            self.prefer()
            if reply is not None:
                yield reply
            return
        self.waiting[index] = reply
        del reply
        while self.next_up < len(self.expected) and self.expected[self.next_up] in self.waiting:
            ready = self.waiting.pop(self.expected[self.next_up])
            self.next_up += 1
            self.prefer()
            if ready is not None:
                yield ready
            ready = None  # let it go as soon as the engine has


def _as_answer(reply: object, reply_type: type[Reply], task: Request, peer: str) -> Reply | str:
    """`reply` if it is the authenticated `peer`'s answer to `task`, else why it is not.

    The sender field is only a claim; the certificate-checked link says who really sent it."""
    if not isinstance(reply, reply_type):
        return f"expected a {reply_type.__name__}"
    if reply.sender != peer:
        return f"it claims to come from {reply.sender!r}, but the link belongs to {peer!r}"
    if reply.nonce != task.nonce:
        return "it answers another task (a replay, or a reply to an earlier round)"
    if isinstance(task, SecureSetup | SecureStage) and not (
        isinstance(reply, SecureReply) and answers(task, reply)
    ):
        return "it answers another stage of the secure round (a late reply)"
    return reply


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)
