"""A child's side of the link: answer the parent's tasks with a node (leaf or aggregator).

The loop is explicit: receive a task, check it is addressed to this node and run, hand it to the
node, send the reply. If the parent goes away the child dials again with backoff; a `stop`
message (the run is over) ends the loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from worldlm.core.messages import EvalTask, TaskRefusal, TrainTask
from worldlm.core.secure_messages import SecureSetup, SecureStage
from worldlm.core.transport import NodeHandler
from worldlm.errors import WireError, WorldLMError
from worldlm.transport.codec import Message, decode_message, encode_message_parts
from worldlm.transport.grpc.chunking import DEFAULT_MAX_MESSAGE_BYTES
from worldlm.transport.grpc.client import ChildLink
from worldlm.transport.grpc.errors import LinkDisconnected

log = logging.getLogger(__name__)
STOP_KIND = "stop"  # sent by a parent when the run ends; carries no payload


class TaskRefused(WireError):
    """A well-formed message that this node must not act on (wrong recipient or run)."""


Task = TrainTask | EvalTask | SecureSetup | SecureStage


def check_task(task: object, path: str, run_id: str) -> Task:
    """The task, if it is one and is meant for this node in this run."""
    if not isinstance(task, Task):
        raise TaskRefused(f"{path}: the parent sent a {type(task).__name__}, not a task")
    if task.recipient != path:
        raise TaskRefused(f"{path}: a task addressed to {task.recipient!r}")
    if run_id and task.run_id != run_id:
        raise TaskRefused(f"{path}: a task of run {task.run_id!r}, not {run_id!r}")
    return task


def answer_parent(
    link: ChildLink,
    handler: NodeHandler,
    *,
    run_id: str = "",
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    reconnect_wait: float = 300.0,
    verify: Callable[[TrainTask | EvalTask], None] | None = None,
) -> int:
    """Serve the parent's tasks until it sends `stop`; returns how many were answered.

    The link must be attached already. A refused message is logged and skipped: the parent
    will leave this child out of that round rather than act on a forged or misrouted task.
    `verify` checks a train or evaluation task's signed provenance and freshness
    (`security.downlink`) before it is acted on, that of a secure round's setup included; it
    raises to refuse it."""
    answered = 0
    while True:
        try:
            kind, payload = link.receive(timeout=None)
        except LinkDisconnected as exc:
            log.warning("%s: parent link lost (%s); dialing again", handler.path, exc.reason)
            link.connect_with_backoff(reconnect_wait)
            continue
        if kind == STOP_KIND:
            log.info("%s: the parent ended the run after %d tasks", handler.path, answered)
            return answered
        try:
            # The link checked the whole payload's digest; see GrpcTransport._ask.
            message = decode_message(
                kind, payload, max_bytes=max_message_bytes, copy=False, verify_body=False
            )
            task = check_task(message, handler.path, run_id)
        except WireError as exc:
            log.error("%s: refused a message from the parent: %s", handler.path, exc)
            continue
        reply: Message
        try:
            if verify is not None and isinstance(task, TrainTask | EvalTask | SecureSetup):
                verify(task.task if isinstance(task, SecureSetup) else task)
        except WorldLMError as exc:
            # Well-formed and addressed here, but not provably what the root sent: say so, so
            # that the parent leaves this node out now rather than at its round's timeout.
            log.error("%s: refused a task from the parent: %s", handler.path, exc)
            reply = TaskRefusal(handler.path, task.nonce, str(exc))
        else:
            log.info("%s: %s of round %d", handler.path, kind, task.global_round)
            reply = (
                handler.handle_train(task)
                if isinstance(task, TrainTask)
                else handler.handle_eval(task)
                if isinstance(task, EvalTask)
                else handler.handle_secure(task)  # a stage of the parent's secure round
            )
        reply_kind, reply_payload = encode_message_parts(reply, body_digest=False)
        try:
            link.send(reply_kind, reply_payload)
        except LinkDisconnected as exc:  # the parent restarted: this reply is lost with it
            log.warning("%s: reply lost (%s); dialing again", handler.path, exc.reason)
            link.connect_with_backoff(reconnect_wait)
            continue
        answered += 1
