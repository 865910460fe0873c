"""The simulated clock of a FedBuff aggregator: how long each dispatch of a child trains.

A duration depends only on (run seed, child path, how many times that child was sent work),
never on wall time or on the order things ran in, so a run and its resume see the same clock.
The normal deviate comes from a SHA-256 of those (`seeding.derive_seed`) through the inverse
normal CDF: pure Python, the same bits on every machine.
"""

from __future__ import annotations

import math
from statistics import NormalDist

from worldlm.config import SpeedConfig
from worldlm.seeding import derive_seed

_STANDARD = NormalDist()


def standard_normal(seed: int, *parts: object) -> float:
    """A N(0, 1) draw determined by `seed` and `parts`."""
    bits = derive_seed(seed, *parts) >> 10  # 53 bits: every value a float64 holds exactly
    return _STANDARD.inv_cdf((bits + 0.5) / 2.0**53)  # in (0, 1), never 0 or 1


def training_seconds(
    speed: SpeedConfig, seed: int, child: str, dispatch: int, slowdown: float = 1.0
) -> float:
    """Simulated seconds the `dispatch`-th task of `child` takes: constant `mean`, or lognormal
    with mean `mean` (mean * exp(sigma z - sigma^2 / 2)), times the child's `slowdown`."""
    if speed.distribution == "constant":
        return speed.mean * slowdown
    z = standard_normal(seed, "fedbuff-clock", child, dispatch)
    return speed.mean * math.exp(speed.sigma * z - speed.sigma**2 / 2) * slowdown
