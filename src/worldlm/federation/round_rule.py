"""What an aggregator combines a round's replies with: its strategy, or a wrapper around it.

The round asks its rule the same things, whatever the rule is: may this round run (a privacy
budget), a fresh aggregation to fold replies into, how a secure round's sum enters it, and
what the finished round adds to the record. `StrategyRule` is a plain strategy (FedAvg, a robust
rule, either norm-bounded); `privacy_policy.DPRule` wraps DP-FedAvg around the round the same
way (Flower's `DifferentialPrivacyServerSideFixedClipping(strategy)` is the model).
"""

from __future__ import annotations

from typing import Any, Protocol

from worldlm.core.messages import Record, State
from worldlm.federation.secure_round import SecureOutcome, SecureSum
from worldlm.strategies.registry import RoundAggregation, Strategy


class AuditFn(Protocol):
    def __call__(self, event: str, global_round: int, **fields: Any) -> None: ...


class RoundRule(Protocol):
    # Whether WorldLM's key layers may be attended over (not when every output must be noised).
    attends_keys: bool

    def admits(self, n_children: int, n_expected: int) -> bool:
        """Whether one more round may run (False: it would exceed a privacy budget)."""
        ...

    def start_round(
        self, current: State, n_children: int, n_selected: int, local_round: int
    ) -> RoundAggregation: ...

    def secure_clip(self, aggregation: RoundAggregation) -> float | None:
        """The L2 bound children apply to their own change in a secure round, if any."""
        ...

    def secure_fold(
        self, aggregation: RoundAggregation, current: State, out: SecureOutcome
    ) -> tuple[RoundAggregation, float]:
        """The round's aggregation with a secure round's released sum in it, and the bound on
        |new model - exact result| per value that the sum's quantization allows."""
        ...

    def finish_round(
        self, aggregation: RoundAggregation, global_round: int, local_round: int, audit: AuditFn
    ) -> list[Record]:
        """Rows the finished round adds to the metrics (and events to the audit log)."""
        ...

    def state_dict(self) -> State: ...

    def load_state_dict(self, state: State) -> None: ...

    def meta(self) -> dict[str, Any]: ...

    def load_meta(self, meta: dict[str, Any]) -> None: ...


class StrategyRule:
    """A strategy on its own: every round runs, and a secure round's sum is FedAvg's."""

    attends_keys = True

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def admits(self, n_children: int, n_expected: int) -> bool:
        del n_children, n_expected
        return True

    def start_round(
        self, current: State, n_children: int, n_selected: int, local_round: int
    ) -> RoundAggregation:
        del n_children, n_selected, local_round
        return self.strategy.start_round(current)

    def secure_clip(self, aggregation: RoundAggregation) -> float | None:
        del aggregation
        return None

    def secure_fold(
        self, aggregation: RoundAggregation, current: State, out: SecureOutcome
    ) -> tuple[RoundAggregation, float]:
        if out.changes is None:
            return aggregation, 0.0
        return SecureSum(current, out.changes, out.weight), out.error / out.weight

    def finish_round(
        self, aggregation: RoundAggregation, global_round: int, local_round: int, audit: AuditFn
    ) -> list[Record]:
        del aggregation, global_round, local_round, audit
        return []

    def state_dict(self) -> State:
        return self.strategy.state_dict()

    def load_state_dict(self, state: State) -> None:
        self.strategy.load_state_dict(state)

    def meta(self) -> dict[str, Any]:
        return {}

    def load_meta(self, meta: dict[str, Any]) -> None:
        del meta
