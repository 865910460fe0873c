"""Methods as compositions of one engine: a tree shape, a strategy, and what leaves keep.

| method      | tree                         | aggregated          | a leaf deploys   |
|-------------|------------------------------|---------------------|------------------|
| hierfavg    | the configured tree          | full model, FedAvg  | the global model |
| fedavg      | root -> every leaf (flat)    | full model, FedAvg  | the global model |
| local       | root -> every leaf (flat)    | nothing             | its own model    |
| centralized | root -> one leaf, all data   | (one child)         | the single model |
| fedper      | root -> every leaf (flat)    | B; K stays on leaves | global B + own K |
| worldlm     | the configured tree          | B everywhere; K (1) | global B + K (2)  |

(1) K attention-aggregated inside each sub-federation, never above it.
(2) the K of the leaf's nearest aggregator (its sub-federation's in a two-level tree).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from worldlm.config import (
    AggregatorConfig,
    LeafConfig,
    SampleConfig,
    SecAggConfig,
    StopConfig,
    TrainConfig,
)
from worldlm.tree import FederationNode, flatten

CENTRAL_LEAF = "centralized"
# WorldLM ends in a personalization phase of this share of its rounds, and compare's _ft methods
# (FedAvg + fine-tuning) in one as long: the study's largest single gain (docs/study.md).
FINETUNE_SHARE = 0.2


def share_of_rounds(rounds: int) -> int:
    """FINETUNE_SHARE of `rounds`, leaving at least one federated round."""
    return min(round(rounds * FINETUNE_SHARE), rounds - 1)


def finetune_rounds(method: str, train: TrainConfig, stop: StopConfig) -> int:
    """The rounds of the personalization phase `method` ends in: train.finetune_rounds when set,
    else the method's default (worldlm's share of the rounds; none for the others)."""
    if train.finetune_rounds is not None:
        return train.finetune_rounds
    return share_of_rounds(stop.rounds) if method == "worldlm" else 0


@dataclass(frozen=True)
class MethodPlan:
    tree: FederationNode
    personal: Literal["none", "keys", "all"] = "none"  # what a leaf keeps of its own
    pooled: bool = False  # one leaf trains on every leaf's training data (centralized)
    key_layers: bool = False  # aggregators below the root personalize K (WorldLM)
    finetunes: bool = False  # the run ends in a personalization phase (train.finetune_rounds)

    @property
    def personalizes(self) -> bool:
        """Whether a leaf may deploy something other than the global model."""
        return self.personal != "none" or self.key_layers or self.finetunes


def plan_method(method: str, tree: FederationNode, *, finetune_rounds: int = 0) -> MethodPlan:
    """The tree and leaf policy that `method` runs on the shared engine (ending in
    `finetune_rounds` of personalization at the leaves)."""
    return replace(_plan(method, tree), finetunes=finetune_rounds > 0)


def _plan(method: str, tree: FederationNode) -> MethodPlan:
    if method == "hierfavg":
        return MethodPlan(tree)
    if method == "worldlm":
        return MethodPlan(tree, key_layers=True)
    if method == "fedavg":
        return MethodPlan(flatten(tree))
    if method == "fedper":
        return MethodPlan(flatten(tree), personal="keys")
    if method == "local":
        flat = flatten(tree)
        # Nothing is aggregated, so there is nothing for secure aggregation to hide.
        off = SecAggConfig()
        update = {"strategy": "none", "sample": SampleConfig(), "secure_aggregation": off}
        settings = flat.aggregator.model_copy(update=update)
        return MethodPlan(replace(flat, settings=settings), personal="all")
    if method == "centralized":
        settings = AggregatorConfig(strategy="fedavg")
        leaf = FederationNode(f"{tree.path}/{CENTRAL_LEAF}", LeafConfig())
        return MethodPlan(FederationNode(tree.path, settings, (leaf,)), pooled=True)
    raise ValueError(f"unknown method {method!r}")
