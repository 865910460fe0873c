"""What a child may report besides its weights (issue 19, item 5): metrics rows about its own
subtree, of the kinds the engine writes, each with an integer round and the fields its kind's
schema gives (`record_schema`). A child that sends a row
about a sibling (a forged ε, a root aggregate), of an unknown kind, or with a round that is not
an integer (which would break every later resume) is refused like any malformed reply."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worldlm.errors import UpdateRejected, shown
from worldlm.federation.record_schema import schema_problem
from worldlm.tree import FederationNode

# The rows nodes below an aggregator write: a leaf's training and local DP, an inner
# aggregator's own round, its DP accounting and its incidents (dropouts, refusals).
INCIDENT_KINDS = frozenset({"dropped", "refused", "rejected"})
CHILD_RECORD_KINDS = frozenset({"train", "privacy", "aggregate"}) | INCIDENT_KINDS


# Rows a node's reply can carry per round of its parent: a leaf's training row and its local
# DP row; an inner aggregator's own rows (aggregate, DP accounting) and its incidents (dropouts,
# refusals, rejections: at most INCIDENTS_PER_CHILD per child per inner round are written, so
# that a flood of refused messages at an honest aggregator cannot get its reply refused above),
# with its children's rows.
_LEAF_ROWS = 2
_AGGREGATOR_ROWS = 2
INCIDENTS_PER_CHILD = 4


def record_limits(tree: FederationNode) -> dict[str, int]:
    """Every node's most rows per reply, keyed by path: what the engine itself would send."""
    limits: dict[str, int] = {}

    def limit(node: FederationNode) -> int:
        if node.is_leaf:
            value = _LEAF_ROWS
        else:
            below = sum(limit(child) for child in node.children)
            own = _AGGREGATOR_ROWS + INCIDENTS_PER_CHILD * len(node.children)
            value = node.aggregator.inner_rounds * (below + own)
        limits[node.path] = value
        return value

    limit(tree)
    return limits


def check_records(sender: str, records: Sequence[Any], limit: int | None = None) -> None:
    """Refuse `records` unless each is a row of a known kind about `sender` or a node below it,
    with an integer round, and there are at most `limit` (None: any); UpdateRejected names
    the first that is not."""
    if limit is not None and len(records) > limit:
        raise UpdateRejected(
            sender, f"{len(records)} metrics rows, more than the {limit} its subtree writes"
        )
    for i, row in enumerate(records):
        if not isinstance(row, dict):
            raise UpdateRejected(sender, f"records[{i}] is not an object")
        kind, node, round_index = row.get("kind"), row.get("node"), row.get("round")
        if kind not in CHILD_RECORD_KINDS:
            raise UpdateRejected(sender, f"records[{i}] is of unknown kind {shown(repr(kind))}")
        if not isinstance(node, str) or not (node == sender or node.startswith(sender + "/")):
            raise UpdateRejected(
                sender, f"records[{i}] is about {shown(repr(node))}, outside its own subtree"
            )
        if not isinstance(round_index, int) or isinstance(round_index, bool):
            raise UpdateRejected(sender, f"records[{i}] has round {shown(repr(round_index))}")
        problem = schema_problem(kind, row)
        if problem is not None:
            raise UpdateRejected(sender, f"records[{i}] is {shown(problem)}")


def trim_incidents(records: list[Any], node: str, cap: int) -> list[Any]:
    """`records` with at most `cap` of `node`'s own incident rows (the first ones): a child that
    floods an honest aggregator with bad messages fills its audit log, not its reply."""
    kept: list[Any] = []
    for row in records:
        if row.get("node") == node and row.get("kind") in INCIDENT_KINDS:
            if cap <= 0:
                continue
            cap -= 1
        kept.append(row)
    return kept
