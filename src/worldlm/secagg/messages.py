"""The messages of one secure aggregation round, as plain data a transport can carry.

The four stages follow Bonawitz et al. 2017 (Fig. 4): AdvertiseKeys, ShareKeys,
MaskedInputCollection and Unmasking. Each client-to-server message is answered by one
server-to-client message per client that carries only what that client's neighbours sent, so
in SecAgg+ mode a client's traffic grows with its k neighbours, not with the cohort. Fields are
bytes, str, int, float, dicts and tuples of those, and numpy arrays; `wire_size` counts them
as a compact binary codec would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class Stage(StrEnum):
    """A protocol stage; a client that drops "at" a stage never sends that stage's message."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASKING = "unmasking"


@dataclass(frozen=True, kw_only=True)
class ClientSetup:
    """Server -> client before the round: the session, its neighbours and the codec."""

    session: bytes
    client: str
    index: int  # this client's Shamir x-coordinate (nonzero)
    neighbours: dict[str, int]  # neighbour id -> its x-coordinate
    threshold: int  # shares of this client's secrets needed to rebuild them
    bits: int
    clip_range: float
    max_clients: int
    length: int


@dataclass(frozen=True, kw_only=True)
class AdvertiseKeys:
    """Client -> server, AdvertiseKeys: the public halves of the client's c (channel) and s (mask)
    key pairs."""

    sender: str
    c_public: bytes
    s_public: bytes


@dataclass(frozen=True, kw_only=True)
class KeysBroadcast:
    """Server -> client, after AdvertiseKeys: the keys of the neighbours that advertised."""

    c_public: dict[str, bytes]
    s_public: dict[str, bytes]


@dataclass(frozen=True, kw_only=True)
class ShareKeys:
    """Client -> server, ShareKeys: for each neighbour, AES-GCM(its shares of b_u and s_u)."""

    sender: str
    sealed: dict[str, bytes]  # receiver -> nonce || ciphertext


@dataclass(frozen=True, kw_only=True)
class SharesDelivery:
    """Server -> client, after ShareKeys: the sealed shares addressed to it, by sender."""

    sealed: dict[str, bytes]  # sender -> nonce || ciphertext


@dataclass(frozen=True, kw_only=True)
class MaskedInput:
    """Client -> server, MaskedInputCollection:
    y_u = x_u + PRG(b_u) + sum_v ±PRG(s_uv) mod 2^bits."""

    sender: str
    masked: np.ndarray  # (length,) in ring.wire_dtype(bits)


@dataclass(frozen=True, kw_only=True)
class UnmaskRequest:
    """Server -> client, after MaskedInputCollection: which of its neighbours' inputs arrived
    and which did not; the client reveals b-shares for the first, s-key shares for the second."""

    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class UnmaskingShares:
    """Client -> server, Unmasking: the requested shares, each shamir.SHARE_BYTES long."""

    sender: str
    seed_shares: dict[str, bytes]  # survivor -> share of its self-mask seed b
    key_shares: dict[str, bytes]  # dropped -> share of its s private key


Message = (
    ClientSetup
    | AdvertiseKeys
    | KeysBroadcast
    | ShareKeys
    | SharesDelivery
    | MaskedInput
    | UnmaskRequest
    | UnmaskingShares
)


def wire_size(value: object) -> int:
    """Bytes `value` takes in a compact length-prefixed binary encoding (4-byte prefixes,
    8-byte numbers, arrays as their raw bytes)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(wire_size(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, bytes):
        return 4 + len(value)
    if isinstance(value, str):
        return 4 + len(value.encode())
    if isinstance(value, int | float):
        return 8
    if isinstance(value, np.ndarray):
        return 16 + value.nbytes  # dtype and shape, then the data
    if isinstance(value, dict):
        return 4 + sum(wire_size(k) + wire_size(v) for k, v in value.items())
    if isinstance(value, tuple | list):
        return 4 + sum(wire_size(v) for v in value)
    raise TypeError(f"no wire size for {type(value).__name__}")
