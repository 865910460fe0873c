"""Backbone B / key layers K, chosen by module structure (DESIGN §5.1), never by name matching.

K = the last ceil(key_fraction * n_blocks) transformer blocks plus the final norm; B = the rest,
embeddings included (also when tied to the output head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from worldlm.errors import ModelError


@dataclass(frozen=True)
class Partition:
    """Key-layer parameter names grouped by layer (each block, then the final norm)."""

    groups: dict[str, tuple[str, ...]]  # layer name -> parameter names, in module order

    @property
    def key_names(self) -> frozenset[str]:
        return frozenset(name for names in self.groups.values() for name in names)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the longest ModuleList whose items all share one class."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(m) for m in module}) == 1
    ]
    if not candidates:
        raise ModelError(f"{type(model).__name__}: no list of transformer blocks found")
    return max(candidates, key=lambda c: len(c[1]))


def find_final_norm(model: nn.Module, blocks_path: str) -> str | None:
    """The norm applied after the blocks: a normalization module beside the block list."""
    parent_path = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    parent = model.get_submodule(parent_path) if parent_path else model
    norms = [
        name
        for name, child in parent.named_children()
        if isinstance(child, nn.LayerNorm) or "norm" in type(child).__name__.lower()
    ]
    if not norms:
        return None
    return f"{parent_path}.{norms[-1]}" if parent_path else norms[-1]


def key_layer_partition(model: nn.Module, key_fraction: float) -> Partition:
    """The key layers of `model` for `key_fraction` in [0, 1]; empty when it is 0."""
    if key_fraction <= 0:
        return Partition({})
    blocks_path, blocks = find_blocks(model)
    n_key = min(len(blocks), math.ceil(key_fraction * len(blocks)))
    modules = [f"{blocks_path}.{i}" for i in range(len(blocks) - n_key, len(blocks))]
    norm = find_final_norm(model, blocks_path)
    if norm is not None:
        modules.append(norm)
    # named_parameters lists each tied tensor once, under its first (embedding) name, so a tied
    # head never lands in K.
    names = [name for name, _ in model.named_parameters()]
    groups = {module: tuple(n for n in names if n.startswith(module + ".")) for module in modules}
    return Partition({k: v for k, v in groups.items() if v})


def split_state(
    state: dict[str, torch.Tensor], keys: frozenset[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone, key layers) of a state dict."""
    backbone = {k: v for k, v in state.items() if k not in keys}
    key_layers = {k: v for k, v in state.items() if k in keys}
    return backbone, key_layers
