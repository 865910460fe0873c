"""Deterministic child selection from (run seed, node path, round)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from worldlm.config import SampleConfig
from worldlm.seeding import generator


def sample_count(n_children: int, cfg: SampleConfig) -> int:
    """How many children a round samples: ceil(fraction * n), at least `min`, at most n."""
    return min(n_children, max(cfg.min, math.ceil(cfg.fraction * n_children - 1e-9)))


def select_children(
    children: Sequence[str],
    sizes: Sequence[float],
    cfg: SampleConfig,
    *,
    seed: int,
    path: str,
    round_index: int,
) -> list[str]:
    """The children sampled this round, in path order; without replacement, uniformly or
    weighted by data size. The same inputs always give the same choice."""
    ordered = sorted(range(len(children)), key=lambda i: children[i])
    k = sample_count(len(children), cfg)
    if k == len(children):
        return [children[i] for i in ordered]
    gen = generator(seed, path, "select", round_index)
    if cfg.weighting == "data_size":
        weights = torch.tensor([max(float(sizes[i]), 1e-12) for i in ordered], dtype=torch.float64)
        picks = torch.multinomial(weights, k, replacement=False, generator=gen)
    else:
        picks = torch.randperm(len(ordered), generator=gen)[:k]
    chosen = sorted(int(p) for p in picks)
    return [children[ordered[i]] for i in chosen]
