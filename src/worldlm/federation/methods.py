"""Methods as compositions of one engine: a tree shape, a strategy, and what leaves keep.

| method      | tree                         | aggregated          | a leaf deploys   |
|-------------|------------------------------|---------------------|------------------|
| hierfavg    | the configured tree          | full model, FedAvg  | the global model |
| fedavg      | root -> every leaf (flat)    | full model, FedAvg  | the global model |
| local       | root -> every leaf (flat)    | nothing             | its own model    |
| centralized | root -> one leaf, all data   | (one child)         | the single model |
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from worldlm.config import NodeConfig, SampleConfig
from worldlm.tree import FederationNode, flatten

CENTRAL_LEAF = "centralized"


@dataclass(frozen=True)
class MethodPlan:
    tree: FederationNode
    personal_all: bool  # leaves keep every weight of their own (the local baseline)
    pooled: bool  # one leaf trains on every leaf's training data (centralized)


def plan_method(method: str, tree: FederationNode) -> MethodPlan:
    """The tree and leaf policy that `method` runs on the shared engine."""
    if method == "hierfavg":
        return MethodPlan(tree, personal_all=False, pooled=False)
    if method == "fedavg":
        return MethodPlan(flatten(tree), personal_all=False, pooled=False)
    if method == "local":
        flat = flatten(tree)
        settings = flat.settings.model_copy(update={"strategy": "none", "sample": SampleConfig()})
        return MethodPlan(replace(flat, settings=settings), personal_all=True, pooled=False)
    if method == "centralized":
        settings = NodeConfig.model_validate({"strategy": "fedavg"})
        leaf = FederationNode(f"{tree.path}/{CENTRAL_LEAF}", NodeConfig.model_validate({}))
        return MethodPlan(FederationNode(tree.path, settings, (leaf,)), False, pooled=True)
    raise ValueError(f"unknown method {method!r}")
