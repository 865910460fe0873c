"""Wire a method's tree into live in-process nodes: aggregators, leaves and a transport."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from worldlm.config import EvalConfig, StopConfig, TrainConfig, WorldLMConfig
from worldlm.federation.aggregator import Aggregator, RouterPolicy
from worldlm.federation.context import RunContext
from worldlm.federation.key_layers import KeyLayerPolicy
from worldlm.federation.leaf import Leaf, LeafData
from worldlm.federation.methods import CENTRAL_LEAF, MethodPlan
from worldlm.federation.secure_round import check_secure_aggregation
from worldlm.federation.selection import sample_count
from worldlm.model.partition import Partition, key_layer_partition
from worldlm.strategies.registry import build_strategy, check_strategy
from worldlm.transport.inprocess import InProcessTransport
from worldlm.tree import FederationNode


@dataclass
class Federation:
    root: Aggregator
    aggregators: dict[str, Aggregator]
    leaves: dict[str, Leaf]
    transport: InProcessTransport

    def nodes(self) -> dict[str, Aggregator | Leaf]:
        return {**self.aggregators, **self.leaves}


def pooled_data(leaf_data: Mapping[str, LeafData]) -> LeafData:
    """One dataset holding every leaf's training blocks; still evaluated per original leaf."""
    names = sorted(leaf_data)
    train = torch.cat([leaf_data[n].train_blocks for n in names])
    evals = {k: v for n in names for k, v in leaf_data[n].eval_sets.items()}
    return LeafData(CENTRAL_LEAF, train, evals)


def build_federation(
    plan: MethodPlan,
    leaf_data: Mapping[str, LeafData],
    *,
    workspace: torch.nn.Module,
    train_cfg: TrainConfig,
    eval_cfg: EvalConfig,
    stop_cfg: StopConfig,
    worldlm_cfg: WorldLMConfig,
    ctx: RunContext,
    partial: bool = False,
) -> Federation:
    """Live nodes for every node of `plan.tree`, registered on one in-process transport.

    With `partial` (one node of a deployment), leaves whose data is not in `leaf_data` are
    left out: they run in other processes."""
    tree = plan.tree
    transport = InProcessTransport({n.path: [c.path for c in n.children] for n in tree.walk()})
    aggregators: dict[str, Aggregator] = {}
    leaves: dict[str, Leaf] = {}
    all_keys = frozenset(name for name, _ in workspace.named_parameters())
    partition = key_layer_partition(workspace, worldlm_cfg.key_fraction)
    personal = {"none": frozenset(), "keys": partition.key_names, "all": all_keys}[plan.personal]
    for node in tree.walk():
        if not node.is_leaf:
            settings = node.settings
            # Robust rules are checked against the replies a round asks for (TESTPLAN 32).
            selected = sample_count(len(node.children), settings.sample)
            check_strategy(settings.strategy, settings.robust, selected, path=node.path)
            key_policy = _key_policy(plan, node, tree, partition, worldlm_cfg)
            check_secure_aggregation(
                node.path, settings, selected, key_attention=key_policy is not None
            )
            aggregators[node.path] = Aggregator(
                node.path,
                settings,
                transport=transport,
                strategy=build_strategy(settings.strategy, settings.robust),
                ctx=ctx,
                key_policy=key_policy,
                router=(
                    RouterPolicy(worldlm_cfg.route_top_k, worldlm_cfg.route_tau)
                    if plan.key_layers and partition.groups and node.path == tree.path
                    else None
                ),
            )
            transport.register(aggregators[node.path])
            continue
        if partial and node.name not in leaf_data:
            continue
        data = pooled_data(leaf_data) if plan.pooled else leaf_data[node.name]
        leaves[node.path] = Leaf(
            node.path,
            data,
            workspace=workspace,
            train_cfg=train_cfg,
            eval_cfg=eval_cfg,
            total_steps=planned_steps(tree, node, stop_cfg, train_cfg),
            personal_keys=personal,
            adapted_keys=(
                partition.key_names
                if plan.key_layers and worldlm_cfg.leaf_key_layers == "own"
                else frozenset()
            ),
            ctx=ctx,
        )
        transport.register(leaves[node.path])
    return Federation(aggregators[tree.path], aggregators, leaves, transport)


def _key_policy(
    plan: MethodPlan,
    node: FederationNode,
    tree: FederationNode,
    partition: Partition,
    cfg: WorldLMConfig,
) -> KeyLayerPolicy | None:
    """WorldLM: every aggregator below the root keeps its K; a root's child keeps it private."""
    if not plan.key_layers or node.path == tree.path or not partition.groups:
        return None
    private = node.path.rsplit("/", 1)[0] == tree.path
    return KeyLayerPolicy(
        partition,
        cfg.tau,
        cfg.eps,
        private,
        cfg.residual_rank,
        cfg.lambda_route,
        per_child=cfg.child_key_layers == "attended",
    )


def planned_steps(
    tree: FederationNode, leaf: FederationNode, stop: StopConfig, train: TrainConfig
) -> int:
    """The leaf's schedule horizon: root rounds x inner rounds of its ancestors x local steps
    (an upper bound when children are sampled)."""
    inner = math.prod(
        node.settings.inner_rounds
        for node in tree.walk()
        if not node.is_leaf and leaf.path.startswith(node.path + "/") and node.path != tree.path
    )
    return stop.rounds * inner * train.local_steps
