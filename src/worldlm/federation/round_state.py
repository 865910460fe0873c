"""What one round of an aggregator collects and records: its outcome, the state of its
exchange with its children, and the metrics rows of the children it left out or refused."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from worldlm.core.messages import Record, Residual, State
from worldlm.core.transport import Dropout
from worldlm.errors import UpdateRejected
from worldlm.strategies.registry import RoundAggregation


@dataclass
class RoundOutcome:
    state: State  # the new model, in the model's dtypes
    exact: State  # what goes up: the model times `scale` (the rule's exact sum, or the model)
    scale: float
    weight: float  # tokens trained by the children that took part
    records: list[Record]


@dataclass
class Collected:
    """What a round's exchange with its children gave: the aggregation to finish and the rest
    of the round's record."""

    aggregation: RoundAggregation
    records: list[Record] = field(default_factory=list)
    answered: set[str] = field(default_factory=set)
    weight: float = 0.0  # tokens trained by the children that took part
    residuals: dict[str, Residual] = field(default_factory=dict)  # WorldLM, for routing
    traffic: dict[str, int] = field(default_factory=lambda: {"bytes_down": 0, "bytes_up": 0})
    dropouts: list[Dropout] = field(default_factory=list)  # besides the transport's own
    row: Record = field(default_factory=dict)  # extra fields of the aggregate row
    status: str = "ok"
    round_keys: set[str] | None = None  # every reply of a round carries the same keys
    abstained: set[str] = field(default_factory=set)  # inner aggregators that trained nothing


def incident_row(global_round: int, path: str, dropout: Dropout) -> Record:
    """A metrics row for a child the transport left out, or a message it refused."""
    return {
        "round": global_round,
        "node": path,
        "kind": "dropped" if dropout.left_out else "refused",
        "sender": dropout.path,
        "reason": dropout.reason,
    }


def rejection_row(global_round: int, path: str, exc: UpdateRejected) -> Record:
    return {
        "round": global_round,
        "node": path,
        "kind": "rejected",
        "sender": exc.sender,
        "reason": exc.reason,
    }


def wider_than(sums: State, model: State) -> bool:
    """Whether any sum is kept in a wider dtype than the model's (float64 sums)."""
    return any(v.dtype != model[k].dtype for k, v in sums.items())


def under_prefix(prefix: str, tensors: State) -> State:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def aggregate_row(
    path: str,
    rounds: tuple[int, int],
    chosen: list[str],
    got: Collected | None,
    started: float,
    benched: list[str],
) -> Record:
    """The `aggregate` metrics row of a round at `path` (`rounds`: the root's round and this
    aggregator's); `got` None for a round not run."""
    global_round, local_round = rounds
    answered = set() if got is None else got.answered
    row: Record = {
        "round": global_round,
        "node": path,
        "kind": "aggregate",
        "local_round": local_round,
        "status": "ok" if got is None else got.status,
        "selected": chosen,
        "participants": sorted(answered),
        "missing": sorted(set(chosen) - answered),
        "benched": benched,
        "tokens": 0.0 if got is None else got.weight,
        "seconds": time.perf_counter() - started,
    }
    if got is not None:
        row.update(got.traffic, **got.row)
    return row
