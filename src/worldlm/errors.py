"""Typed errors raised at worldlm's boundaries.

Each error says what went wrong and what to do; the CLI prints them without a traceback.
"""

from __future__ import annotations


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


class CheckpointError(WorldLMError):
    """No usable checkpoint exists, or a checkpoint does not match the run."""


class UpdateRejected(WorldLMError):
    """An update from a child failed validation; `reason` names the check that failed."""

    def __init__(self, sender: str, reason: str) -> None:
        super().__init__(f"update from {sender!r} rejected: {reason}")
        self.sender = sender
        self.reason = reason


class TransportError(WorldLMError):
    """A child could not be reached or did not answer in time."""
