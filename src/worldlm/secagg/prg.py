"""Mask expansion: a 32-byte seed stretched into a uniform vector of Z_{2^bits} by AES-256-CTR.

Every seed is used for exactly one mask: pairwise seeds come out of HKDF bound to the round's
session, and self-mask seeds are fresh random bytes each round, so the fixed all-zero initial
counter block never repeats under one key. Each value takes the low `bits` bits of its own
little-endian word of keystream; as the keystream is pseudorandom, so is every masked value,
uniformly over Z_{2^bits}.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from worldlm.secagg.ring import wire_dtype

SEED_BYTES = 32
_INITIAL_COUNTER = bytes(16)
_BLOCK = 16


def expand_mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """`length` pseudorandom values in [0, 2^bits) from `seed`, in the wire dtype for `bits`."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    dtype = wire_dtype(bits)
    nbytes = length * dtype.itemsize
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_INITIAL_COUNTER)).encryptor()
    # CTR of zeros is the keystream; update_into wants block - 1 spare bytes of output room.
    out = bytearray(nbytes + _BLOCK - 1)
    written = encryptor.update_into(bytes(nbytes), out)
    assert written == nbytes
    values = np.frombuffer(out, dtype=dtype.newbyteorder("<"), count=length)
    if bits < dtype.itemsize * 8:
        np.bitwise_and(values, values.dtype.type((1 << bits) - 1), out=values)
    return values.astype(dtype, copy=False)


def mask_sign(owner: str, peer: str) -> int:
    """+1 if `owner` adds the pairwise mask it shares with `peer`, -1 if it subtracts it, so
    that the two copies cancel in the sum."""
    return 1 if owner < peer else -1
