"""Vectors in Z_{2^bits}: uint64 arithmetic that wraps modulo 2^64, reduced by masking.

2^bits divides 2^64, so adding and subtracting in uint64 (which numpy wraps silently for
arrays) and masking with 2^bits - 1 at the end gives the same result as working modulo
2^bits throughout. On the wire a vector travels in the narrowest unsigned dtype that holds
`bits` bits, so a 32-bit round costs 4 bytes per value, as much as the float32 update.
"""

from __future__ import annotations

import numpy as np


def modulus_mask(bits: int) -> np.uint64:
    """2^bits - 1 as a uint64, the mask that reduces a uint64 modulo 2^bits."""
    return np.uint64((1 << bits) - 1)


def wire_dtype(bits: int) -> np.dtype[np.unsignedinteger]:
    """Narrowest unsigned dtype holding `bits` bits (uint8, uint16, uint32 or uint64)."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if bits <= np.dtype(dtype).itemsize * 8:
            return np.dtype(dtype)
    raise ValueError(f"no unsigned dtype holds {bits} bits")


def reduce(total: np.ndarray, bits: int) -> np.ndarray:
    """`total` (uint64, any wrapped value) reduced modulo 2^bits, in place."""
    np.bitwise_and(total, modulus_mask(bits), out=total)
    return total


def add_signed(total: np.ndarray, term: np.ndarray, sign: int) -> None:
    """total += sign * term modulo 2^64, in place; `term` may be any narrower unsigned dtype."""
    if sign > 0:
        np.add(total, term, out=total, casting="unsafe")
    else:
        np.subtract(total, term, out=total, casting="unsafe")
