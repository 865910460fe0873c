"""Strategies register themselves by name; names are strings only at the config boundary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from worldlm.config import RobustConfig
from worldlm.core.messages import State, Update
from worldlm.registration import add_entry


class RoundAggregation(Protocol):
    """One round's aggregation: fed one update at a time, then asked for the result."""

    def add(self, update: Update) -> tuple[float, float] | None:
        """Fold one reply in; a rule that clips returns (the change's norm, its clip factor)."""
        ...

    def result(self) -> tuple[State, float]:
        """The new model times a scale, and the scale (a FedAvg sum and its total weight), so
        that exact sums can be forwarded upward; the model is `state / scale`. A result with a
        scale other than 1 is the round's own running sum: the caller may divide it in place."""
        ...

    @property
    def count(self) -> int: ...


class Strategy(Protocol):
    """An aggregation rule; stateful rules persist through state_dict/load_state_dict."""

    def start_round(self, current: State) -> RoundAggregation: ...

    def state_dict(self) -> State: ...

    def load_state_dict(self, state: State) -> None: ...


@dataclass(frozen=True)
class StrategySettings:
    """What a strategy is built from: the node's robust settings, FedAvg's sum precision."""

    robust: RobustConfig
    sum_dtype: torch.dtype = torch.float32


StrategyFactory = Callable[[StrategySettings], Strategy]
# Why `robust` settings cannot work with n children per round, or None if they can.
Requirement = Callable[[RobustConfig, int], str | None]

STRATEGIES: dict[str, StrategyFactory] = {}
REQUIREMENTS: dict[str, Requirement] = {}


def _add(name: str, factory: StrategyFactory) -> None:
    add_entry(STRATEGIES, name, factory, "strategy")


def register_strategy(name: str) -> Callable[[StrategyFactory], StrategyFactory]:
    """Decorator: make the strategy that `factory(settings)` builds available under `name`."""

    def wrap(factory: StrategyFactory) -> StrategyFactory:
        _add(name, factory)
        return factory

    return wrap


RobustFactory = Callable[[RobustConfig], Strategy]


def register_robust_strategy(
    name: str, requirement: Requirement
) -> Callable[[RobustFactory], RobustFactory]:
    """Decorator: a strategy built from the node's `robust` settings, with the check that
    rejects settings it cannot honour (see `check_strategy`)."""

    def wrap(factory: RobustFactory) -> RobustFactory:
        _add(name, lambda settings: factory(settings.robust))
        REQUIREMENTS[name] = requirement
        return factory

    return wrap
