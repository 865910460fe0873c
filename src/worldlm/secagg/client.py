"""A client's side of one secure aggregation round (Bonawitz et al. 2017, Fig. 4, semi-honest).

The client masks its quantized input x_u as

    y_u = x_u + PRG(b_u) + sum_{v in N(u)} sign(u, v) * PRG(s_uv)   (mod 2^bits),

sign(u, v) = +1 if u < v else -1, so pairwise masks cancel in the sum over survivors. It
Shamir-shares b_u and its s private key among its neighbours, and at the end reveals, for each
neighbour, the b-share if that neighbour's input arrived or the s-share if it did not - never
both for the same neighbour, since together they would unmask that neighbour's input.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np

from worldlm.secagg import keys, shamir
from worldlm.secagg.errors import SecAggAborted, SecAggProtocolError, SecAggRefused
from worldlm.secagg.messages import (
    AdvertiseKeys,
    ClientSetup,
    KeysBroadcast,
    MaskedInput,
    ShareKeys,
    SharesDelivery,
    Stage,
    UnmaskingShares,
    UnmaskRequest,
)
from worldlm.secagg.prg import SEED_BYTES, expand_mask, mask_sign
from worldlm.secagg.quantize import Quantizer
from worldlm.secagg.ring import add_signed, reduce, wire_dtype

Secret = Literal["seed", "key"]


class SecAggClient:
    """One client's state machine; call its four methods in order, one per stage."""

    def __init__(self, setup: ClientSetup) -> None:
        self.setup = setup
        self.quantizer = Quantizer(
            bits=setup.bits, clip_range=setup.clip_range, max_clients=setup.max_clients
        )
        self._c_key = keys.new_private_key()
        self._s_key = keys.new_private_key()
        self._seed = os.urandom(SEED_BYTES)  # b_u, the self-mask seed
        self._stage = Stage.ADVERTISE_KEYS
        self._peer_c: dict[str, bytes] = {}
        self._peer_s: dict[str, bytes] = {}
        self._held: dict[str, tuple[bytes, bytes]] = {}  # sender -> (b share, s-key share)
        self._revealed: dict[str, Secret] = {}  # peer -> which of its secrets we gave out
        self._channel_keys: dict[str, bytes] = {}

    @property
    def id(self) -> str:
        return self.setup.client

    def advertise_keys(self) -> AdvertiseKeys:
        """AdvertiseKeys: the public c and s keys."""
        self._advance(Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS)
        return AdvertiseKeys(
            sender=self.id,
            c_public=keys.public_bytes(self._c_key),
            s_public=keys.public_bytes(self._s_key),
        )

    def share_keys(self, broadcast: KeysBroadcast) -> ShareKeys:
        """ShareKeys: shares of b_u and of the s private key, sealed to each live neighbour."""
        self._advance(Stage.SHARE_KEYS, Stage.MASKED_INPUT)
        peers = sorted(broadcast.c_public)
        if set(peers) != set(broadcast.s_public) or not set(peers) <= set(self.setup.neighbours):
            raise SecAggProtocolError(f"{self.id}: keys broadcast names non-neighbours")
        if len(peers) < self.setup.threshold:
            raise SecAggAborted(
                f"{self.id}: only {len(peers)} neighbours advertised keys, "
                f"{self.setup.threshold} are needed to hold its secrets"
            )
        self._peer_c = dict(broadcast.c_public)
        self._peer_s = dict(broadcast.s_public)
        xs = [self.setup.neighbours[v] for v in peers]
        t = self.setup.threshold
        seed_shares = shamir.split(int.from_bytes(self._seed, "big"), xs, t)
        key_shares = shamir.split(keys.private_to_int(self._s_key), xs, t)
        sealed = {}
        for v, x in zip(peers, xs, strict=True):
            plaintext = shamir.share_to_bytes(seed_shares[x]) + shamir.share_to_bytes(key_shares[x])
            sealed[v] = keys.seal(
                self._channel_key(v),
                plaintext,
                session=self.setup.session,
                sender=self.id,
                receiver=v,
            )
        return ShareKeys(sender=self.id, sealed=sealed)

    def masked_input(self, delivery: SharesDelivery, values: np.ndarray) -> MaskedInput:
        """MaskedInputCollection: keep the neighbours' shares, send the masked input."""
        x = np.asarray(values, dtype=np.float64)
        if x.shape != (self.setup.length,) or not np.isfinite(x).all():
            raise ValueError(f"{self.id}: input must be {self.setup.length} finite values")
        self._advance(Stage.MASKED_INPUT, Stage.UNMASKING)
        for u, sealed in delivery.sealed.items():
            if u not in self._peer_c:
                raise SecAggProtocolError(f"{self.id}: shares from non-neighbour {u!r}")
            plain = keys.unseal(
                self._channel_key(u), sealed, session=self.setup.session, sender=u, receiver=self.id
            )
            if len(plain) != 2 * shamir.SHARE_BYTES:
                raise SecAggProtocolError(f"{self.id}: malformed shares from {u!r}")
            self._held[u] = (plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :])
        if len(self._held) < self.setup.threshold:
            raise SecAggAborted(
                f"{self.id}: only {len(self._held)} neighbours shared keys, "
                f"{self.setup.threshold} are needed"
            )
        bits, n = self.setup.bits, self.setup.length
        total = self.quantizer.encode(x)  # (n,) uint64, each in [0, max_int]
        add_signed(total, expand_mask(self._seed, n, bits), +1)
        for v in sorted(self._held):  # exactly the neighbours that will expect a mask from us
            seed = keys.agree(
                self._s_key,
                self._peer_s[v],
                purpose=keys.MASK,
                session=self.setup.session,
                pair=(self.id, v),
            )
            add_signed(total, expand_mask(seed, n, bits), mask_sign(self.id, v))
        return MaskedInput(sender=self.id, masked=reduce(total, bits).astype(wire_dtype(bits)))

    def unmask(self, request: UnmaskRequest) -> UnmaskingShares:
        """Unmasking: b-shares of surviving neighbours, s-key shares of dropped ones.

        Refuses (SecAggRefused) to name a peer in both lists, to give out the other secret of a
        peer it already answered for, or to answer for a peer whose shares it never received.
        """
        if self._stage is not Stage.UNMASKING:
            raise SecAggProtocolError(f"{self.id}: unmasking requested before its masked input")
        both = set(request.survivors) & set(request.dropped)
        if both:
            raise SecAggRefused(f"{self.id}: {sorted(both)} listed as both survived and dropped")
        wanted: list[tuple[str, Secret]] = [(u, "seed") for u in request.survivors]
        wanted += [(u, "key") for u in request.dropped]
        for u, secret in wanted:
            if u not in self._held:
                raise SecAggRefused(f"{self.id}: holds no shares of {u!r}")
            if self._revealed.get(u, secret) != secret:
                raise SecAggRefused(
                    f"{self.id}: already revealed the {self._revealed[u]} share of {u!r}; "
                    f"revealing its {secret} share too would unmask its input"
                )
        for u, secret in wanted:
            self._revealed[u] = secret
        return UnmaskingShares(
            sender=self.id,
            seed_shares={u: self._held[u][0] for u in request.survivors},
            key_shares={u: self._held[u][1] for u in request.dropped},
        )

    def _channel_key(self, peer: str) -> bytes:
        if peer not in self._channel_keys:
            self._channel_keys[peer] = keys.agree(
                self._c_key,
                self._peer_c[peer],
                purpose=keys.CHANNEL,
                session=self.setup.session,
                pair=(self.id, peer),
            )
        return self._channel_keys[peer]

    def _advance(self, expected: Stage, following: Stage) -> None:
        if self._stage is not expected:
            raise SecAggProtocolError(f"{self.id}: {expected} called during {self._stage}")
        self._stage = following
