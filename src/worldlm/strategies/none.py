"""No aggregation: the aggregator's model stays as it was (the `local` baseline)."""

from __future__ import annotations

from worldlm.core.messages import State, Update
from worldlm.strategies.registry import StrategySettings, register_strategy


class KeepRound:
    def __init__(self, current: State) -> None:
        self.current = current
        self.count = 0

    def add(self, update: Update) -> None:
        del update  # children keep their own models; nothing is combined
        self.count += 1

    def result(self) -> tuple[State, float]:
        return self.current, 1.0


class NoAggregation:
    def start_round(self, current: State) -> KeepRound:
        return KeepRound(current)

    def state_dict(self) -> State:
        return {}

    def load_state_dict(self, state: State) -> None:
        del state


@register_strategy("none")
def no_aggregation(settings: StrategySettings) -> NoAggregation:
    del settings  # nothing to configure
    return NoAggregation()
