"""Wire a method's tree into live in-process nodes: aggregators, leaves and a transport."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from worldlm.config import RunConfig, StopConfig, TrainConfig, WorldLMConfig
from worldlm.core.inprocess import InProcessTransport
from worldlm.core.leaf_data import LeafData
from worldlm.core.messages import State
from worldlm.core.transport import NodeHandler
from worldlm.federation.aggregator import Aggregator, RouterPolicy
from worldlm.federation.context import RunContext
from worldlm.federation.eval_check import eval_owners
from worldlm.federation.key_layers import KeyLayerPolicy
from worldlm.federation.leaf import Leaf
from worldlm.federation.methods import CENTRAL_LEAF, MethodPlan, finetune_rounds
from worldlm.federation.record_check import record_limits
from worldlm.federation.secure_round import check_secure_aggregation
from worldlm.federation.selection import sample_count
from worldlm.federation.weight_bounds import round_weight_bounds
from worldlm.model.partition import Partition, key_layer_partition
from worldlm.strategies.catalog import build_strategy, check_strategy
from worldlm.tree import FederationNode


class LeafNode(NodeHandler, Protocol):
    """What the run asks of a leaf besides answering tasks (checkpoints, the final models): a
    `Leaf`, or a proxy of one that lives in another process (`transport.ray_transport`)."""

    @property
    def data(self) -> LeafData: ...

    @property
    def own_state(self) -> State: ...

    @property
    def adapted_state(self) -> State: ...

    @property
    def state_version(self) -> int:
        """Moves whenever what `snapshot` returns may have changed."""
        ...

    def deployed_state(self, incoming: State) -> State: ...

    def snapshot(self) -> tuple[State, dict[str, Any]]: ...

    def restore(self, tensors: State, meta: dict[str, Any]) -> None: ...


@dataclass
class Federation:
    root: Aggregator
    aggregators: dict[str, Aggregator]
    leaves: dict[str, LeafNode]
    transport: InProcessTransport
    # What stops the processes its leaves run in, if not this one (the Ray backend's actors).
    closers: list[Callable[[], None]] = field(default_factory=list)
    # Every leaf's state_version in one go, where asking leaf by leaf costs a round trip each
    # (the Ray backend asks each actor once); None: ask each leaf.
    versions: Callable[[], dict[str, int]] | None = None

    def nodes(self) -> dict[str, Aggregator | LeafNode]:
        return {**self.aggregators, **self.leaves}

    def leaf_versions(self) -> dict[str, int]:
        """Each leaf's `state_version` (what a checkpoint needs to know which leaves changed)."""
        if self.versions is not None:
            return self.versions()
        return {path: leaf.state_version for path, leaf in self.leaves.items()}

    def close(self) -> None:
        """Stop the nodes that run in other processes (none in process); safe to repeat."""
        while self.closers:
            self.closers.pop()()


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
    config: RunConfig,
    ctx: RunContext,
    partial: bool = False,
    transport: InProcessTransport | None = None,
) -> Federation:
    """Live nodes for every node of `plan.tree`, registered on one in-process transport (or
    on `transport`, which the caller made for the tree's shape).

    With `partial` (one node of a deployment, or the driver of a Ray run), leaves whose data
    is not in `leaf_data` are left out: they run in other processes."""
    tree = plan.tree
    if transport is None:
        transport = InProcessTransport(children_of(tree))
    aggregators: dict[str, Aggregator] = {}
    partition = key_layer_partition(workspace, config.worldlm.key_fraction)
    bounds = round_weight_bounds(tree, config.train, config.model.block_size)
    # The pooled leaf of `centralized` evaluates on every leaf's validation split.
    pooled = (
        frozenset(n for d in leaf_data.values() for n in d.eval_sets)
        if plan.pooled
        else frozenset()
    )
    owners = eval_owners(tree, pooled=pooled)
    rows = record_limits(tree)
    for node in tree.walk():
        if node.is_leaf:
            continue
        settings = node.aggregator
        # Robust rules are checked against the replies a round asks for (TESTPLAN 32).
        selected = sample_count(len(node.children), settings.sample)
        check_strategy(settings.strategy, settings.robust, selected, path=node.path)
        key_policy = _key_policy(plan, node, tree, partition, config.worldlm)
        check_secure_aggregation(
            node.path,
            settings,
            selected,
            key_attention=key_policy is not None and key_policy.attention,
        )
        aggregators[node.path] = Aggregator(
            node.path,
            settings,
            transport=transport,
            strategy=build_strategy(
                settings.strategy, settings.robust, sum_dtype=settings.sum_dtype
            ),
            ctx=ctx,
            key_policy=key_policy,
            router=(
                RouterPolicy(config.worldlm.route_top_k, config.worldlm.route_tau)
                if plan.key_layers and partition.groups and node.path == tree.path
                else None
            ),
            # Each link is configured by its child (nodes.<child>.link); checked there too.
            child_links={child.path: child.settings.link for child in node.children},
            child_slowdowns={child.path: child.settings.slowdown for child in node.children},
            weight_bounds={child.path: bounds[child.path] for child in node.children},
            record_limits={child.path: rows[child.path] for child in node.children},
            eval_owners={child.path: owners[child.path] for child in node.children},
            eval_max_tokens=(
                config.eval.max_blocks * config.model.block_size if config.eval.max_blocks else None
            ),
        )
        transport.register(aggregators[node.path])
    leaves: dict[str, LeafNode] = dict(
        build_leaves(
            plan,
            leaf_data,
            workspace=workspace,
            config=config,
            ctx=ctx,
            partial=partial,
        )
    )
    for leaf in leaves.values():
        transport.register(leaf)
    return Federation(aggregators[tree.path], aggregators, leaves, transport)


