"""The narrow protocol between the round engine and its children.

The engine only asks who its children are and sends them tasks; replies come back one at a time
as they arrive, so an aggregator never holds more than one child's update. A secure aggregation
round sends its four stages through the one generic `exchange` (there the parent holds every
child's masked vector until the sum is unmasked: the protocol needs them all at once). A
transport that can also keep tasks in flight across rounds (`AsyncTransport`, gRPC) lets FedBuff
run on real clocks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from worldlm.core.messages import EvalReport, EvalTask, TrainTask, Update
from worldlm.core.secure_messages import SecureMessage, SecureReply
from worldlm.errors import SHOWN_CHARS, shown


@dataclass(frozen=True)
class ChildInfo:
    """What a child tells its parent about itself."""

    path: str
    train_tokens: int  # training tokens in its subtree, for data-size weighted sampling
    # What a deployed child reported when it attached: "available", "memory_gb", "cpus", ...
    resources: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Dropout:
    """A child left out of a round, and why (disconnected, timed out, ...); or, with
    `left_out` false, a message of a child that was refused (a replay, a forged sender)."""

    path: str
    reason: str
    left_out: bool = True

    def __post_init__(self) -> None:  # both may quote what a hostile peer sent
        object.__setattr__(self, "path", shown(self.path))
        object.__setattr__(self, "reason", shown(self.reason, 4 * SHOWN_CHARS))


class NodeHandler(Protocol):
    """A node as seen by the transport: it answers tasks addressed to it."""

    path: str

    def info(self) -> ChildInfo: ...

    def handle_train(self, task: TrainTask) -> Update: ...

    def handle_eval(self, task: EvalTask) -> EvalReport: ...

    def handle_secure(self, message: SecureMessage) -> SecureReply: ...


class Transport(Protocol):
    def children(self, parent: str) -> list[ChildInfo]:
        """The children of `parent`, in path order."""
        ...

    def train(self, tasks: Sequence[TrainTask]) -> Iterator[Update]:
        """Send each task to its recipient; yield replies as they arrive."""
        ...

    def evaluate(self, tasks: Sequence[EvalTask]) -> Iterator[EvalReport]:
        """Send each evaluation task; yield reports as they arrive."""
        ...

    def exchange(self, messages: Sequence[SecureMessage]) -> Iterator[SecureReply]:
        """Send each message of a secure aggregation stage to its recipient; yield replies as
        they arrive (children that do not answer show up in `dropouts`)."""
        ...

    def dropouts(self) -> list[Dropout]:
        """Children left out and messages refused since the last call; cleared by the call."""
        ...


@runtime_checkable
class AsyncTransport(Protocol):
    """A transport that can send train tasks without waiting for their replies, and hand the
    replies over in the order they really arrive, across any number of rounds (FedBuff on real
    clocks). `train`, `evaluate` and `exchange` keep working beside it."""

    def dispatch(self, tasks: Sequence[TrainTask]) -> None:
        """Send each task and return at once; one task in flight per child at most."""
        ...

    def arrivals(self, timeout: float | None = None) -> Iterator[Update | Dropout]:
        """The outcome of each dispatched task as it arrives: its reply, checked as `train`
        checks one, or a `Dropout` saying why none will come. Ends once nothing is in flight,
        or after `timeout` seconds without an arrival (None: each task's own deadline)."""
        ...

    def abandon(self, reason: str) -> list[str]:
        """Forget every task in flight (their work is lost, as at a resume): a reply that
        still comes for one is refused with `reason`. Returns the children they were sent."""
        ...
