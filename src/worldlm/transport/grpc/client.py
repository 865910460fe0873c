"""The child's side of the link: dial the parent, say Hello, then exchange messages.

A child always dials out, so it works from behind a firewall. The parent answers the Hello
with its own Hello (accepted) or a Refusal; only then is the child attached. While the parent
is unreachable or restarting, `connect_with_backoff` keeps trying; a refusal is final, because
retrying cannot change the certificate or the tree that caused it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from worldlm.errors import shown
from worldlm.security.certs import CertError, identity_host, validate_node_path
from worldlm.transport.grpc import link_pb2
from worldlm.transport.grpc.backoff import backoff_delays
from worldlm.transport.grpc.chunking import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES, Payloads
from worldlm.transport.grpc.endpoint import Endpoint, describe_rpc_error
from worldlm.transport.grpc.errors import (
    HelloError,
    LinkConfigError,
    LinkDisconnected,
    LinkError,
    LinkRefused,
    LinkUnreachable,
)
from worldlm.transport.grpc.framing import attach_call, frame_body
from worldlm.transport.grpc.hello import HelloInfo
from worldlm.transport.grpc.options import channel_options, check_limits
from worldlm.transport.grpc.tls import TlsFiles, channel_credentials, check_plaintext_allowed

log = logging.getLogger(__name__)

# Failures that a parent coming (back) up can cure; anything else is reported at once.
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # the parent's streams are all busy, e.g. mid-restart
        grpc.StatusCode.CANCELLED,
    }
)
# The last attempt before the deadline still gets this long, so it is not doomed from the start.
_MIN_ATTEMPT_S = 0.2


@dataclass
class _Handshake:
    """What the reader thread learned from the parent's first answer."""

    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    parent: HelloInfo | None = None
    refusal: str | None = None
    error: str | None = None
    code: grpc.StatusCode | None = None

    def finish(self, **outcome: Any) -> None:
        """Record the outcome; the first one wins (the reader and a timeout can race)."""
        with self.lock:
            if self.done.is_set():
                return
            for name, value in outcome.items():
                setattr(self, name, value)
            self.done.set()


