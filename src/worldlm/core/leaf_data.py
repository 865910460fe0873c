"""A leaf's private data, as the engine holds it: token blocks that never leave the leaf."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LeafData:
    """A leaf's private blocks: one training set and the validation sets it reports on."""

    name: str
    train_blocks: torch.Tensor  # (N, T)
    eval_sets: dict[str, torch.Tensor]  # name -> (M, T); normally {leaf name: its val blocks}

    @property
    def train_tokens(self) -> int:
        return int(self.train_blocks.numel())
