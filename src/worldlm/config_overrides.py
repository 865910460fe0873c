"""`--set` overrides that name a node: they change a node the config has, never add one.

Setting a key under `nodes.PATH` creates the table when PATH is not there, so a typo in a node
path (`nodes.world/medcal.inner_rounds=2`) would silently add a new node, a leaf without data or
an orphan, instead of changing the intended one. New nodes belong in the config file.
"""

from __future__ import annotations

import difflib
from typing import Any

from worldlm.config_toml import parse_override
from worldlm.errors import ConfigError


def refuse_unknown_nodes(data: dict[str, Any], overrides: list[str]) -> None:
    """ConfigError for the first override under `nodes.` whose node path `data` lacks. With a
    `[partition]` the tree is generated later, and its expansion refuses a table for a node it
    does not generate (`partition_tree`)."""
    if "partition" in data:
        return
    nodes = data.get("nodes")
    known = sorted(nodes) if isinstance(nodes, dict) else []
    for item in overrides:
        keys, _ = parse_override(item)
        if len(keys) < 2 or keys[0] != "nodes" or keys[1] in known:
            continue
        close = difflib.get_close_matches(keys[1], known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"--set {item}: the config has no node {keys[1]!r}{hint}; its nodes are "
            f"{', '.join(known) or 'none'}. A --set changes a node the config has; add a new "
            "node as its own table in the config file"
        )