def children_of(tree: FederationNode) -> dict[str, list[str]]:
    """Each node's children's paths: the shape a transport routes tasks along."""
    return {n.path: [c.path for c in n.children] for n in tree.walk()}


def build_leaves(
    plan: MethodPlan,
    leaf_data: Mapping[str, LeafData],
    *,
    workspace: torch.nn.Module,
    config: RunConfig,
    ctx: RunContext,
    partial: bool = False,
) -> dict[str, Leaf]:
    """Live leaves of `plan.tree`, all training in turn on the one `workspace`; with `partial`,
    only those whose data is in `leaf_data` (the others run elsewhere)."""
    tree = plan.tree
    partition = key_layer_partition(workspace, config.worldlm.key_fraction)
    all_keys = frozenset(name for name, _ in workspace.named_parameters())
    personal = {"none": frozenset(), "keys": partition.key_names, "all": all_keys}[plan.personal]
    leaves: dict[str, Leaf] = {}
    for node in tree.leaves():
        if partial and node.name not in leaf_data:
            continue
        data = pooled_data(leaf_data) if plan.pooled else leaf_data[node.name]
        leaves[node.path] = Leaf(
            node.path,
            data,
            workspace=workspace,
            train_cfg=config.train,
            eval_cfg=config.eval,
            total_steps=planned_steps(tree, node, config.stop, config.train),
            personal_keys=personal,
            adapted_keys=_adapted_keys(plan, config.worldlm, partition.key_names, all_keys),
            ctx=ctx,
            link=node.leaf.link,
            dp=node.leaf.dp,
            finetune_after=finetune_after(config),
            key_mix=config.worldlm.key_mix,
        )
    return leaves


def _adapted_keys(
    plan: MethodPlan, cfg: WorldLMConfig, key_names: frozenset[str], all_keys: frozenset[str]
) -> frozenset[str]:
    """What a WorldLM leaf keeps of its own between rounds and mixes with what it is sent."""
    if not plan.key_layers or cfg.leaf_key_layers != "own":
        return frozenset()
    return all_keys if cfg.key_mix_scope == "all" else key_names


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
        attention=cfg.attention,
    )


def finetune_after(config: RunConfig) -> int | None:
    """The last federated root round when the run ends in a personalization phase."""
    rounds = finetune_rounds(config.run.method, config.train, config.stop)
    return config.stop.rounds - rounds if rounds > 0 else None


def planned_steps(
    tree: FederationNode, leaf: FederationNode, stop: StopConfig, train: TrainConfig
) -> int:
    """The leaf's schedule horizon: root rounds x inner rounds of its ancestors x local steps
    (an upper bound when children are sampled)."""
    inner = math.prod(
        node.aggregator.inner_rounds
        for node in tree.walk()
        if not node.is_leaf and leaf.path.startswith(node.path + "/") and node.path != tree.path
    )
    return stop.rounds * inner * train.local_steps
