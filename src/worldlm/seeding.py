"""Deterministic seeds derived from (run seed, node path, round, purpose).

Every random draw in a run comes from a generator seeded here, so two runs of one config are
bit-identical and a resumed run needs no saved global RNG state.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed that depends on the run seed and every part, in order."""
    text = "\x1f".join([str(seed), *(str(p) for p in parts)])
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU torch generator seeded by `derive_seed(seed, *parts)`."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *parts))
    return gen
