"""The server's side of one secure aggregation round: route, then unmask only the sum.

The server relays keys and sealed shares between neighbours, collects masked inputs y_v from
the survivors U3, then asks the survivors for shares: of b_v for each v in U3 (to strip the
self-masks) and of the s private key of each client u that shared keys but sent no input (to
strip the pairwise masks its surviving neighbours added for it). What it learns is
sum_{v in U3} x_v mod 2^bits and nothing about any single x_v (Bonawitz et al. 2017, Thm 6.2).

A client whose secrets could no longer be rebuilt - fewer than t_u of its neighbours still
live after AdvertiseKeys or ShareKeys - is left out as if it had dropped; once inputs are
masked nobody can be left out, so too few answers abort the round and release nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from worldlm.secagg import keys, shamir
from worldlm.secagg.errors import SecAggAborted, SecAggProtocolError
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
from worldlm.secagg.plan import RoundPlan
from worldlm.secagg.prg import SEED_BYTES, expand_mask, mask_sign
from worldlm.secagg.ring import add_signed, modulus_mask, reduce, wire_dtype


class _FromClient(Protocol):
    @property
    def sender(self) -> str: ...


@dataclass(frozen=True, kw_only=True)
class MaskedSum:
    """What the server releases: the sum of the included clients' encoded inputs."""

    total: np.ndarray  # (length,) uint64 in [0, 2^bits): sum of Quantizer.encode(x_v), v in U3
    included: tuple[str, ...]  # U3, sorted


