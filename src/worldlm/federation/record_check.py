"""What a child may report besides its weights (issue 19, item 5): metrics rows about its own
subtree, of the kinds the engine writes, each with an integer round. A child that sends a row
about a sibling (a forged ε, a root aggregate), of an unknown kind, or with a round that is not
an integer (which would break every later resume) is refused like any malformed reply."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worldlm.errors import UpdateRejected, shown

# The rows nodes below an aggregator write: a leaf's training and local DP, an inner
# aggregator's own round, its DP accounting and its incidents (dropouts, refusals).
CHILD_RECORD_KINDS = frozenset({"train", "privacy", "aggregate", "dropped", "refused", "rejected"})


def check_records(sender: str, records: Sequence[Any]) -> None:
    """Refuse `records` unless each is a row of a known kind about `sender` or a node below it,
    with an integer round; UpdateRejected names the first that is not."""
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
