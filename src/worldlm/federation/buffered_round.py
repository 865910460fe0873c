"""FedBuff's server steps at one aggregator (Nguyen et al. 2022), on a simulated clock.

One round of a FedBuff aggregator is one server step:

1. Idle children (fewest dispatches first, then by path) are sent the current model until
   `fedbuff.concurrency` are in flight. In simulation each trains at once, through the normal
   transport; its reply passes every check of a plain round (`Aggregator._take`: reply_check,
   record_check), and what it changed (its model minus the model it was sent) is held until its
   simulated arrival: the dispatch time plus `sim_clock.training_seconds`.
2. Arrivals are taken in simulated-time order, ties by path. An update more than
   `max_staleness` steps stale is dropped (recorded and audited); a refused reply, or none,
   just frees its child. The others go into the buffer.
3. With K updates buffered, the model takes the step `strategies.fedbuff.buffered_fold`, the
   version goes up, and the clock stands at the K-th arrival. The children whose updates were
   folded are idle and get new work at the start of the next round, with the new model.

A child is never sent work while its update waits in the buffer, so each step folds at most one
update per child (its weight stays within what its parent allows per round, and the step is a
FedAvg over distinct children). In the paper a client that finishes is replaced at once, with
the model of that moment; here the replacement waits for the step, and starts from its result.
If everything in flight arrives before the buffer fills (refusals, a dropped stale update), the
round makes no step ("too_few_replies"), and the buffer waits for the next round's dispatches.

In-flight work and the buffer are checkpointed with the aggregator, so a resumed run continues
bit for bit. Held changes cost one model copy per child in flight: simulation only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from worldlm.config import AggregatorConfig
from worldlm.core.messages import Record, State, TrainTask, Update
from worldlm.core.transport import ChildInfo, Transport
from worldlm.errors import ConfigError
from worldlm.federation.context import RunContext
from worldlm.federation.key_layers import KeyLayerRound
from worldlm.federation.round_state import Collected, RoundOutcome
from worldlm.federation.selection import eligible
from worldlm.federation.sim_clock import training_seconds
from worldlm.strategies.catalog import SUM_DTYPES
from worldlm.strategies.fedbuff import (
    buffered_fold,
    fedbuff_buffer,
    fedbuff_concurrency,
    staleness_weight,
)
from worldlm.strategies.registry import RoundAggregation


class RoundHost(Protocol):
    """What the runner uses of its aggregator (`Aggregator`): its place and settings, and its
    own steps of a round, so that a FedBuff reply is sent, checked, refused and recorded exactly
    where a plain round's would be. (A protocol, not the class: the aggregator imports this.)"""

    rounds_done: int
    state: State

    @property
    def path(self) -> str: ...

    @property
    def settings(self) -> AggregatorConfig: ...

    @property
    def transport(self) -> Transport: ...

    @property
    def ctx(self) -> RunContext: ...

    @property
    def key_policy(self) -> object: ...

    @property
    def router(self) -> object: ...

    @property
    def benched_until(self) -> dict[str, int]: ...

    def _send(
        self, chosen: list[str], state: State, r: int, global_round: int
    ) -> tuple[dict[str, TrainTask], dict[str, TrainTask]]: ...

    def _collect_plain(
        self,
        sent: dict[str, TrainTask],
        seen: dict[str, TrainTask],
        state: State,
        aggregation: RoundAggregation,
        key_round: KeyLayerRound | None,
        rounds: tuple[int, int],
    ) -> Collected: ...

    def _settle(
        self, got: Collected, chosen: list[str], r: int, global_round: int
    ) -> list[str]: ...

    def _aggregate_record(
        self,
        global_round: int,
        local_round: int,
        chosen: list[str],
        got: Collected | None,
        started: float,
        benched: list[str],
    ) -> Record: ...

    def _audit(self, event: str, global_round: int, **fields: Any) -> None: ...

    def _audit_round(self, row: Record, result: State | None) -> None: ...

    def _digest(self, state: State) -> str | None: ...


@dataclass
class Pending:
    """One dispatch of a child, from the moment it is sent work until it is folded or dropped."""

    child: str
    version: int  # the server version of the model it was sent
    sent_at: float  # simulated seconds
    arrives: float
    weight: float  # tokens it trained (FedAvg's weight)
    change: State | None  # its model minus the model it was sent; None: refused or no reply


