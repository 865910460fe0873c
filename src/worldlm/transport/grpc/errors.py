"""Typed errors of the gRPC link, so callers can tell "try again" from "fix something".

All derive from `TransportError` (a child could not be reached or did not answer), except
`ChunkError`, which is a malformed payload and so a `WireError`.
"""

from __future__ import annotations

from worldlm.errors import TransportError, WireError


class LinkError(TransportError):
    """Base class of every failure of the parent-child gRPC link."""


class LinkConfigError(LinkError):
    """The link is set up wrongly (TLS files, plaintext off loopback, unknown child, bad port).

    Retrying cannot help; the message names the setting to fix.
    """


class LinkTimeout(LinkError, TimeoutError):
    """Nothing arrived, or could be sent, within the caller's timeout; the link may be fine."""


class LinkDisconnected(LinkError):
    """The link is closed (peer gone, replaced, stopped or broke); `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LinkRefused(LinkError):
    """The parent refused this child; `reason` is the parent's own explanation."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"the parent at {address} refused this child: {reason}")
        self.address = address
        self.reason = reason


class LinkUnreachable(LinkError):
    """The parent could not be attached to before the caller's deadline."""


class ChunkError(WireError):
    """A chunked message is malformed: out of order, too large, wrong size or failed digest."""


class HelloError(LinkError):
    """A Hello frame is malformed (bad node path, resources that are not a JSON object)."""
