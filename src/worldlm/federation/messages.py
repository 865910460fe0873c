"""The closed set of messages between a parent and its children: tasks down, replies up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from worldlm.model.state import State
from worldlm.strategies.routing import Residual
from worldlm.train.evaluate import EvalResult

__all__ = ["EvalReport", "EvalTask", "Record", "RoutedResidual", "State", "TrainTask", "Update"]
Record = dict[str, Any]  # one metrics row: {"round", "node", "kind", ...}


@dataclass(frozen=True)
class RoutedResidual:
    """Another sub-federation's residual embedding, routed by the root with its weight."""

    source: str
    weight: float
    residual: Residual


@dataclass(frozen=True)
class TrainTask:
    """Train on (or, for an aggregator, federate over) `state` for one parent round."""

    run_id: str
    round: int  # the parent's own round index
    global_round: int  # the root's round index, for metrics
    sender: str  # parent path
    recipient: str  # child path
    nonce: str
    state: State
    routed: tuple[RoutedResidual, ...] = ()  # WorldLM: residuals of similar sub-federations


@dataclass(frozen=True)
class EvalTask:
    """Evaluate the model each leaf would deploy, starting from `state`; with `deployed`
    False, evaluate `state` itself (the global model) on each leaf's validation data."""

    run_id: str
    global_round: int
    sender: str
    recipient: str
    nonce: str
    state: State
    deployed: bool = True


@dataclass
class Update:
    """A child's reply to a TrainTask: new weights, their weight (tokens), and metrics rows.

    `state` holds the model times `scale`: a leaf sends its weights (scale 1); a FedAvg
    aggregator forwards its exact weighted sum with scale = the sum's total weight, so its parent
    adds sums instead of re-weighting a rounded mean (DESIGN §4)."""

    sender: str
    round: int
    nonce: str
    state: State
    weight: float
    records: list[Record] = field(default_factory=list)
    scale: float = 1.0
    residual: Residual = field(default_factory=dict)  # WorldLM: low-rank summary of K - K_ref

    def model(self) -> State:
        """The child's model itself (`state / scale`)."""
        if self.scale == 1.0:
            return self.state
        return {k: v / self.scale for k, v in self.state.items()}


@dataclass
class EvalReport:
    """A child's reply to an EvalTask: results per evaluation set (named after its leaf)."""

    sender: str
    nonce: str
    results: dict[str, EvalResult]


def tensor_bytes(message: TrainTask | Update) -> int:
    """Bytes of the tensors a message carries (its weights and residual factors): what a link
    without compression moves for it, whatever the transport, so that rows compare across
    in-process and deployed runs. Headers and metadata are left out (a few hundred bytes)."""
    tensors = list(message.state.values())
    residuals = (
        [r.residual for r in message.routed]
        if isinstance(message, TrainTask)
        else [message.residual]
    )
    for residual in residuals:
        for u, v in residual.values():
            tensors += [u, v]
    return sum(t.numel() * t.element_size() for t in tensors)