def model_change(update: Update, sent: State, dtype: torch.dtype) -> State:
    """update.state / update.scale - sent, per tensor in at least `dtype`'s precision."""
    change: State = {}
    for key, value in update.state.items():
        base = sent[key]
        wide = torch.promote_types(dtype, base.dtype) if base.is_floating_point() else dtype
        # A forwarded float64 sum is divided in float64 before it is narrowed (once).
        exact = torch.promote_types(wide, value.dtype)
        model = value.to(exact) / update.scale if update.scale != 1.0 else value.to(exact)
        change[key] = (model - base.to(exact)).to(wide)
    return change


class HeldChanges:
    """A round aggregation (`registry.RoundAggregation`) that sums nothing: it keeps each
    accepted reply's change and weight for the buffer, once the reply passed its checks."""

    def __init__(self, seen: Mapping[str, TrainTask], dtype: torch.dtype) -> None:
        self.seen, self.dtype = seen, dtype
        self.changes: dict[str, State] = {}
        self.weights: dict[str, float] = {}

    def add(self, update: Update) -> None:
        self.changes[update.sender] = model_change(
            update, self.seen[update.sender].state, self.dtype
        )
        self.weights[update.sender] = update.weight

    def result(self) -> tuple[State, float]:
        raise AssertionError("a FedBuff dispatch is buffered, never finished as a round")

    @property
    def count(self) -> int:
        return len(self.changes)


