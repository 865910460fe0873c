"""Delays between attempts to reach a parent: exponential, capped, and jittered.

The jitter matters when a parent restarts: all its children notice at the same moment, and
without it they would retry in lockstep, hitting the parent together at every step.
"""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delays(initial: float, cap: float, rng: random.Random | None = None) -> Iterator[float]:
    """Endless delays: the k-th is drawn uniformly from [d/2, d], d = min(cap, initial * 2**k)."""
    if not 0 < initial <= cap:
        raise ValueError(f"backoff needs 0 < initial <= cap, got initial={initial}, cap={cap}")
    draw = rng if rng is not None else random.Random()
    delay = initial
    while True:
        yield draw.uniform(delay / 2, delay)
        delay = min(cap, delay * 2)