class SecAggServer:
    """The server's state machine; feed it each stage's messages in order."""

    def __init__(self, plan: RoundPlan) -> None:
        self.plan = plan
        self.seconds = 0.0  # compute time spent in this object, for cost reports
        self.result: MaskedSum | None = None
        self._stage: Stage | None = Stage.ADVERTISE_KEYS  # None once finished or aborted
        self._alive = set(plan.clients)
        self._c_public: dict[str, bytes] = {}
        self._s_public: dict[str, bytes] = {}
        self._sealed: dict[str, dict[str, bytes]] = {}
        self._sharers: set[str] = set()  # U2 after pruning
        self._masked: dict[str, np.ndarray] = {}

    def setups(self) -> dict[str, ClientSetup]:
        """The ClientSetup each client receives before the round."""
        return {c: self.plan.setup_for(c) for c in self.plan.clients}

    def receive_keys(self, messages: Sequence[AdvertiseKeys]) -> dict[str, KeysBroadcast]:
        """End of AdvertiseKeys: each kept client gets its live neighbours' public keys."""
        with self._stage_step(Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS):
            senders = self._senders(messages)
            for m in messages:
                if len(m.c_public) != keys.KEY_BYTES or len(m.s_public) != keys.KEY_BYTES:
                    raise SecAggProtocolError(f"{m.sender}: public keys must be 32 bytes")
                if m.c_public == m.s_public:
                    raise SecAggProtocolError(f"{m.sender}: c and s keys must differ")
                self._c_public[m.sender], self._s_public[m.sender] = m.c_public, m.s_public
            self._alive = self._prune(senders)
            return {
                u: KeysBroadcast(
                    c_public={v: self._c_public[v] for v in self._live_neighbours(u)},
                    s_public={v: self._s_public[v] for v in self._live_neighbours(u)},
                )
                for u in sorted(self._alive)
            }

    def receive_shares(self, messages: Sequence[ShareKeys]) -> dict[str, SharesDelivery]:
        """End of ShareKeys: each kept client gets the sealed shares addressed to it."""
        with self._stage_step(Stage.SHARE_KEYS, Stage.MASKED_INPUT):
            senders = self._senders(messages)
            for m in messages:
                if set(m.sealed) != set(self._live_neighbours(m.sender)):
                    raise SecAggProtocolError(f"{m.sender}: shares not addressed to its neighbours")
                self._sealed[m.sender] = m.sealed
            self._alive = self._sharers = self._prune(senders)
            return {
                v: SharesDelivery(sealed={u: self._sealed[u][v] for u in self._live_neighbours(v)})
                for v in sorted(self._alive)
            }

    def receive_masked(self, messages: Sequence[MaskedInput]) -> dict[str, UnmaskRequest]:
        """End of MaskedInputCollection: ask each survivor for the shares that unmask the sum."""
        with self._stage_step(Stage.MASKED_INPUT, Stage.UNMASKING):
            survivors = self._senders(messages)
            bits, dtype = self.plan.quantizer.bits, wire_dtype(self.plan.quantizer.bits)
            for m in messages:
                y = m.masked
                if (
                    not isinstance(y, np.ndarray)
                    or y.dtype != dtype
                    or y.shape != (self.plan.length,)
                ):
                    raise SecAggProtocolError(
                        f"{m.sender}: masked input must be ({self.plan.length},) {dtype}"
                    )
                if bits < dtype.itemsize * 8 and (y.astype(np.uint64) > modulus_mask(bits)).any():
                    raise SecAggProtocolError(f"{m.sender}: masked value out of Z_2^{bits}")
                self._masked[m.sender] = y
            self._alive = survivors
            self._require_holders(survivors)
            return {v: self._request_for(v) for v in sorted(survivors)}

    def receive_unmasking(self, messages: Sequence[UnmaskingShares]) -> MaskedSum:
        """Unmasking: rebuild the needed secrets, strip every mask, release the sum (only)."""
        with self._stage_step(Stage.UNMASKING, None):
            responders = self._senders(messages)
            seed_shares: dict[str, dict[int, int]] = {v: {} for v in self._alive}
            key_shares: dict[str, dict[int, int]] = {u: {} for u in self._sharers - self._alive}
            for m in messages:
                request = self._request_for(m.sender)
                if set(m.seed_shares) != set(request.survivors) or set(m.key_shares) != set(
                    request.dropped
                ):
                    raise SecAggProtocolError(f"{m.sender}: answered other shares than asked")
                x = self.plan.index[m.sender]
                try:
                    for v, share in m.seed_shares.items():
                        seed_shares[v][x] = shamir.share_from_bytes(share)
                    for u, share in m.key_shares.items():
                        key_shares[u][x] = shamir.share_from_bytes(share)
                except ValueError as e:
                    raise SecAggProtocolError(f"{m.sender}: malformed share: {e}") from e
            self._require_holders(responders)
            self.result = self._unmask(seed_shares, key_shares)
            return self.result

    def _unmask(
        self, seed_shares: dict[str, dict[int, int]], key_shares: dict[str, dict[int, int]]
    ) -> MaskedSum:
        bits, n, t = self.plan.quantizer.bits, self.plan.length, self.plan.thresholds
        survivors = self._alive
        # Rebuild every secret before touching the vectors, so an inconsistency aborts early.
        try:
            self_seeds = {
                v: shamir.reconstruct(s, t[v]).to_bytes(SEED_BYTES, "big")
                for v, s in seed_shares.items()
            }
        except OverflowError as e:
            raise self._abort("shares of a self-mask seed are inconsistent") from e
        dropped_keys = {}
        for u, s in key_shares.items():
            if not self.plan.graph[u] & survivors:
                continue  # no survivor masked with u: nothing to strip
            try:
                key = keys.private_from_int(shamir.reconstruct(s, t[u]))
            except (OverflowError, ValueError) as e:
                raise self._abort(f"shares of {u!r}'s mask key are inconsistent") from e
            if keys.public_bytes(key) != self._s_public[u]:
                raise self._abort(f"shares of {u!r}'s mask key do not match its public key")
            dropped_keys[u] = key
        total = np.zeros(n, dtype=np.uint64)  # (n,) running sum mod 2^64
        for v in sorted(survivors):
            add_signed(total, self._masked[v], +1)
            add_signed(total, expand_mask(self_seeds[v], n, bits), -1)
        for u, key in sorted(dropped_keys.items()):
            for v in sorted(self.plan.graph[u] & survivors):
                seed = keys.agree(
                    key,
                    self._s_public[v],
                    purpose=keys.MASK,
                    session=self.plan.session,
                    pair=(u, v),
                )
                # v added mask_sign(v, u) * PRG(s_uv); take it back out.
                add_signed(total, expand_mask(seed, n, bits), -mask_sign(v, u))
        return MaskedSum(total=reduce(total, bits), included=tuple(sorted(survivors)))

    def _require_holders(self, responders: set[str]) -> None:
        """Abort unless every needed secret still has t holders among `responders`."""
        short = []
        for c in sorted(self._sharers):
            needed = c in self._alive or bool(self.plan.graph[c] & self._alive)
            holders = len(self.plan.graph[c] & responders)
            if needed and holders < self.plan.thresholds[c]:
                short.append(f"{c} ({holders}/{self.plan.thresholds[c]})")
        if not self._alive:
            raise self._abort("no masked input arrived")
        if short:
            raise self._abort(
                "too few live neighbours hold the secrets of " + ", ".join(short) + "; "
                "nothing is released"
            )

    def _prune(self, alive: set[str]) -> set[str]:
        """Drop clients with fewer live neighbours than their threshold, until none is left."""
        alive = set(alive)
        while short := {
            u for u in alive if len(self.plan.graph[u] & alive) < self.plan.thresholds[u]
        }:
            alive -= short
        if not alive:
            raise self._abort("too few clients left for anyone's secrets to be shared safely")
        return alive

    def _live_neighbours(self, u: str) -> list[str]:
        return sorted(self.plan.graph[u] & self._alive)

    def _request_for(self, v: str) -> UnmaskRequest:
        """b-shares of v's surviving neighbours, s-key shares of its dropped ones."""
        return UnmaskRequest(
            survivors=tuple(sorted(self.plan.graph[v] & self._alive)),
            dropped=tuple(sorted(self.plan.graph[v] & (self._sharers - self._alive))),
        )

    def _senders(self, messages: Sequence[_FromClient]) -> set[str]:
        senders = [m.sender for m in messages]
        if len(set(senders)) != len(senders):
            raise SecAggProtocolError("a client sent twice in one stage")
        stray = set(senders) - self._alive
        if stray:
            raise SecAggProtocolError(f"messages from clients not in this stage: {sorted(stray)}")
        return set(senders)

    def _abort(self, reason: str) -> SecAggAborted:
        self._stage = None
        self.result = None
        return SecAggAborted(f"secure aggregation round aborted: {reason}")

    @contextmanager
    def _stage_step(self, expected: Stage, following: Stage | None) -> Iterator[None]:
        if self._stage is not expected:
            raise SecAggProtocolError(f"server: {expected} messages during {self._stage}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start
        if self._stage is expected:  # not aborted meanwhile
            self._stage = following
