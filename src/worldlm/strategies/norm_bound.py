"""Norm bounding as a wrapper around any strategy (Sun et al. 2019).

Each reply's change (its model minus the model the round started from) is scaled down to L2
norm `bound` before the inner rule sees it, so that one child cannot move the model further
than `bound` however much it scales its update (Bagdasaryan et al. 2020's model replacement).
A reply within the bound is passed on untouched, so a FedAvg sum stays exact.
"""

from __future__ import annotations

from dataclasses import replace

from worldlm.core.messages import State, Update
from worldlm.strategies.registry import RoundAggregation, Strategy
from worldlm.strategies.robust import bound_norm


def bounded_update(update: Update, current: State, bound: float) -> Update:
    """`update` with its change scaled down to norm `bound`, still carrying its scale (the
    model times `scale`, in each tensor's dtype), so the inner rule reads it as any other.
    Holds one float64 copy of the change while it works."""
    model = update.model()
    change = {key: value.double() - current[key].double() for key, value in model.items()}
    bounded = bound_norm(change, bound)
    if bounded is change:
        return update
    state = {
        key: ((current[key].double() + delta) * update.scale).to(update.state[key].dtype)
        for key, delta in bounded.items()
    }
    return replace(update, state=state)


class NormBoundedRound:
    def __init__(self, inner: RoundAggregation, current: State, bound: float) -> None:
        self.inner = inner
        self.current = current
        self.bound = bound

    def add(self, update: Update) -> None:
        self.inner.add(bounded_update(update, self.current, self.bound))

    @property
    def count(self) -> int:
        return self.inner.count

    def result(self) -> tuple[State, float]:
        return self.inner.result()


class NormBounded:
    """Any strategy, fed replies whose change is at most `bound` in L2 norm."""

    def __init__(self, inner: Strategy, bound: float) -> None:
        self.inner = inner
        self.bound = bound

    def start_round(self, current: State) -> NormBoundedRound:
        return NormBoundedRound(self.inner.start_round(current), current, self.bound)

    def state_dict(self) -> State:
        return self.inner.state_dict()

    def load_state_dict(self, state: State) -> None:
        self.inner.load_state_dict(state)
