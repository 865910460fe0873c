"""What FedBuff's round runner (`buffered_round.BufferedRounds`) is given: a source of updates
that says when each one arrives, on a simulated clock (`sim_arrivals`) or a real one
(`real_arrivals`), and the parts both share.

The runner owns what does not depend on the clock (who is idle, the buffer, staleness, the step,
the rows); a source owns the work in flight: how it is sent, when each reply counts as arrived,
and what of it a checkpoint keeps. The aggregator is reached through `RoundHost`, so that a
FedBuff reply is sent, checked, refused and recorded exactly where a plain round's would be.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from worldlm.config import AggregatorConfig
from worldlm.core.chunked import ChunkBuffers
from worldlm.core.messages import Record, State, TrainTask, Update
from worldlm.core.transport import Transport
from worldlm.federation.context import RunContext
from worldlm.federation.key_layers import KeyLayerRound
from worldlm.federation.round_state import Collected
from worldlm.strategies.registry import RoundAggregation


class RoundHost(Protocol):
    """What a FedBuff runner uses of its aggregator (`Aggregator`): its place and settings, and
    its own steps of a round. (A protocol, not the class: the aggregator imports the runner.)"""

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

    def _take(
        self,
        reply: Update,
        seen: dict[str, TrainTask],
        got: Collected,
        scratch: tuple[dict[int, dict[str, float]], ChunkBuffers],
        key_round: KeyLayerRound | None,
        rounds: tuple[int, int],
    ) -> None: ...

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
    sent_at: float  # seconds on the source's clock
    arrives: float  # when it arrived (a simulated source knows it at dispatch)
    weight: float  # tokens it trained (FedAvg's weight)
    change: State | None  # its model minus the model it was sent; None: refused or no reply


class ArrivalSource(Protocol):
    """Where a FedBuff aggregator's updates come from, and when each one arrives."""

    def now(self) -> float:
        """Seconds on this source's clock."""
        ...

    def in_flight(self) -> list[str]:
        """The children sent work whose update has not arrived yet."""
        ...

    def begin_round(self) -> Collected:
        """A fresh record for one round, into which `dispatch` and `arrivals` write."""
        ...

    def dispatch(
        self,
        chosen: list[str],
        state: State,
        version: int,
        counts: Mapping[str, int],
        got: Collected,
        rounds: tuple[int, int],
    ) -> None:
        """Send `state` (server version `version`) to each child of `chosen`; `counts` says
        how many times each was sent work before."""
        ...

    def arrivals(self, got: Collected, rounds: tuple[int, int]) -> Iterator[Pending]:
        """Updates in the order they arrive, each checked as a plain round checks a reply
        (change None: refused, or no reply), until nothing is in flight. The caller stops
        when its buffer is full; the rest stay in flight for the next round."""
        ...

    def settle(self, got: Collected, rounds: tuple[int, int]) -> tuple[list[str], list[str]]:
        """(the children sent work whose outcome this round learned, those benched as
        stragglers); records the round's incidents in `got`."""
        ...

    def snapshot(self) -> tuple[State, dict[str, Any]]: ...

    def restore(self, tensors: State, meta: dict[str, Any]) -> None: ...


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


def pending_entries(where: str, items: list[Pending]) -> tuple[State, list[dict[str, Any]]]:
    """`items` for a checkpoint: their changes as tensors named `where#i#key`, and the rest."""
    tensors: State = {}
    entries: list[dict[str, Any]] = []
    for i, p in enumerate(items):
        entries.append(
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
    return tensors, entries


def pending_from(where: str, tensors: State, entries: list[dict[str, Any]]) -> list[Pending]:
    """The items `pending_entries(where, ...)` saved."""
    items: list[Pending] = []
    for i, e in enumerate(entries):
        prefix = f"{where}#{i}#"
        change = {k[len(prefix) :]: v.clone() for k, v in tensors.items() if k.startswith(prefix)}
        items.append(
            Pending(
                str(e["child"]),
                int(e["version"]),
                float(e["sent_at"]),
                float(e["arrives"]),
                float(e["weight"]),
                change if e["held"] else None,
            )
        )
    return items
