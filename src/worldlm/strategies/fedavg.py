"""FedAvg (McMahan et al. 2017): the token-weighted mean of the children's weights.

Updates are folded one at a time into a running sum, so memory holds one accumulator whatever
the number of children. Every transport hands replies over in path order (DESIGN §4), so the
sum's bits do not depend on when replies arrive. In float32 (the default,
`nodes.<path>.sum_dtype`) the sum is one model copy and runs at memory speed; in float64 the
float32 result does not depend on the summation order either (a tree's shape), at twice the
memory and half the speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worldlm.core.chunked import ChunkBuffers, add_converted
from worldlm.core.messages import State, Update
from worldlm.strategies.registry import StrategySettings, register_strategy


def fedavg(states: Sequence[State], weights: Sequence[float]) -> State:
    """Reference: sum_i w_i s_i / sum_i w_i in float64 (all states held at once)."""
    total = float(sum(weights))
    result: State = {}
    for key in states[0]:
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            acc += weight * state[key].double()
        result[key] = acc / total
    return result


class WeightedSum:
    """Streaming weighted sum: `add` folds a state in, `mean` divides by the total weight."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.total = 0.0
        self.count = 0
        # Replies of another dtype (float32 into a float64 sum) are converted one cache-sized
        # chunk at a time: `acc.add_(t.double())` would allocate and free a converted copy of
        # every tensor, a mixed-dtype `add_` is as slow as that, and a buffer as large as the
        # largest tensor costs its memory and runs at half the speed of a chunk in cache.
        self._buffers = ChunkBuffers()

    def add(self, state: State, weight: float, *, alpha: float | None = None) -> None:
        """Fold in `alpha * state` (alpha defaults to `weight`) and count `weight`."""
        alpha = weight if alpha is None else alpha
        if not self.sums:
            self.sums = {k: self._first(v, alpha) for k, v in state.items()}
        else:
            same = [k for k, acc in self.sums.items() if state[k].dtype == acc.dtype]
            if same:  # one call for all of them: a model's many small tensors add up in Python
                torch._foreach_add_(
                    [self.sums[k] for k in same], [state[k] for k in same], alpha=alpha
                )
            for key, acc in self.sums.items():
                if state[key].dtype != acc.dtype:
                    add_converted(acc, state[key], alpha, self._buffers)
        self.total += weight
        self.count += 1

    def _first(self, value: torch.Tensor, alpha: float) -> torch.Tensor:
        if value.dtype == self.dtype:
            return value * alpha
        # In place on the fresh converted copy: the same values as `value.to(dtype) * alpha`
        # without a second tensor of the sum's size.
        return value.to(self.dtype, memory_format=torch.contiguous_format).mul_(alpha)

    def mean(self) -> State:
        return {k: v / self.total for k, v in self.sums.items()}


class FedAvgRound:
    def __init__(self, current: State, sum_dtype: torch.dtype = torch.float32) -> None:
        self.current = current
        self.acc = WeightedSum(sum_dtype)

    def add(self, update: Update) -> None:
        # A forwarded sum already carries its weight: alpha is exactly 1 when weight == scale.
        self.acc.add(update.state, update.weight, alpha=update.weight / update.scale)

    @property
    def count(self) -> int:
        return self.acc.count

    def result(self) -> tuple[State, float]:
        if not self.acc.count:
            return self.current, 1.0
        return self.acc.sums, self.acc.total


class FedAvg:
    """Stateless FedAvg at one aggregator; `sum_dtype` is the precision of its running sum."""

    def __init__(self, sum_dtype: torch.dtype = torch.float32) -> None:
        self.sum_dtype = sum_dtype

    def start_round(self, current: State) -> FedAvgRound:
        return FedAvgRound(current, self.sum_dtype)

    def state_dict(self) -> State:
        return {}

    def load_state_dict(self, state: State) -> None:
        del state


@register_strategy("fedavg")
def fedavg_strategy(settings: StrategySettings) -> FedAvg:
    return FedAvg(settings.sum_dtype)
