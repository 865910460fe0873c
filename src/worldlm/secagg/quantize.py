"""Fixed-point encoding of float vectors into Z_{2^bits} so that sums of n inputs never wrap.

A value x is clipped to [-c, c] (c = clip_range) and mapped to the integer
q = rint((x + c) / step) in [0, max_int], with step = 2c / max_int. The largest cohort the
round is set up for, n_max, fixes max_int = floor((2^bits - 1) / n_max), so any sum of at
most n_max encoded inputs obeys sum <= n_max * max_int < 2^bits and never wraps modulo
2^bits. Decoding a sum S of n inputs gives S * step - n * c.

Error bound: each encoded coordinate is within step / 2 of its clipped input, so a decoded
sum of n inputs is within n * step / 2 of the sum of the clipped inputs (plus float64
rounding, below n * step / 8000 since max_int is capped at 2^40). Values outside [-c, c] are
clipped first; that error is the caller's choice of c, not the codec's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worldlm.secagg.errors import SecAggAborted, SecAggSetupError

# Float64 carries 53 bits: past 2^40 levels its rounding of (x + c) / step, and of a decoded sum,
# would stop being a negligible part of a step.
_MAX_LEVELS = 1 << 40


@dataclass(frozen=True, kw_only=True)
class Quantizer:
    """Fixed-point codec for a round of at most `max_clients` inputs in `bits`-bit integers."""

    bits: int
    clip_range: float
    max_clients: int

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 62:
            raise SecAggSetupError(f"secagg.bits must be in [2, 62], got {self.bits}")
        if not self.clip_range > 0:
            raise SecAggSetupError(f"secagg.clip_range must be > 0, got {self.clip_range}")
        if self.max_clients < 1:
            raise SecAggSetupError(f"a round needs at least one client, got {self.max_clients}")
        if self.max_int < 2:
            raise SecAggSetupError(
                f"{self.max_clients} clients cannot be summed in {self.bits}-bit integers: "
                f"n * max_int < 2^bits leaves max_int = {self.max_int} (need >= 2); raise "
                f"secagg.bits or split the cohort"
            )

    @property
    def max_int(self) -> int:
        """Largest encoded value: n_max * max_int < 2^bits, so sums never wrap."""
        return min(((1 << self.bits) - 1) // self.max_clients, _MAX_LEVELS)

    @property
    def step(self) -> float:
        """Width of one quantization level (the value of one integer unit)."""
        return 2.0 * self.clip_range / self.max_int

    def max_error(self, n: int) -> float:
        """Bound on |decoded sum - sum of clipped inputs| per coordinate for a sum of n."""
        return n * self.step / 2.0

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Clip to [-c, c] and map to integers in [0, max_int] (uint64)."""
        c = self.clip_range
        x = np.clip(np.asarray(values, dtype=np.float64), -c, c)
        q = np.rint((x + c) * (self.max_int / (2.0 * c)))
        return np.clip(q, 0, self.max_int).astype(np.uint64)

    def check_sum(self, total: np.ndarray, n: int) -> None:
        """Raise `SecAggAborted` where the integer sum exceeds n * max_int. Honest sums never
        do; a sum that does has an input that ignored the encoding. (Within the range a lying
        input still moves the sum, by at most n * max_int units: the range is all the server
        can check of masked inputs, docs/security.md.)"""
        over = int(np.count_nonzero(np.asarray(total, dtype=np.uint64) > n * self.max_int))
        if over:
            raise SecAggAborted(
                f"the unmasked sum is out of range at {over} coordinates (above what {n} "
                "encoded inputs can reach): an input ignored the encoding"
            )

    def decode_sum(self, total: np.ndarray, n: int) -> np.ndarray:
        """Float64 sum of n inputs from the integer sum of their encodings. A sum above
        n * max_int (which no n honest encodings reach) raises `SecAggAborted`: some input
        was not encoded at all, and the sum says nothing about the inputs."""
        if n > self.max_clients:
            raise ValueError(f"a sum of {n} inputs exceeds the {self.max_clients} set up")
        self.check_sum(total, n)
        # S * step - n * c = (S - n * max_int / 2) * step, centred in exact int64 first so that
        # a sum near zero keeps every bit float64 has.
        levels_of_n = n * self.max_int
        centred = np.asarray(total, dtype=np.uint64).astype(np.int64) - levels_of_n // 2
        return (centred.astype(np.float64) - (levels_of_n % 2) / 2.0) * self.step
