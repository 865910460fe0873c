"""FedBuff's server steps at one aggregator (Nguyen et al. 2022), on a simulated or a real clock.

One round of a FedBuff aggregator is one server step:

1. Idle children (fewest dispatches first, then by path) are sent the current model until
   `fedbuff.concurrency` are in flight.
2. Arrivals are taken in the order their source gives them (`arrivals.ArrivalSource`: the
   simulated clock of `sim_arrivals`, or the real one of `real_arrivals`). Each reply passed
   every check of a plain round (`Aggregator._take`). An update more than `max_staleness` steps
   stale is dropped (recorded and audited); a refused reply, or none, just frees its child. The
   others go into the buffer.
3. With K updates buffered, the model takes the step `strategies.fedbuff.buffered_fold`, the
   version goes up, and the clock stands at the K-th arrival. The children whose updates were
   folded are idle and get new work at the start of the next round, with the new model.

A child is never sent work while its update waits in the buffer, so each step folds at most one
update per child (its weight stays within what its parent allows per round, and the step is a
FedAvg over distinct children). In the paper a client that finishes is replaced at once, with
the model of that moment; here the replacement waits for the step, and starts from its result.
If everything in flight arrives before the buffer fills (refusals, a dropped stale update), the
round steps with what it buffered if that is at least `min_replies` (a child refused every
time, or gone, must not hold the steps forever), and otherwise makes no step
("too_few_replies"), the buffer waiting for the next round's dispatches.

The buffer is checkpointed with the aggregator, and so is what the source keeps of its work in
flight (all of it on the simulated clock, so that a resumed run continues bit for bit; on a real
clock, only who was in flight: that work is lost). Held changes cost one model copy per update.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from worldlm.core.messages import Record, State
from worldlm.core.transport import ChildInfo
from worldlm.errors import ConfigError
from worldlm.federation.arrivals import (
    ArrivalSource,
    Pending,
    RoundHost,
    pending_entries,
    pending_from,
)
from worldlm.federation.real_arrivals import RealArrivals
from worldlm.federation.round_state import Collected, RoundOutcome
from worldlm.federation.selection import eligible
from worldlm.federation.sim_arrivals import SimulatedArrivals
from worldlm.strategies.catalog import SUM_DTYPES
from worldlm.strategies.fedbuff import (
    buffered_fold,
    fedbuff_buffer,
    fedbuff_concurrency,
    staleness_weight,
)


class BufferedRounds:
    """The round runner (`round_runner.RoundRunner`) of a FedBuff aggregator: a part of the
    aggregator in a module of its own, which it reaches through `RoundHost`. Where updates come
    from and when they arrive is its source's business (`fedbuff.clock`), chosen once here."""

    def __init__(self, agg: RoundHost, slowdowns: Mapping[str, float]) -> None:
        if agg.key_policy is not None or agg.router is not None:
            raise ConfigError(
                f"nodes.{agg.path}.strategy: 'fedbuff' cannot combine WorldLM's key layers, "
                "which need one round's cohort trained from one K_p (docs/fedbuff.md)"
            )
        self.agg = agg
        self.config = agg.settings.fedbuff
        self.dtype = SUM_DTYPES[agg.settings.sum_dtype]
        self.source: ArrivalSource = (
            RealArrivals(agg, self.dtype)
            if self.config.clock == "real"
            else SimulatedArrivals(agg, slowdowns, self.dtype)
        )
        self.version = 0  # server steps taken
        self.dispatches: dict[str, int] = {}  # per child: tasks sent so far
        self.buffer: list[Pending] = []

    def run(self, state: State, global_round: int) -> RoundOutcome:
        """One server step: top up the children in flight, take arrivals until K are buffered,
        fold them into `state`."""
        agg, started, r = self.agg, time.perf_counter(), self.agg.rounds_done
        infos = agg.transport.children(agg.path)
        size = fedbuff_buffer(self.config, fedbuff_concurrency(self.config, len(infos)))
        got = self.source.begin_round()
        chosen = self._dispatch(state, infos, got, (r, global_round))
        dropped = self._take_arrivals(size, got, (r, global_round))
        settled, benched = self.source.settle(got, (r, global_round))
        folded: list[Pending] = []
        new_state, status, rows = state, "too_few_replies", []
        # K updates; or, with nothing left in flight, what is buffered (at least min_replies):
        # a child refused every time, or gone, must not hold the steps forever.
        stalled = not self.source.in_flight() and len(self.buffer) >= agg.settings.min_replies
        if self.buffer and (len(self.buffer) >= size or stalled):
            folded, self.buffer = self.buffer, []
            rows = [self._folded_row(p) for p in folded]  # staleness before the step
            new_state, status = self._step(state, folded, rows, global_round)
        weight = float(sum(p.weight for p in folded)) if status == "ok" else 0.0
        done = Collected(got.aggregation, got.records, {p.child for p in folded}, weight)
        done.traffic, done.status = got.traffic, status
        done.row = {
            "clock": self.source.now(),
            "version": self.version,
            "in_flight": len(self.source.in_flight()),
            "buffered": len(self.buffer),
            "folded": rows,
            "dropped_stale": dropped,
            **got.row,  # the source's own (a real clock's work lost at a resume)
        }
        if status == "too_few_replies":
            done.row["reason"] = (
                f"{len(self.buffer)} of K={size} updates buffered (fewer than min_replies) and "
                "nothing left in flight"
            )
        row = agg._aggregate_record(global_round, r, chosen, done, started, benched)
        # Sent work (this round or before) and learned this round that no valid update came.
        row["missing"] = sorted(set(settled) - got.answered)
        done.records.append(row)
        agg._audit_round(row, new_state if status == "ok" else None)
        agg.rounds_done += 1
        agg.state = new_state
        return RoundOutcome(new_state, new_state, 1.0, weight, done.records)

    def _dispatch(
        self, state: State, infos: list[ChildInfo], got: Collected, rounds: tuple[int, int]
    ) -> list[str]:
        """Send `state` to idle children up to the concurrency; returns them."""
        agg, r = self.agg, rounds[0]
        resources = {c.path: c.resources for c in infos}
        pool = eligible(resources, agg.settings.sample, agg.benched_until, r)
        in_flight = self.source.in_flight()
        busy = {*in_flight, *(p.child for p in self.buffer)}
        # Fewest dispatches first: with concurrency below the children, each gets its turn.
        idle = sorted(
            (c for c in pool if c not in busy), key=lambda c: (self.dispatches.get(c, 0), c)
        )
        slots = fedbuff_concurrency(self.config, len(infos)) - len(in_flight)
        chosen = sorted(idle[: max(slots, 0)])
        if chosen:
            self.source.dispatch(chosen, state, self.version, self.dispatches, got, rounds)
            for child in chosen:
                self.dispatches[child] = self.dispatches.get(child, 0) + 1
        return chosen

    def _take_arrivals(self, size: int, got: Collected, rounds: tuple[int, int]) -> list[Record]:
        """Take arrivals until `size` updates are buffered or nothing is in flight; returns
        the updates dropped as too stale."""
        dropped: list[Record] = []
        limit = self.config.max_staleness
        if len(self.buffer) >= size:
            return dropped
        for pending in self.source.arrivals(got, rounds):
            if pending.change is None:
                continue  # refused or left out, recorded: its child is idle again
            staleness = self.version - pending.version
            if limit is not None and staleness > limit:
                dropped.append(
                    {"sender": pending.child, "staleness": staleness, "arrived": pending.arrives}
                )
                self.agg._audit(
                    "update_dropped_stale",
                    rounds[1],
                    sender=pending.child,
                    staleness=staleness,
                    max_staleness=limit,
                    dispatched_version=pending.version,
                )
                continue
            self.buffer.append(pending)
            if len(self.buffer) >= size:
                break
        return dropped

    def _step(
        self, state: State, folded: list[Pending], rows: list[Record], global_round: int
    ) -> tuple[State, str]:
        """The model after folding `folded` (described by `rows`) and the round's status; a
        non-finite result changes nothing (its updates are spent, as a plain round's are)."""
        changes = [p.change for p in folded if p.change is not None]  # all of them: buffered
        factors = [float(row["factor"]) for row in rows]
        weights = [p.weight for p in folded]
        model = buffered_fold(state, changes, weights, factors, self.config.server_lr, self.dtype)
        if not all(bool(torch.isfinite(model[k]).all()) for k in changes[0]):
            return state, "non_finite_aggregate"
        self.agg._audit(
            "fedbuff_step",
            global_round,
            version=self.version + 1,
            clock=self.source.now(),
            folded=rows,
            result_digest=self.agg._digest(model),
        )
        self.version += 1
        return model, "ok"

    def _folded_row(self, pending: Pending) -> Record:
        """How an update enters the step: its staleness (server steps since its dispatch) and
        the weight s(staleness) that it gives."""
        staleness = self.version - pending.version
        factor = staleness_weight(staleness, self.config.staleness, self.config.exponent)
        return {
            "sender": pending.child,
            "staleness": staleness,
            "weight": pending.weight,
            "factor": factor,
            "sent_at": pending.sent_at,
            "arrived": pending.arrives,
        }

    # --- checkpointing -------------------------------------------------------------------
    def snapshot(self) -> tuple[State, dict[str, Any]]:
        tensors, source_meta = self.source.snapshot()
        buffered, entries = pending_entries("buffer", self.buffer)
        meta = {
            "version": self.version,
            "dispatches": dict(sorted(self.dispatches.items())),
            **source_meta,
            "buffer": entries,
        }
        return {**tensors, **buffered}, meta

    def restore(self, tensors: State, meta: dict[str, Any]) -> None:
        self.version = int(meta.get("version", 0))
        self.dispatches = {k: int(v) for k, v in meta.get("dispatches", {}).items()}
        self.buffer = pending_from("buffer", tensors, meta.get("buffer", []))
        self.source.restore(tensors, meta)
