"""Typed errors raised at worldlm's boundaries.

Each error says what went wrong and what to do; the CLI prints them without a traceback.
"""

from __future__ import annotations

SHOWN_CHARS = 200


def shown(text: object, limit: int = SHOWN_CHARS) -> str:
    """Text from an untrusted peer as it may appear in an error, a metrics row or the audit log:
    non-printable characters escaped, and at most `limit` characters, then how long it was. (A
    5,000-character sender name must not make the refusal of its message fail in turn.)"""
    value = str(text)
    printable = value if value.isprintable() else value.encode("unicode_escape").decode("ascii")
    if len(printable) <= limit:
        return printable
    return f"{printable[:limit]}... ({len(value)} characters)"


class WorldLMError(Exception):
    """Base class of every error worldlm raises on purpose."""


class ConfigError(WorldLMError):
    """A run configuration is malformed: unknown key, wrong type or impossible value."""


class DataError(WorldLMError):
    """A leaf's data is unreadable or unusable (missing, empty, wrong encoding, no text field)."""


class ModelError(WorldLMError):
    """A model cannot be built or loaded (unknown preset, missing or broken model directory)."""


class WireError(WorldLMError):
    """A payload on the wire or on disk is malformed, too large, or fails its digest."""


class MetricsError(WorldLMError):
    """A run directory's metrics.jsonl cannot be read back (a line that is not a JSON object)."""


class CheckpointError(WorldLMError):
    """No usable checkpoint exists, or a checkpoint does not match the run."""


class UpdateRejected(WorldLMError):
    """An update from a child failed validation; `reason` names the check that failed."""

    def __init__(self, sender: str, reason: str) -> None:
        self.sender = shown(sender)
        self.reason = shown(reason, 4 * SHOWN_CHARS)
        super().__init__(f"update from {self.sender!r} rejected: {self.reason}")

    def __reduce__(self) -> tuple[type[UpdateRejected], tuple[str, str]]:
        # Raised in a Ray worker, it crosses to the driver pickled: rebuild it from its fields.
        return (type(self), (self.sender, self.reason))


class TransportError(WorldLMError):
    """A child could not be reached or did not answer in time."""
