"""WorldLM's personalized key layers at an aggregator (DESIGN §5.2–5.6).

An aggregator below the root keeps its own K_p between rounds, sends it down with the backbone,
and folds its children's key layers in by attention. Attention weights depend on every child's
distance, so a round holds each child's key layers (not the backbone) until it ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worldlm.model.partition import Partition
from worldlm.model.state import State
from worldlm.strategies.attention import attend, attention_weights, layer_distance


@dataclass(frozen=True)
class KeyLayerPolicy:
    partition: Partition
    tau: float
    eps: float
    private: bool  # K_p never leaves this aggregator's subtree (a child of the root)


def aggregate_key_layers(
    current: State, children: list[State], sizes: list[float], policy: KeyLayerPolicy
) -> State:
    """The new K_p: per layer, attention over the children's versions of that layer."""
    if not children:
        return dict(current)
    result: State = {}
    weights_of_sizes = torch.tensor(sizes, dtype=torch.float64)
    for names in policy.partition.groups.values():
        mine = [current[n] for n in names]
        distances = torch.tensor(
            [layer_distance(mine, [child[n] for n in names]) for child in children],
            dtype=torch.float64,
        )
        weights = attention_weights(distances, weights_of_sizes, policy.tau)
        for name in names:
            result[name] = attend(current[name], [c[name] for c in children], weights, policy.eps)
    return result


class KeyLayerRound:
    """Collects one round's children key layers, then attends over them."""

    def __init__(self, policy: KeyLayerPolicy, current: State) -> None:
        self.policy = policy
        self.current = current
        self.children: list[State] = []
        self.sizes: list[float] = []

    def add(self, model: State, weight: float) -> None:
        self.children.append({n: model[n] for n in self.policy.partition.key_names})
        self.sizes.append(weight)

    def result(self) -> State:
        return aggregate_key_layers(self.current, self.children, self.sizes, self.policy)
