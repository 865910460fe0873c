"""FedBuff's simulated clock (`fedbuff.clock = "simulated"`): each child trains at dispatch,
through the ordinary transport, and its checked change is held until its simulated arrival.

A reply passes every check of a plain round when it is collected (`Aggregator._take`); what it
changed is held until the dispatch time plus `sim_clock.training_seconds`, drawn from (run seed,
child path, dispatch count) and the child's `slowdown`. Arrivals come in simulated-time order,
ties by path, so a run and its resume see the same clock and fold the same updates bit for bit.
The work in flight, each held change included, is checkpointed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from worldlm.core.messages import State
from worldlm.federation.arrivals import (
    HeldChanges,
    Pending,
    RoundHost,
    pending_entries,
    pending_from,
)
from worldlm.federation.round_state import Collected
from worldlm.federation.sim_clock import training_seconds


class SimulatedArrivals:
    """An `arrivals.ArrivalSource` on a simulated clock."""

    def __init__(self, agg: RoundHost, slowdowns: Mapping[str, float], dtype: torch.dtype) -> None:
        self.agg, self.dtype = agg, dtype
        self.config = agg.settings.fedbuff
        self.slowdowns = dict(slowdowns)
        self.clock = 0.0  # simulated seconds
        self.flying: list[Pending] = []  # in arrival order (time, then path)
        self.dispatched: list[str] = []  # this round's dispatches, settled when sent
        self.benched: list[str] = []

    def now(self) -> float:
        return self.clock

    def in_flight(self) -> list[str]:
        return [p.child for p in self.flying]

    def begin_round(self) -> Collected:
        self.dispatched, self.benched = [], []
        return Collected(HeldChanges({}, self.dtype))

    def dispatch(
        self,
        chosen: list[str],
        state: State,
        version: int,
        counts: Mapping[str, int],
        got: Collected,
        rounds: tuple[int, int],
    ) -> None:
        """Train `chosen` at once; hold each accepted change until its simulated arrival."""
        agg, (r, global_round) = self.agg, rounds
        sent, seen = agg._send(chosen, state, r, global_round)
        held = HeldChanges(seen, self.dtype)
        sub = agg._collect_plain(sent, seen, state, held, None, rounds)
        # A refused reply is known at dispatch here, so its child's miss is counted now.
        self.benched = agg._settle(sub, chosen, r, global_round)
        self.dispatched = list(chosen)
        got.records.extend(sub.records)
        got.answered |= sub.answered
        got.traffic = sub.traffic
        for child in chosen:
            count = counts.get(child, 0)
            slowdown = self.slowdowns.get(child, 1.0)
            seconds = training_seconds(self.config.speed, agg.ctx.seed, child, count, slowdown)
            change = held.changes.get(child)
            weight = held.weights.get(child, 0.0)
            self.flying.append(
                Pending(child, version, self.clock, self.clock + seconds, weight, change)
            )
        self.flying.sort(key=lambda p: (p.arrives, p.child))

    def arrivals(self, got: Collected, rounds: tuple[int, int]) -> Iterator[Pending]:
        del got, rounds  # every reply was checked and recorded at dispatch
        while self.flying:
            pending = self.flying.pop(0)
            self.clock = max(self.clock, pending.arrives)
            yield pending

    def settle(self, got: Collected, rounds: tuple[int, int]) -> tuple[list[str], list[str]]:
        del got, rounds  # settled at dispatch
        return self.dispatched, self.benched

    def snapshot(self) -> tuple[State, dict[str, Any]]:
        tensors, entries = pending_entries("in_flight", self.flying)
        return tensors, {"clock": self.clock, "in_flight": entries}

    def restore(self, tensors: State, meta: dict[str, Any]) -> None:
        self.clock = float(meta.get("clock", 0.0))
        self.flying = pending_from("in_flight", tensors, meta.get("in_flight", []))
