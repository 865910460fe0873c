"""How much weight a child's reply may claim in one round of its parent (issue 19).

FedAvg weighs each reply by the tokens its subtree trained, a number the child reports itself.
Unbounded, one leaf claiming 1e12 tokens replaces the global model, and 1e39 overflows a
float32 sum. The shared config says what a round can train: a leaf at most `local_steps x
batch_size x block_size` tokens, an inner aggregator at most its children's bounds summed over
its inner rounds. A reply's weight and scale must lie in [1, that bound]."""

from __future__ import annotations

from worldlm.config import TrainConfig
from worldlm.tree import FederationNode


def round_weight_bounds(
    tree: FederationNode, train: TrainConfig, block_size: int
) -> dict[str, float]:
    """Every node's most tokens per round of its parent, keyed by path (the root's included)."""
    leaf_tokens = float(train.local_steps * train.batch_size * block_size)
    bounds: dict[str, float] = {}

    def bound(node: FederationNode) -> float:
        if node.is_leaf:
            value = leaf_tokens
        else:
            value = node.aggregator.inner_rounds * sum(bound(child) for child in node.children)
        bounds[node.path] = value
        return value

    bound(tree)
    return bounds
