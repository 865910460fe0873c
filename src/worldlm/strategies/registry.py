"""Strategies register themselves by name; names are strings only at the config boundary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from worldlm.config import RobustConfig
from worldlm.core.messages import State, Update
from worldlm.errors import ConfigError


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
    if name in STRATEGIES:
        raise ValueError(f"strategy {name!r} is registered twice")
    STRATEGIES[name] = factory


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


def _load_plugins() -> None:
    # Importing the package modules runs their registrations.
    from worldlm.strategies import fedavg, none, robust_rounds  # noqa: F401


SUM_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def build_strategy(
    name: str, robust: RobustConfig | None = None, *, sum_dtype: str = "float32"
) -> Strategy:
    """The strategy `name`; with `robust.norm_bound` set, wrapped so that every reply's change
    is bounded before the rule sees it. `sum_dtype` is FedAvg's running-sum precision (the
    robust rules hold the replies themselves and have no running sum)."""
    _load_plugins()
    from worldlm.strategies.norm_bound import NormBounded

    settings = RobustConfig() if robust is None else robust
    strategy = STRATEGIES[name](StrategySettings(settings, SUM_DTYPES[sum_dtype]))
    if settings.norm_bound is not None:
        return NormBounded(strategy, settings.norm_bound)
    return strategy


def check_strategy(
    name: str, robust: RobustConfig | None, n_children: int, *, path: str | None = None
) -> None:
    """Raise ConfigError if `name` cannot honour `robust` with `n_children` replies per
    round (e.g. Krum with n <= 2f + 2); the message names the node, the rule, n and f."""
    _load_plugins()
    requirement = REQUIREMENTS.get(name)
    settings = RobustConfig() if robust is None else robust
    problem = None if requirement is None else requirement(settings, n_children)
    if problem is None:
        return
    where = f"nodes.{path}" if path else "a node"
    raise ConfigError(
        f"{where}: strategy {name!r} with robust.byzantine f={settings.byzantine} cannot run "
        f"with n={n_children} children per round: {problem}"
    )


def strategy_names() -> list[str]:
    _load_plugins()
    return sorted(STRATEGIES)
