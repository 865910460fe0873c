"""The closed set of messages between a parent and its children: tasks down, replies up."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from worldlm.core.state import State

Factors = tuple[torch.Tensor, torch.Tensor]  # (U S: (m, r), V: (n, r)); the matrix is U S V^T
Residual = dict[str, Factors]  # parameter name -> factors of a low-rank residual (WorldLM)


@dataclass(frozen=True)
class EvalResult:
    """A model's validation loss on a leaf's held-out blocks."""

    loss: float  # mean next-token cross-entropy (nats)
    tokens: int  # predicted tokens

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))


__all__ = [
    "EvalReport",
    "EvalResult",
    "EvalTask",
    "Factors",
    "Layout",
    "Record",
    "Residual",
    "RoutedResidual",
    "SignedStatement",
    "State",
    "TaskRefusal",
    "TrainTask",
    "Update",
    "tensor_bytes",
]

Record = dict[str, Any]  # one metrics row: {"round", "node", "kind", ...}
Layout = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (wire dtype name, shape)


@dataclass(frozen=True)
class RoutedResidual:
    """Another sub-federation's residual embedding, routed by the root with its weight."""

    source: str
    weight: float
    residual: Residual


@dataclass(frozen=True)
class SignedStatement:
    """One node's signed statement about a task it sends down (`security.downlink`)."""

    statement: str  # canonical JSON
    signature: bytes  # DER-encoded ECDSA signature over the statement's UTF-8 bytes
    certificate: bytes  # the signer's certificate (PEM), issued by the federation's CA


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
    # How `state` is compressed on the link ("none": the weights themselves; else the compact
    # tensors of a `compression` codec), and the dtype and shape each weight decodes to.
    encoding: str = "none"
    layout: Layout = field(default_factory=dict)
    # The root's and each forwarding aggregator's signed statements (deployments with TLS).
    signatures: tuple[SignedStatement, ...] = ()


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
    # The root's and each forwarding aggregator's signed statements, as on a TrainTask.
    signatures: tuple[SignedStatement, ...] = ()


@dataclass
class Update:
    """A child's reply to a TrainTask: new weights, their weight (tokens), and metrics rows.

    `state` holds the model times `scale`: a leaf sends its weights (scale 1); a FedAvg
    aggregator forwards its exact weighted sum with scale = the sum's total weight, so its parent
    adds sums instead of re-weighting a rounded mean (DESIGN §4).

    On a compressed link (`encoding` other than "none") `state` instead holds the compact
    tensors of the child's change `model - sent`, which the parent decodes back to a plain
    update before it checks anything (`compression.link`)."""

    sender: str
    round: int
    nonce: str
    state: State
    weight: float
    records: list[Record] = field(default_factory=list)
    scale: float = 1.0
    residual: Residual = field(default_factory=dict)  # WorldLM: low-rank summary of K - K_ref
    encoding: str = "none"  # a `compression` codec name
    topk_fraction: float | None = None  # encoding "topk": the share of entries kept

    def model(self) -> State:
        """The child's model itself (`state / scale`), of a plain (decoded) update."""
        if self.scale == 1.0:
            return self.state
        return {k: v / self.scale for k, v in self.state.items()}


@dataclass
class EvalReport:
    """A child's reply to an EvalTask: results per evaluation set (named after its leaf)."""

    sender: str
    nonce: str
    results: dict[str, EvalResult]


@dataclass(frozen=True)
class TaskRefusal:
    """A child's answer to a well-formed task it will not act on (its signed provenance does
    not hold): its parent records why and leaves it out of the round at once."""

    sender: str
    nonce: str
    reason: str


def tensor_bytes(message: TrainTask | Update) -> int:
    """Bytes of the tensors a message carries (its weights, or their compact tensors on a
    compressed link, and residual factors): what the link moves for it, whatever the transport,
    so that rows compare across in-process and deployed runs. Headers and metadata are left
    out (a few hundred bytes; a compressed task's layout adds one short entry per tensor)."""
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
