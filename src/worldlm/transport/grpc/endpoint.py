"""One end of an attached stream: whole messages out, whole messages in, and how it closed.

Both the parent's `ChildConnection` and the child's `ChildLink` are this plus their own setup.
Outgoing messages are queued whole and cut into chunks only as gRPC asks for the next frame,
so a multi-gigabyte send never holds more than one extra chunk, and `send` returns once gRPC
has taken the last one. Incoming chunks are reassembled by a reader thread into a small
bounded inbox; when it is full the reader stops reading, and gRPC flow control makes the sender
wait, so a slow consumer never piles up updates in memory.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc

from worldlm.transport.grpc import link_pb2
from worldlm.transport.grpc.admission import ReceiveGate
from worldlm.transport.grpc.chunking import Message, Payloads, Reassembler, split_payload
from worldlm.transport.grpc.errors import ChunkError, LinkDisconnected, LinkTimeout
from worldlm.transport.grpc.framing import BadFrame, Chunk, Frame, frame_body


@dataclass
class _Outgoing:
    kind: str
    chunks: Iterator[Chunk]
    started: bool = False
    done: bool = False


class Endpoint:
    """The shared state of one stream end; `peer` names the other end in messages."""

    def __init__(
        self,
        peer: str,
        *,
        chunk_bytes: int,
        max_message_bytes: int,
        inbox_messages: int,
        on_close: Callable[[], None] | None = None,
        gate: ReceiveGate | None = None,
        gate_key: str = "",
    ) -> None:
        if inbox_messages < 1:
            raise ValueError(f"inbox_messages must be >= 1, got {inbox_messages}")
        self.peer = peer
        # A parent's links share one gate (admission.py), each under its child's path.
        self._gate = gate
        self._gate_key = gate_key
        self._chunk_bytes = chunk_bytes
        self._inbox_messages = inbox_messages
        self._reassembler = Reassembler(max_message_bytes)
        self._on_close = on_close
        self._cond = threading.Condition()
        self._outbox: deque[_Outgoing] = deque()
        self._inbox: deque[Message] = deque()
        self._next_id = 1
        self._closed: str | None = None
        self._close_code = grpc.StatusCode.UNAVAILABLE

    # --- state -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._closed is None

    @property
    def close_reason(self) -> str | None:
        return self._closed

    @property
    def close_code(self) -> grpc.StatusCode:
        """The status the server ends this stream with; meaningful once closed."""
        return self._close_code

    def close(self, reason: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> bool:
        """Close the stream end for `reason`; return False if it was already closed.

        Waiting senders fail with `LinkDisconnected`; messages already in the inbox can still
        be received, since they arrived whole before the close.
        """
        with self._cond:
            if self._closed is not None:
                return False
            self._closed = reason
            self._close_code = code
            self._outbox.clear()
            self._cond.notify_all()
        if self._on_close is not None:
            self._on_close()
        return True

    # --- sending ---------------------------------------------------------------------------

    def send(self, kind: str, payload: Payloads, timeout: float | None = None) -> None:
        """Queue one message and wait until gRPC has taken its last chunk.

        On timeout, a message that has not started is withdrawn; one that has started closes
        the link, because the peer holds a partial message that cannot be withdrawn.
        """
        with self._cond:
            self._raise_if_closed()
            item = _Outgoing(kind, split_payload(self._next_id, kind, payload, self._chunk_bytes))
            self._next_id += 1
            self._outbox.append(item)
            self._cond.notify_all()
            self._cond.wait_for(lambda: item.done or self._closed is not None, timeout)
            if item.done:
                return
            if self._closed is not None:
                raise LinkDisconnected(self._closed)
            if not item.started:
                self._outbox.remove(item)
                raise LinkTimeout(
                    f"could not start sending {kind!r} to {self.peer} within {timeout}s: "
                    "earlier messages are still being sent"
                )
        reason = (
            f"sending {kind!r} to {self.peer} did not finish within {timeout}s; the link is "
            "closed because a partly sent message cannot be withdrawn"
        )
        self.close(reason, grpc.StatusCode.DEADLINE_EXCEEDED)
        raise LinkTimeout(reason)

    def frames(self, first: link_pb2.Frame | None = None) -> Iterator[Frame]:
        """The outgoing frames, for gRPC to pull: `first`, then chunks of queued messages.

        Ends when the endpoint closes, which ends (client) or lets the server end the stream.
        """
        if first is not None:
            yield first
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._outbox) or self._closed is not None)
                if self._closed is not None:
                    return
                item = self._outbox[0]
                item.started = True
            for chunk in item.chunks:
                if self._closed is not None:
                    return
                yield chunk
            # Resumed after the last yield: gRPC has finished sending the last chunk.
            with self._cond:
                item.done = True
                if self._outbox and self._outbox[0] is item:
                    self._outbox.popleft()
                self._cond.notify_all()

    # --- receiving -------------------------------------------------------------------------

    def receive(self, timeout: float | None) -> tuple[str, memoryview]:
        """The next whole message as (kind, payload); waits at most `timeout` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._inbox) or self._closed is not None, timeout)
            if self._inbox:
                message = self._inbox.popleft()
                self._cond.notify_all()
                return message.kind, message.payload
            self._raise_if_closed()
        raise LinkTimeout(f"no message from {self.peer} within {timeout}s")

    def pump(self, frames: Iterable[Frame]) -> None:
        """Read incoming frames until the stream ends; run on a thread of its own."""
        try:
            for frame in frames:
                if isinstance(frame, link_pb2.Frame) and frame_body(frame) == "refusal":
                    self.close(f"{self.peer} refused: {frame.refusal.reason}")
                    return
                if not isinstance(frame, Chunk):
                    what = frame.reason if isinstance(frame, BadFrame) else frame_body(frame)
                    self.close(
                        f"{self.peer} broke the protocol: sent {what or 'an empty frame'} "
                        "after the handshake",
                        grpc.StatusCode.INVALID_ARGUMENT,
                    )
                    return
                release = None
                if self._gate is not None and self._reassembler.in_progress is None:
                    # This chunk starts a message: wait until the parent may hold one more.
                    release = self._gate.admit(self._gate_key, lambda: self._closed is not None)
                    if release is None:
                        return  # closed while waiting
                message = self._feed(frame, release)
                if message is not None:
                    delivered = self._deliver(message)
                    # The reader must not keep the message alive while it waits for the next
                    # one: its buffer holds an admission until the receiver lets it go.
                    del message
                    if not delivered:
                        return
            self.close(f"{self.peer} ended the link")
        except ChunkError as exc:
            self.close(
                f"{self.peer} sent a malformed message: {exc}", grpc.StatusCode.INVALID_ARGUMENT
            )
        except grpc.RpcError as exc:
            self.close(f"the link to {self.peer} broke: {describe_rpc_error(exc)}")
        finally:
            self._reassembler.drop_partial()  # a message cut off by the end holds no memory

    def _feed(self, frame: Chunk, release: Callable[[], None] | None) -> Message | None:
        """Feed one chunk; `release` is the admission of the message it starts, if any."""
        if release is None:
            return self._reassembler.feed(frame)
        started = False
        try:
            message = self._reassembler.feed(frame, on_free=release)
            started = True  # the message's buffer now releases the admission when it dies
            return message
        finally:
            if not started:
                release()  # refused before any buffer was taken

    def _deliver(self, message: Message) -> bool:
        with self._cond:
            self._cond.wait_for(
                lambda: len(self._inbox) < self._inbox_messages or self._closed is not None
            )
            if self._closed is not None:
                return False
            self._inbox.append(message)
            self._cond.notify_all()
            return True

    def _raise_if_closed(self) -> None:
        if self._closed is not None:
            raise LinkDisconnected(self._closed)


def describe_rpc_error(exc: grpc.RpcError) -> str:
    """`CODE: details` for a client-side error; server-side ones carry neither."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if not callable(code):
        return "the stream was cancelled"
    name = getattr(code(), "name", str(code()))
    text = details() if callable(details) else None
    return f"{name}: {text}" if text else name
