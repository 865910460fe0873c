"""Byzantine-robust aggregation rules as pure tensor functions.

Each rule takes the children's models (a list of State dicts, each already divided by its
scale) and returns one model in float64. Unlike FedAvg's streaming sum these rules compare the
replies with each other, so they need every reply at once: memory holds n model copies, plus
one parameter's n values stacked in float64 (and a sorted copy) while it is being combined.

Every child counts once, whatever its data size or subtree: a weight is exactly what a
Byzantine child would lie about.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from worldlm.core.messages import State

Combine = Callable[[torch.Tensor], torch.Tensor]  # (n, numel) float64 -> (numel,)


def _stack(states: Sequence[State], key: str) -> torch.Tensor:
    """The n values of one parameter in float64, flattened: (n, numel)."""
    return torch.stack([state[key].double().reshape(-1) for state in states])


def _per_coordinate(states: Sequence[State], rule: str, combine: Combine) -> State:
    """Apply `combine` to each parameter's (n, numel) stack, one parameter at a time."""
    if not states:
        raise ValueError(f"{rule} of no models")
    shapes = {key: value.shape for key, value in states[0].items()}
    return {key: combine(_stack(states, key)).reshape(shape) for key, shape in shapes.items()}


def _median_of(values: torch.Tensor) -> torch.Tensor:
    """The per-coordinate median; for an even n the mean of the two middle values."""
    ordered = values.sort(dim=0).values
    n = values.shape[0]
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def coordinate_median(states: Sequence[State]) -> State:
    """Coordinate-wise median (Yin et al. 2018): breaks down only when half the replies lie.
    Holds all n models at once, unlike FedAvg's streaming sum."""
    return _per_coordinate(states, "median", _median_of)


def trimmed_count(n: int, trim_fraction: float) -> int:
    """How many values trimmed_mean drops at each end of n: floor(trim_fraction * n)."""
    return math.floor(trim_fraction * n + 1e-9)


def trimmed_mean(states: Sequence[State], trim_fraction: float) -> State:
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the floor(trim_fraction * n)
    lowest and highest values of each coordinate, average the rest. Holds all n models."""
    n = len(states)
    k = trimmed_count(n, trim_fraction)
    if 2 * k >= n:
        raise ValueError(f"trimmed_mean: trimming {k} at each end leaves none of {n} values")

    def combine(values: torch.Tensor) -> torch.Tensor:
        return values.sort(dim=0).values[k : n - k].mean(dim=0)

    return _per_coordinate(states, "trimmed_mean", combine)


def squared_distances(states: Sequence[State]) -> torch.Tensor:
    """(n, n) float64 squared L2 distances between models, all parameters flattened together.

    Differences are taken directly (not via a Gram matrix), so nearby models keep their small
    distances exactly; one pair at a time, so the only temporary is one parameter's size."""
    n = len(states)
    distances = torch.zeros(n, n, dtype=torch.float64)
    for key in states[0]:
        stacked = _stack(states, key)  # (n, numel)
        for i in range(n):
            for j in range(i + 1, n):
                distances[i, j] += (stacked[i] - stacked[j]).square().sum()
    return distances + distances.T


def _scores(distances: torch.Tensor, neighbours: int) -> torch.Tensor:
    """Each model's sum of squared distances to its `neighbours` nearest other models."""
    n = distances.shape[0]
    others = distances + torch.diag(torch.full((n,), math.inf, dtype=torch.float64))
    return others.sort(dim=1).values[:, :neighbours].sum(dim=1)


def krum_scores(distances: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score of each model: the sum of its squared distances to its n - f - 2 nearest
    other models (Blanchard et al. 2017), who prove it robust to f Byzantine ones for
    n > 2f + 2 only."""
    n = distances.shape[0]
    if n <= 2 * f + 2:
        raise ValueError(f"krum needs n > 2f + 2; got n={n}, f={f}")
    return _scores(distances, n - f - 2)


def krum_select(states: Sequence[State], f: int, m: int = 1) -> list[int]:
    """Indices of the m models with the lowest Krum scores, best first (Krum is m = 1;
    Multi-Krum keeps m). Ties go to the lower index, so the choice is deterministic.
    Holds all n models, since every pair's distance is needed."""
    if not 1 <= m <= len(states):
        raise ValueError(f"krum_select: m={m} is not between 1 and n={len(states)}")
    scores = krum_scores(squared_distances(states), f)
    order = sorted(range(len(states)), key=lambda i: (float(scores[i]), i))
    return order[:m]


def mean_of(states: Sequence[State]) -> State:
    """The unweighted float64 mean of the models."""
    return _per_coordinate(states, "mean", lambda values: values.mean(dim=0))


def krum(states: Sequence[State], f: int) -> State:
    """Krum: the single model closest to its n - f - 2 nearest neighbours, in float64."""
    (best,) = krum_select(states, f, 1)
    return {key: value.double() for key, value in states[best].items()}


def multi_krum(states: Sequence[State], f: int, m: int | None = None) -> State:
    """Multi-Krum: the mean of the m models with the best Krum scores (default n - f)."""
    keep = len(states) - f if m is None else m
    return mean_of([states[i] for i in krum_select(states, f, keep)])


def bulyan(states: Sequence[State], f: int) -> State:
    """Bulyan (El Mhamdi et al. 2018): select theta = n - 2f models by Krum applied again and
    again to those not yet chosen; then, per coordinate, average the beta = theta - 2f
    selected values closest to their median. Needs n >= 4f + 3; holds all n models."""
    n = len(states)
    if n < 4 * f + 3:
        raise ValueError(f"bulyan needs n >= 4f + 3; got n={n}, f={f}")
    theta, beta = n - 2 * f, n - 4 * f
    distances = squared_distances(states)
    remaining = list(range(n))
    chosen: list[int] = []
    while len(chosen) < theta:
        if len(chosen) + len(remaining) == theta:  # f = 0: every model is selected
            chosen += remaining
            break
        sub = distances[remaining][:, remaining]
        # The last iterations have fewer than 2f + 3 candidates left (down to 2f + 1): Krum's
        # neighbour count n - f - 2 is kept at 1 there rather than falling to 0.
        scores = _scores(sub, max(len(remaining) - f - 2, 1))
        pick = min(range(len(remaining)), key=lambda i: (float(scores[i]), remaining[i]))
        chosen.append(remaining.pop(pick))
    selected = [states[i] for i in sorted(chosen)]

    def combine(values: torch.Tensor) -> torch.Tensor:
        median = _median_of(values)
        closest = (values - median).abs().argsort(dim=0, stable=True)[:beta]  # (beta, numel)
        return values.gather(0, closest).mean(dim=0)

    return _per_coordinate(selected, "bulyan", combine)


def state_norm(state: State) -> float:
    """The L2 norm of all tensors of a state flattened together (float64)."""
    return math.sqrt(sum(float(value.double().square().sum()) for value in state.values()))


def bound_norm(delta: State, bound: float) -> State:
    """`delta` scaled down to L2 norm `bound` if it is longer; unchanged otherwise.

    Caps how far one reply can move the model (Sun et al. 2019, "Can you really backdoor
    federated learning?"), which defeats model replacement's scaled-up updates."""
    norm = state_norm(delta)
    if norm <= bound:
        return delta
    factor = bound / norm
    return {key: value * factor for key, value in delta.items()}