class BufferedRounds:
    """The round runner (`round_runner.RoundRunner`) of a FedBuff aggregator: a part of the
    aggregator in a module of its own, which it reaches through `RoundHost`."""

    def __init__(self, agg: RoundHost, slowdowns: Mapping[str, float]) -> None:
        if agg.key_policy is not None or agg.router is not None:
            raise ConfigError(
                f"nodes.{agg.path}.strategy: 'fedbuff' cannot combine WorldLM's key layers, "
                "which need one round's cohort trained from one K_p (docs/fedbuff.md)"
            )
        self.agg = agg
        self.config = agg.settings.fedbuff
        self.slowdowns = dict(slowdowns)
        self.dtype = SUM_DTYPES[agg.settings.sum_dtype]
        self.clock = 0.0  # simulated seconds
        self.version = 0  # server steps taken
        self.dispatches: dict[str, int] = {}  # per child: tasks sent so far
        self.in_flight: list[Pending] = []  # in arrival order (time, then path)
        self.buffer: list[Pending] = []

    def run(self, state: State, global_round: int) -> RoundOutcome:
        """One server step: top up the children in flight, take arrivals until K are buffered,
        fold them into `state`."""
        agg, started, r = self.agg, time.perf_counter(), self.agg.rounds_done
        infos = agg.transport.children(agg.path)
        size = fedbuff_buffer(self.config, fedbuff_concurrency(self.config, len(infos)))
        got, chosen, held, benched = self._dispatch(state, infos, (r, global_round))
        dropped = self._take_arrivals(size, global_round)
        folded: list[Pending] = []
        new_state, status, rows = state, "too_few_replies", []
        if len(self.buffer) >= size:
            folded, self.buffer = self.buffer, []
            rows = [self._folded_row(p) for p in folded]  # staleness before the step
            new_state, status = self._step(state, folded, rows, global_round)
        weight = float(sum(p.weight for p in folded)) if status == "ok" else 0.0
        done = Collected(held, got.records, {p.child for p in folded}, weight)
        done.traffic, done.status = got.traffic, status
        done.row = {
            "clock": self.clock,
            "version": self.version,
            "in_flight": len(self.in_flight),
            "buffered": len(self.buffer),
            "folded": rows,
            "dropped_stale": dropped,
        }
        if status == "too_few_replies":
            done.row["reason"] = (
                f"{len(self.buffer)} of K={size} updates buffered and nothing left in flight"
            )
        row = agg._aggregate_record(global_round, r, chosen, done, started, benched)
        row["missing"] = sorted(set(chosen) - set(held.changes))  # sent work, no valid reply
        done.records.append(row)
        agg._audit_round(row, new_state if status == "ok" else None)
        agg.rounds_done += 1
        agg.state = new_state
        return RoundOutcome(new_state, new_state, 1.0, weight, done.records)

    def _dispatch(
        self, state: State, infos: list[ChildInfo], rounds: tuple[int, int]
    ) -> tuple[Collected, list[str], HeldChanges, list[str]]:
        """Send `state` to idle children up to the concurrency; hold their checked changes."""
        agg, (r, global_round) = self.agg, rounds
        resources = {c.path: c.resources for c in infos}
        pool = eligible(resources, agg.settings.sample, agg.benched_until, r)
        busy = {p.child for p in [*self.in_flight, *self.buffer]}
        # Fewest dispatches first: with concurrency below the children, each gets its turn.
        idle = sorted(
            (c for c in pool if c not in busy), key=lambda c: (self.dispatches.get(c, 0), c)
        )
        slots = fedbuff_concurrency(self.config, len(infos)) - len(self.in_flight)
        chosen = sorted(idle[: max(slots, 0)])
        if not chosen:
            held = HeldChanges({}, self.dtype)
            return Collected(held), chosen, held, []
        sent, seen = agg._send(chosen, state, r, global_round)
        held = HeldChanges(seen, self.dtype)
        got = agg._collect_plain(sent, seen, state, held, None, rounds)
        benched = agg._settle(got, chosen, r, global_round)
        for child in chosen:
            count = self.dispatches.get(child, 0)
            self.dispatches[child] = count + 1
            slowdown = self.slowdowns.get(child, 1.0)
            seconds = training_seconds(self.config.speed, agg.ctx.seed, child, count, slowdown)
            change = held.changes.get(child)
            weight = held.weights.get(child, 0.0)
            pending = Pending(child, self.version, self.clock, self.clock + seconds, weight, change)
            self.in_flight.append(pending)
        self.in_flight.sort(key=lambda p: (p.arrives, p.child))
        return got, chosen, held, benched

    def _take_arrivals(self, size: int, global_round: int) -> list[Record]:
        """Advance the clock through arrivals until `size` updates are buffered or nothing is
        in flight; returns the updates dropped as too stale."""
        dropped: list[Record] = []
        limit = self.config.max_staleness
        while len(self.buffer) < size and self.in_flight:
            pending = self.in_flight.pop(0)
            self.clock = max(self.clock, pending.arrives)
            if pending.change is None:
                continue  # refused or left out, recorded at dispatch: its child is idle again
            staleness = self.version - pending.version
            if limit is not None and staleness > limit:
                dropped.append(
                    {"sender": pending.child, "staleness": staleness, "arrived": pending.arrives}
                )
                self.agg._audit(
                    "update_dropped_stale",
                    global_round,
                    sender=pending.child,
                    staleness=staleness,
                    max_staleness=limit,
                    dispatched_version=pending.version,
                )
                continue
            self.buffer.append(pending)
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
            clock=self.clock,
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
        tensors: State = {}
        entries: dict[str, list[dict[str, Any]]] = {}
        for where, items in (("in_flight", self.in_flight), ("buffer", self.buffer)):
            entries[where] = []
            for i, p in enumerate(items):
                entries[where].append(
                    {
                        "child": p.child,
                        "version": p.version,
                        "sent_at": p.sent_at,
                        "arrives": p.arrives,
                        "weight": p.weight,
                        "held": p.change is not None,
                    }
                )
                tensors.update({f"{where}#{i}#{k}": v for k, v in (p.change or {}).items()})
        meta = {
            "clock": self.clock,
            "version": self.version,
            "dispatches": dict(sorted(self.dispatches.items())),
            **entries,
        }
        return tensors, meta

    def restore(self, tensors: State, meta: dict[str, Any]) -> None:
        self.clock = float(meta.get("clock", 0.0))
        self.version = int(meta.get("version", 0))
        self.dispatches = {k: int(v) for k, v in meta.get("dispatches", {}).items()}
        lists: dict[str, list[Pending]] = {}
        for where in ("in_flight", "buffer"):
            lists[where] = []
            for i, e in enumerate(meta.get(where, [])):
                prefix = f"{where}#{i}#"
                change = {
                    k[len(prefix) :]: v.clone() for k, v in tensors.items() if k.startswith(prefix)
                }
                lists[where].append(
                    Pending(
                        str(e["child"]),
                        int(e["version"]),
                        float(e["sent_at"]),
                        float(e["arrives"]),
                        float(e["weight"]),
                        change if e["held"] else None,
                    )
                )
        self.in_flight, self.buffer = lists["in_flight"], lists["buffer"]
