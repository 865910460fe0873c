"""The parent's handle on one attached child: send to it, receive from it, see who it is."""

from __future__ import annotations

from worldlm.transport.grpc.chunking import Payloads
from worldlm.transport.grpc.endpoint import Endpoint
from worldlm.transport.grpc.hello import HelloInfo


class ChildConnection:
    """One accepted stream from a child, valid until it closes.

    A child that reconnects gets a new `ChildConnection`; the old one closes with a reason
    saying it was replaced, so parent code holding it learns that in-flight work was lost.
    """

    def __init__(self, info: HelloInfo, endpoint: Endpoint) -> None:
        self._info = info
        self._endpoint = endpoint

    def __repr__(self) -> str:
        state = "connected" if self.connected else f"closed ({self.close_reason})"
        return f"ChildConnection({self.path!r}, {state})"

    @property
    def info(self) -> HelloInfo:
        """What the child said in its Hello (path checked against its certificate)."""
        return self._info

    @property
    def path(self) -> str:
        return self._info.node_path

    @property
    def connected(self) -> bool:
        return self._endpoint.connected

    @property
    def close_reason(self) -> str | None:
        return self._endpoint.close_reason

    def send(self, kind: str, payload: Payloads, timeout: float | None = None) -> None:
        """Send one message; returns once gRPC has taken all of it.

        Raises `LinkDisconnected` if the child is gone, `LinkTimeout` after `timeout` seconds.
        """
        self._endpoint.send(kind, payload, timeout)

    def receive(self, timeout: float | None) -> tuple[str, memoryview]:
        """The next whole message from the child as (kind, payload).

        Raises `LinkTimeout` if none arrives within `timeout` seconds, `LinkDisconnected` if
        the child is gone and every message it sent before has been received.
        """
        return self._endpoint.receive(timeout)

    def close(self, reason: str = "closed by the parent") -> None:
        """Drop this child's stream; it sees `reason` and may reconnect."""
        self._endpoint.close(reason)
