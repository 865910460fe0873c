"""What runs one round of an aggregator: the synchronous round, or FedBuff's buffered step.

The aggregator picks its runner once, at construction, so that a feature that changes what a
round is (FedBuff keeps children in flight across rounds) plugs in beside the round instead of
branching inside it. A runner with state of its own (work in flight, a buffer) checkpoints it
with the aggregator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from worldlm.core.messages import State
from worldlm.federation.round_state import RoundOutcome


class RoundRunner(Protocol):
    def run(self, state: State, global_round: int) -> RoundOutcome:
        """One round of this aggregator from the model `state`."""
        ...

    def snapshot(self) -> tuple[State, dict[str, Any]]:
        """The runner's own state ({} and {} when it keeps none between rounds)."""
        ...

    def restore(self, tensors: State, meta: dict[str, Any]) -> None: ...


class SynchronousRounds:
    """Every round asks its children and waits for their replies: nothing outlives a round."""

    def __init__(self, run_round: Callable[[State, int], RoundOutcome]) -> None:
        self._run_round = run_round

    def run(self, state: State, global_round: int) -> RoundOutcome:
        return self._run_round(state, global_round)

    def snapshot(self) -> tuple[State, dict[str, Any]]:
        return {}, {}

    def restore(self, tensors: State, meta: dict[str, Any]) -> None:
        del tensors, meta
