"""Shamir secret sharing (Shamir 1979) over the prime field of p = 2^521 - 1.

A secret s < p is the constant term of a random polynomial f of degree t - 1; the share of
the holder with x-coordinate x (a client's nonzero index) is f(x). Any t shares give back s by
Lagrange interpolation at 0; t - 1 shares are consistent with every s, so they reveal nothing.
p exceeds 2^256, so a 32-byte seed or X25519 private key fits as one secret. Coefficients come
from the OS CSPRNG (`secrets`), as the secrecy of s rests on them.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from functools import lru_cache

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8): one field element, big-endian, on the wire


def split(secret: int, holders: list[int], threshold: int) -> dict[int, int]:
    """Shares of `secret` for each x in `holders`, any `threshold` of which rebuild it."""
    if not 0 <= secret < PRIME:
        raise ValueError("a Shamir secret must lie in [0, p)")
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold {threshold} needs 1..{len(holders)} holders")
    if len(set(holders)) != len(holders) or any(not 0 < x < PRIME for x in holders):
        raise ValueError("holders' x-coordinates must be distinct and nonzero")
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in holders}


def reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """The secret from at least `threshold` shares {x: f(x)}; fewer is refused."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares cannot rebuild a secret of threshold {threshold}")
    chosen = sorted(shares)[:threshold]
    return interpolate_at_zero({x: shares[x] for x in chosen})


def interpolate_at_zero(shares: Mapping[int, int]) -> int:
    """f(0) of the unique polynomial of degree < len(shares) through the given points."""
    xs = tuple(sorted(shares))
    weights = _lagrange_weights(xs)
    return sum(w * shares[x] for w, x in zip(weights, xs, strict=True)) % PRIME


def share_to_bytes(value: int) -> bytes:
    """A field element as SHARE_BYTES big-endian bytes."""
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """The field element written by `share_to_bytes`; anything else is refused."""
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ValueError("a share must lie in [0, p)")
    return value


def _evaluate(coefficients: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coefficients):  # Horner
        acc = (acc * x + c) % PRIME
    return acc


@lru_cache(maxsize=256)
def _lagrange_weights(xs: tuple[int, ...]) -> tuple[int, ...]:
    # Cached because one round rebuilds many secrets from the same set of responders.
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(weights)
