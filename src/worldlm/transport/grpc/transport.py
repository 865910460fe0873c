"""The round engine's `Transport` over gRPC: a parent's children are the processes that dialed in.

Tasks go out concurrently (a send returns only once gRPC has taken the whole payload, so one
slow link must not hold up the others) and each child's reply is decoded on its own thread. A
child that is not attached, disconnects, times out or answers with something malformed is left
out of that round and logged; a late reply to an old task is recognized by its nonce and refused.

Order: with `ordered` (the default) replies are handed to the engine in task order, so the
float64 sums and the attention over key layers see the same sequence as the in-process engine
and a deployment reproduces it bit for bit; a reply that overtakes an earlier one waits decoded
in memory. Without it, replies are handed over as they arrive and at most one is held.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from worldlm.errors import WireError
from worldlm.federation.messages import EvalReport, EvalTask, TrainTask, Update
from worldlm.federation.secure_messages import (
    SecureMessage,
    SecureReply,
    SecureSetup,
    SecureStage,
    answers,
)
from worldlm.transport.base import ChildInfo, Dropout
from worldlm.transport.codec import decode_message, encode_message_parts
from worldlm.transport.grpc.chunking import DEFAULT_MAX_MESSAGE_BYTES
from worldlm.transport.grpc.connection import ChildConnection
from worldlm.transport.grpc.errors import LinkError
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
        self._waited_for: frozenset[str] = frozenset()  # the absent children last waited for

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
        deadline = time.monotonic() + self.policy.round_timeout
        attached = self.server.children()
        arrivals: queue.Queue[tuple[int, Reply | Dropout]] = queue.Queue()
        expected: list[int] = []
        for index, task in enumerate(tasks):
            conn = attached.get(task.recipient)
            if conn is None:
                self._drop(Dropout(task.recipient, "not attached when the round started"))
                continue
            expected.append(index)
            threading.Thread(
                target=self._ask,
                args=(conn, task, reply_type, deadline, index, arrivals),
                name=f"ask-{task.recipient}",
                daemon=True,
            ).start()
        waiting: dict[int, Reply | None] = {}  # arrived out of order (None: dropped)
        outstanding = set(expected)
        next_up = 0  # position in `expected` of the next reply to hand over (ordered mode)
        while outstanding:
            try:
                index, outcome = arrivals.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                for index in sorted(outstanding):
                    self._drop(Dropout(tasks[index].recipient, "no reply before the timeout"))
                break
            outstanding.discard(index)
            reply = None if isinstance(outcome, Dropout) else outcome
            if isinstance(outcome, Dropout):
                self._drop(outcome)
            if not self.policy.ordered:
                if reply is not None:
                    yield reply
                continue
            waiting[index] = reply
            while next_up < len(expected) and expected[next_up] in waiting:
                ready = waiting.pop(expected[next_up])
                next_up += 1
                if ready is not None:
                    yield ready
        # Replies that arrived after an earlier child timed out still count, in order.
        for index in expected[next_up:]:
            ready = waiting.pop(index, None)
            if ready is not None:
                yield ready

    def _ask(
        self,
        conn: ChildConnection,
        task: Request,
        reply_type: type[Reply],
        deadline: float,
        index: int,
        arrivals: queue.Queue[tuple[int, Reply | Dropout]],
    ) -> None:
        """Send one task and wait for its reply; anything else it reads is refused."""
        try:
            # The link digests every payload whole (chunking.py), so the codec's body digest
            # would be a second pass over the same bytes.
            kind, parts = encode_message_parts(task, body_digest=False)
            conn.send(kind, parts, timeout=_remaining(deadline))
            while True:
                kind, payload = conn.receive(timeout=_remaining(deadline))
                reply = decode_message(
                    kind,
                    payload,
                    max_bytes=self.policy.max_message_bytes,
                    copy=False,
                    verify_body=False,
                )
                answer = _as_answer(reply, reply_type, task, conn.path)
                if not isinstance(answer, str):
                    arrivals.put((index, answer))
                    return
                # Refused and recorded, but the child may still send its real answer in time.
                self._drop(Dropout(conn.path, f"refused its {kind}: {answer}", left_out=False))
        except (LinkError, WireError) as exc:
            arrivals.put((index, Dropout(conn.path, f"{type(exc).__name__}: {exc}")))

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
        self.dropped.append(dropped)


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
