"""Strategies register themselves by name; names are strings only at the config boundary."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from worldlm.federation.messages import State, Update


class RoundAggregation(Protocol):
    """One round's aggregation: fed one update at a time, then asked for the result."""

    def add(self, update: Update) -> None: ...

    def result(self) -> tuple[State, float]:
        """The new model times a scale, and the scale (a FedAvg sum and its total weight), so
        that exact sums can be forwarded upward; the model is `state / scale`."""
        ...

    @property
    def count(self) -> int: ...


class Strategy(Protocol):
    """An aggregation rule; stateful rules persist through state_dict/load_state_dict."""

    def start_round(self, current: State) -> RoundAggregation: ...

    def state_dict(self) -> State: ...

    def load_state_dict(self, state: State) -> None: ...


STRATEGIES: dict[str, Callable[[], Strategy]] = {}


def register_strategy(name: str) -> Callable[[Callable[[], Strategy]], Callable[[], Strategy]]:
    """Class decorator: make a strategy available under `name` in configs."""

    def wrap(factory: Callable[[], Strategy]) -> Callable[[], Strategy]:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is registered twice")
        STRATEGIES[name] = factory
        return factory

    return wrap


def build_strategy(name: str) -> Strategy:
    # Importing the package modules runs their registrations.
    from worldlm.strategies import fedavg, none  # noqa: F401

    return STRATEGIES[name]()


def strategy_names() -> list[str]:
    from worldlm.strategies import fedavg, none  # noqa: F401

    return sorted(STRATEGIES)
