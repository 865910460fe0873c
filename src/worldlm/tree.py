"""The federation tree: nodes with paths (`world/medical/hpo`), children and per-node settings.

Built from the config's `nodes` table and checked for an impossible shape before anything runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

from worldlm.compression.policy import check_root_link
from worldlm.config import AggregatorConfig, LeafConfig, LeafDataConfig, NodeConfig
from worldlm.errors import ConfigError
from worldlm.strategies.catalog import strategy_names
from worldlm.strategies.fedbuff import check_fedbuff
from worldlm.strategies.server_optimizer import server_optimizer_names

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_PATH_CHARS = 256  # what a message may name (transport.fields.MAX_NODE_PATH)


@dataclass(frozen=True)
class FederationNode:
    """One node of the tree; a leaf holds data, an aggregator holds children."""

    path: str
    settings: NodeConfig
    children: tuple[FederationNode, ...] = ()

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def is_leaf(self) -> bool:
        return not self.children

    @property
    def aggregator(self) -> AggregatorConfig:
        """An aggregator's settings (the tree guarantees every node with children has them)."""
        assert isinstance(self.settings, AggregatorConfig), f"{self.path} is a leaf"
        return self.settings

    @property
    def leaf(self) -> LeafConfig:
        """A leaf's settings (the tree guarantees every node without children has them)."""
        assert isinstance(self.settings, LeafConfig), f"{self.path} is not a leaf"
        return self.settings

    @property
    def data(self) -> LeafDataConfig:
        """A leaf's data settings (the tree guarantees every leaf has them)."""
        assert self.leaf.data is not None, f"{self.path} has no data"
        return self.leaf.data

    def leaves(self) -> Iterator[FederationNode]:
        """Every leaf under this node, in path order."""
        if self.is_leaf:
            yield self
        for child in self.children:
            yield from child.leaves()

    def walk(self) -> Iterator[FederationNode]:
        """This node and every node below it, parents before children."""
        yield self
        for child in self.children:
            yield from child.walk()

    def find(self, path: str) -> FederationNode:
        for node in self.walk():
            if node.path == path:
                return node
        raise KeyError(path)


def build_tree(nodes: Mapping[str, NodeConfig]) -> FederationNode:
    """Assemble and check the tree from `nodes` keyed by path; ConfigError names the bad key."""
    if not nodes:
        raise ConfigError("nodes: the federation tree is empty (add at least [nodes.world] ...)")
    for path in nodes:
        parts = path.split("/")
        if not all(_NAME.match(p) for p in parts) or len(path) > MAX_PATH_CHARS:
            raise ConfigError(
                f"nodes.{path[:MAX_PATH_CHARS]}: node paths are names of letters, digits, '_' or "
                f"'-' joined by '/', at most {MAX_PATH_CHARS} characters"
            )
    roots = [p for p in nodes if "/" not in p]
    if len(roots) != 1:
        raise ConfigError(f"nodes: exactly one root path without '/' is needed, found {roots}")
    for path in nodes:
        parent = path.rsplit("/", 1)[0] if "/" in path else None
        if parent is not None and parent not in nodes:
            raise ConfigError(f"nodes.{path}: its parent {parent!r} is not a node")
    tree = _assemble(roots[0], nodes)
    _check(tree)
    return tree


def _assemble(path: str, nodes: Mapping[str, NodeConfig]) -> FederationNode:
    kids = sorted(p for p in nodes if p.rsplit("/", 1)[0] == path and "/" in p)
    return FederationNode(path, nodes[path], tuple(_assemble(k, nodes) for k in kids))


def _check(tree: FederationNode) -> None:
    if isinstance(tree.settings, AggregatorConfig):
        if tree.settings.inner_rounds != 1:
            raise ConfigError(
                f"nodes.{tree.path}.inner_rounds: the root has no parent; set stop.rounds instead"
            )
        check_root_link(tree.path, tree.settings)
    seen: dict[str, str] = {}
    for node in tree.walk():
        key = f"nodes.{node.path}"
        if node.is_leaf:
            settings = node.settings
            if not isinstance(settings, LeafConfig) or settings.data is None:
                raise ConfigError(
                    f"{key}.data: a leaf needs data (paths = [...], corpus = ..., dataset = ... "
                    "or hub = ...)"
                )
            if settings.dp.enabled:
                raise ConfigError(
                    f"{key}.dp.enabled: DP-FedAvg runs at an aggregator over its children; a "
                    "leaf privatizes its own change with dp.local_noise_multiplier"
                )
            if node.name in seen:
                raise ConfigError(
                    f"{key}: leaf name {node.name!r} is also used by {seen[node.name]}; leaf names "
                    "identify data owners and must be unique"
                )
            seen[node.name] = node.path
            continue
        if not isinstance(node.settings, AggregatorConfig):
            raise ConfigError(f"{key}.data: only leaves hold data ({node.path} has children)")
        _check_aggregator(key, node.path, node.settings, len(node.children))


def _check_aggregator(key: str, path: str, settings: AggregatorConfig, n: int) -> None:
    if settings.dp.local_noise_multiplier > 0:
        raise ConfigError(
            f"{key}.dp.local_noise_multiplier: local DP is applied by a leaf to its own "
            f"change; {path} is an aggregator (set it on its leaves, or use dp.enabled)"
        )
    names = strategy_names()
    if settings.strategy not in names:
        raise ConfigError(
            f"{key}.strategy: unknown strategy {settings.strategy!r}; "
            f"choose one of {', '.join(names)}"
        )
    optimizers = server_optimizer_names()
    if settings.server_optimizer.name not in optimizers:
        raise ConfigError(
            f"{key}.server_optimizer.name: unknown server optimizer "
            f"{settings.server_optimizer.name!r}; choose one of {', '.join(optimizers)}"
        )
    if settings.sample.min > n:
        raise ConfigError(
            f"{key}.sample.min: {settings.sample.min} is above the number of children "
            f"of {path} ({n})"
        )
    check_fedbuff(key, settings, n)


def flatten(tree: FederationNode) -> FederationNode:
    """The root with every leaf as a direct child (flat FedAvg over the same leaves)."""
    leaves = tuple(replace(leaf, path=f"{tree.path}/{leaf.name}") for leaf in tree.leaves())
    settings = tree.aggregator
    if settings.sample.min > len(leaves):
        raise ConfigError(f"nodes.{tree.path}.sample.min: above the number of leaves")
    return FederationNode(tree.path, settings, leaves)


def render(tree: FederationNode) -> str:
    """The tree drawn as indented text, one node per line."""
    lines = []
    for node in tree.walk():
        depth = node.path.count("/")
        label = node.name
        if node.is_leaf:
            label += f"  [{_source_label(node.data)}]"
        else:
            label += f"  (inner_rounds={node.aggregator.inner_rounds})"
        lines.append("  " * depth + ("- " if depth else "") + label)
    return "\n".join(lines)


def _source_label(data: LeafDataConfig) -> str:
    """A leaf's source in a few words: its files, corpus or dataset (and its shard of it)."""
    if data.dataset is None and data.hub is None:
        return data.corpus or ", ".join(data.paths or [])
    label = data.dataset or f"hub {data.hub}"
    if data.shard is not None:
        label += f", {data.shard.kind} part {data.shard.index + 1} of {data.shard.leaves}"
    return label
