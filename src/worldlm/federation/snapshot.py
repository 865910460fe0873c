"""The whole federation's state as one tensor dict plus metadata, and back.

All randomness is derived from (seed, node, round), so no RNG state needs saving: counters,
weights and optimizer moments are the whole state.
"""

from __future__ import annotations

from typing import Any

import torch

from worldlm.errors import CheckpointError
from worldlm.federation.build import Federation


def snapshot(
    fed: Federation, round_index: int, tokens: float, run_id: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every node's state under `node/<path>#<key>`; counters in the metadata."""
    tensors: dict[str, torch.Tensor] = {}
    nodes_meta: dict[str, Any] = {}
    for path, node in sorted(fed.nodes().items()):
        node_tensors, node_meta = node.snapshot()
        # '#' cannot occur in a node path, so a path never swallows another node's keys.
        tensors.update({f"node/{path}#{k}": v for k, v in node_tensors.items()})
        nodes_meta[path] = node_meta
    meta = {"run_id": run_id, "global_round": round_index, "tokens": tokens, "nodes": nodes_meta}
    return tensors, meta


def restore(fed: Federation, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Put every node back in the state a snapshot recorded."""
    nodes = fed.nodes()
    recorded = meta.get("nodes", {})
    if set(recorded) != set(nodes):
        raise CheckpointError(
            f"the checkpoint's nodes {sorted(recorded)} differ from this run's {sorted(nodes)}"
        )
    for path, node in nodes.items():
        prefix = f"node/{path}#"
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        node.restore(own, recorded[path])