class ChildLink:
    """A child's link to its parent at `parent_address` (`host:port`).

    Nothing is dialled until `connect` or `connect_with_backoff`. After the link drops (the
    parent restarted, the network broke), `receive`/`send` raise `LinkDisconnected` and the
    child calls `connect_with_backoff` again; the new stream starts clean.
    """

    def __init__(
        self,
        parent_address: str,
        node_path: str,
        tls: TlsFiles | None,
        allow_plaintext: bool = False,
        *,
        run_id: str = "",
        train_tokens: int = 0,
        resources: Mapping[str, Any] | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        inbox_messages: int = 2,
        rng: random.Random | None = None,
    ) -> None:
        try:
            self.node_path = validate_node_path(node_path)
        except CertError as exc:
            raise LinkConfigError(str(exc)) from exc
        check_limits(chunk_bytes, max_message_bytes, inbox_messages)
        self._chunk_bytes = chunk_bytes
        self.parent_address = parent_address
        if tls is None:
            check_plaintext_allowed(
                parent_address, allow_plaintext, f"the link to the parent at {parent_address}"
            )
        else:
            tls.check_identity(node_path)
        self._tls = tls
        try:
            self._hello = HelloInfo(
                node_path=node_path,
                run_id=run_id,
                train_tokens=train_tokens,
                resources=dict(resources or {}),
            ).to_frame()
        except HelloError as exc:
            raise LinkConfigError(str(exc)) from exc
        self._max_message_bytes = max_message_bytes
        self._inbox_messages = inbox_messages
        self._rng = rng if rng is not None else random.Random()
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._endpoint: Endpoint | None = None
        self.parent: HelloInfo | None = None  # the parent's answering Hello, once attached

    def __enter__(self) -> ChildLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        endpoint = self._endpoint
        return endpoint is not None and endpoint.connected

    @property
    def close_reason(self) -> str | None:
        endpoint = self._endpoint
        return "never connected" if endpoint is None else endpoint.close_reason

    # --- attaching -------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> HelloInfo:
        """One attempt to attach; returns the parent's Hello.

        Raises `LinkRefused` if the parent refused, `LinkUnreachable` if it could not be
        reached or did not answer within `timeout` seconds, `LinkError` for anything else.
        """
        self._drop("reconnecting")
        channel = self._open_channel()
        calls: list[grpc.Call] = []

        def cancel_call() -> None:
            for c in calls:
                c.cancel()

        endpoint = Endpoint(
            f"parent at {self.parent_address}",
            chunk_bytes=self._chunk_bytes,
            max_message_bytes=self._max_message_bytes,
            inbox_messages=self._inbox_messages,
            on_close=cancel_call,
        )
        call = attach_call(channel)(endpoint.frames(first=self._hello))
        calls.append(call)
        handshake = _Handshake()
        threading.Thread(
            target=self._read,
            args=(call, endpoint, handshake),
            name=f"link-reader-{self.node_path}",
            daemon=True,
        ).start()

        if not handshake.done.wait(timeout):
            handshake.finish(error=f"no answer to the Hello within {timeout}s")
        expected = self.node_path.rsplit("/", 1)[0]
        if handshake.parent is not None and handshake.parent.node_path != expected:
            channel.close()
            failure = (
                f"the parent at {self.parent_address} says it is "
                f"{shown(repr(handshake.parent.node_path))}, not {expected!r}, the parent of "
                f"{self.node_path!r}"
            )
            endpoint.close(failure)
            raise LinkError(failure)
        if handshake.parent is not None:
            with self._lock:
                self._channel, self._endpoint, self.parent = channel, endpoint, handshake.parent
            log.info("%s attached to parent %s", self.node_path, handshake.parent.node_path)
            return handshake.parent

        channel.close()
        if handshake.refusal is not None:
            refused = LinkRefused(self.parent_address, handshake.refusal)
            endpoint.close(str(refused))
            with self._lock:
                self._endpoint = endpoint
            raise refused
        failure = (
            f"{self.node_path!r} could not attach to the parent at {self.parent_address}: "
            f"{handshake.error}"
        )
        if self._tls is not None and any(
            word in str(handshake.error).lower()
            for word in ("ssl", "handshake", "certificate", "verification", "unauthenticated")
        ):
            failure += (
                f" (with TLS, the server there must hold a certificate issued for {expected!r} "
                "by this federation's CA: `worldlm certs tree` issues one)"
            )
        endpoint.close(failure)
        with self._lock:
            self._endpoint = endpoint
        if handshake.code is None or handshake.code in _RETRYABLE:
            raise LinkUnreachable(failure)
        raise LinkError(failure)

    def connect_with_backoff(
        self,
        max_wait: float = 60.0,
        *,
        attempt_timeout: float = 10.0,
        initial_delay: float = 0.1,
        max_delay: float = 5.0,
    ) -> int:
        """Attach, retrying with jittered exponential backoff for up to `max_wait` seconds.

        Returns how many attempts it took. A refusal or a non-transient error is raised at
        once; running out of time raises `LinkUnreachable` with the last error.
        """
        deadline = time.monotonic() + max_wait
        delays = backoff_delays(initial_delay, max_delay, self._rng)
        attempts = 0
        while True:
            attempts += 1
            remaining = deadline - time.monotonic()
            try:
                self.connect(timeout=max(min(attempt_timeout, remaining), _MIN_ATTEMPT_S))
                return attempts
            except LinkUnreachable as exc:
                last = exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LinkUnreachable(
                    f"gave up after {attempts} attempts in {max_wait}s; last error: {last}"
                ) from last
            delay = min(next(delays), remaining)
            log.info("%s: parent unreachable (%s); retrying in %.2fs", self.node_path, last, delay)
            time.sleep(delay)

    def close(self) -> None:
        """Detach from the parent; safe to call more than once."""
        self._drop("closed by the child")

    # --- messages --------------------------------------------------------------------------

    def send(self, kind: str, payload: Payloads, timeout: float | None = None) -> None:
        """Send one message to the parent; returns once gRPC has taken all of it."""
        self._current().send(kind, payload, timeout)

    def receive(self, timeout: float | None) -> tuple[str, memoryview]:
        """The next whole message from the parent as (kind, payload).

        Raises `LinkTimeout` if none arrives within `timeout` seconds, `LinkDisconnected` once
        the link is gone and every message that arrived before has been received.
        """
        return self._current().receive(timeout)

    # --- internals -------------------------------------------------------------------------

    def _current(self) -> Endpoint:
        endpoint = self._endpoint
        if endpoint is None:
            raise LinkDisconnected("not attached: call connect() or connect_with_backoff() first")
        return endpoint

    def _open_channel(self) -> grpc.Channel:
        # A fresh channel per attempt: a reused one would apply gRPC's own reconnect backoff
        # (up to two minutes) on top of ours after the parent restarts.
        options = channel_options(self._chunk_bytes)
        if self._tls is None:
            return grpc.insecure_channel(self.parent_address, options=options)
        creds = channel_credentials(self._tls)
        # The parent is checked by identity, not by the address dialled: its certificate must
        # have been issued for this node's parent path (a sibling's or a leaf's would not do).
        parent = identity_host(self.node_path.rsplit("/", 1)[0])
        options = [*options, ("grpc.ssl_target_name_override", parent)]
        return grpc.secure_channel(self.parent_address, creds, options=options)

    def _drop(self, reason: str) -> None:
        # The closed endpoint is kept, so later calls report why the link is closed.
        with self._lock:
            endpoint, channel = self._endpoint, self._channel
            self._channel = None
            self.parent = None
        if endpoint is not None:
            endpoint.close(reason)
        if channel is not None:
            channel.close()

    @staticmethod
    def _read(call: Any, endpoint: Endpoint, handshake: _Handshake) -> None:
        """Reader thread: the parent's first answer settles the handshake, then pump chunks."""
        try:
            first = next(call)
        except StopIteration:
            handshake.finish(error="the parent ended the stream without answering the Hello")
            endpoint.close("the parent ended the stream without answering the Hello")
            return
        except grpc.RpcError as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            text = describe_rpc_error(exc)
            if code == grpc.StatusCode.PERMISSION_DENIED:
                details = exc.details() if callable(getattr(exc, "details", None)) else None
                handshake.finish(refusal=details or text, code=code)
            else:
                handshake.finish(error=text, code=code)
            endpoint.close(text)
            return
        body = frame_body(first)
        if isinstance(first, link_pb2.Frame) and body == "refusal":
            handshake.finish(refusal=first.refusal.reason, code=grpc.StatusCode.PERMISSION_DENIED)
            endpoint.close(f"refused: {first.refusal.reason}")
            return
        try:
            if not isinstance(first, link_pb2.Frame) or body != "hello":
                raise HelloError(f"the parent answered the Hello with a {body or 'empty'} frame")
            parent = HelloInfo.from_proto(first.hello)
        except HelloError as exc:
            handshake.finish(error=str(exc), code=grpc.StatusCode.INTERNAL)
            endpoint.close(str(exc))
            return
        handshake.finish(parent=parent)
        endpoint.pump(call)
