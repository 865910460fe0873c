"""The whole federation's state as one tensor dict plus metadata, and back.

All randomness is derived from (seed, node, round), so no RNG state needs saving: counters,
weights and optimizer moments are the whole state. Given a `PartStore`, each leaf's state goes
into a file of its own, written only when the leaf changed (`checkpoint_parts`).
"""

from __future__ import annotations

from typing import Any

import torch

from worldlm.checkpoint_parts import PART_KEY, PartStore
from worldlm.errors import CheckpointError
from worldlm.federation.build import Federation


def snapshot(
    fed: Federation,
    round_index: int,
    tokens: float,
    run_id: str,
    parts: PartStore | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every node's state under `node/<path>#<key>`; counters in the metadata. With `parts`,
    each leaf's state is in its file, named in the metadata (`{"part": <sha256>}`)."""
    tensors: dict[str, torch.Tensor] = {}
    nodes_meta: dict[str, Any] = {}
    versions = fed.leaf_versions() if parts is not None else {}
    for path, node in sorted(fed.nodes().items()):
        leaf = fed.leaves.get(path)
        if parts is not None and leaf is not None:
            nodes_meta[path] = {PART_KEY: parts.store(path, leaf, versions[path])}
            continue
        node_tensors, node_meta = node.snapshot()
        # '#' cannot occur in a node path, so a path never swallows another node's keys.
        tensors.update({f"node/{path}#{k}": v for k, v in node_tensors.items()})
        nodes_meta[path] = node_meta
    meta = {"run_id": run_id, "global_round": round_index, "tokens": tokens, "nodes": nodes_meta}
    return tensors, meta


def restore(
    fed: Federation,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    parts: PartStore | None = None,
) -> None:
    """Put every node back in the state a snapshot recorded (leaves named by their file read
    from `parts`, one at a time)."""
    nodes = fed.nodes()
    recorded = meta.get("nodes", {})
    if set(recorded) != set(nodes):
        raise CheckpointError(
            f"the checkpoint's nodes {sorted(recorded)} differ from this run's {sorted(nodes)}"
        )
    for path, node in nodes.items():
        entry = recorded[path]
        leaf = fed.leaves.get(path)
        if leaf is not None and isinstance(entry, dict) and PART_KEY in entry:
            if parts is None:
                raise CheckpointError(f"the checkpoint keeps {path}'s state in a file of its own")
            leaf.restore(*parts.load(entry[PART_KEY]))
            parts.remember(path, leaf.state_version, entry[PART_KEY])
            continue
        prefix = f"node/{path}#"
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        node.restore(own, entry)
