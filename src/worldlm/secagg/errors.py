"""Typed errors of secure aggregation: bad setup, an aborted round, a refused request."""

from __future__ import annotations

from worldlm.errors import ConfigError, WorldLMError


class SecAggError(WorldLMError):
    """Base class of every error the secure aggregation protocol raises on purpose."""


class SecAggSetupError(SecAggError, ConfigError):
    """The round cannot be set up safely (too many clients for the field width, too few
    neighbours to share secrets); change `secagg.bits`, `secagg.neighbours` or the cohort."""


class SecAggAborted(SecAggError):
    """Too few clients answered to rebuild a needed secret: the round ends and nothing, not even
    a partial sum, is released. Retry the round with more live clients."""


class SecAggRefused(SecAggError):
    """A client refused a request that would let the server unmask one input (both secrets of
    the same peer, or a share it never received). Only a faulty or curious server asks this."""


class SecAggProtocolError(SecAggError):
    """A message arrived out of order, from the wrong sender, or malformed (bad shape, bad
    ciphertext): a bug or tampering on the path, not a dropout."""
