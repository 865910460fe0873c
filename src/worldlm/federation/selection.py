"""Child selection, after leaving out children that are unavailable, too small, or benched as
chronic stragglers: deterministic from (run seed, node path, round), or, at a node with
differential privacy, from the OS's secure randomness."""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

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
    secure: bool = False,
) -> list[str]:
    """The children sampled this round, in path order; without replacement, uniformly or
    weighted by data size. The same inputs always give the same choice, unless `secure`: then
    the draw is seeded from the OS's secure randomness (what DP's accounting assumes)."""
    ordered = sorted(range(len(children)), key=lambda i: children[i])
    k = sample_count(len(children), cfg)
    if k == len(children):
        return [children[i] for i in ordered]
    if secure:
        gen = torch.Generator()
        gen.manual_seed(secrets.randbits(63))
    else:
        gen = generator(seed, path, "select", round_index)
    if cfg.weighting == "data_size":
        claimed = capped_sizes([float(sizes[i]) for i in ordered])
        weights = torch.tensor([max(v, 1e-12) for v in claimed], dtype=torch.float64)
        picks = torch.multinomial(weights, k, replacement=False, generator=gen)
    else:
        picks = torch.randperm(len(ordered), generator=gen)[:k]
    chosen = sorted(int(p) for p in picks)
    return [children[ordered[i]] for i in chosen]


# Sizes are what children claim about themselves: one claiming 1e18 tokens would be sampled in
# every round. Each is capped at this many times the median claim of its siblings, which an
# honest federation of unequal members rarely reaches and a liar cannot pass.
SIZE_CAP_OVER_MEDIAN = 10.0


def capped_sizes(sizes: Sequence[float]) -> list[float]:
    """`sizes` with each (non-finite or negative ones as 0) at most SIZE_CAP_OVER_MEDIAN times
    their median."""
    clean = [v if math.isfinite(v) and v > 0 else 0.0 for v in sizes]
    ordered = sorted(clean)
    median = ordered[len(ordered) // 2] if ordered else 0.0
    cap = SIZE_CAP_OVER_MEDIAN * median if median > 0 else math.inf
    return [min(v, cap) for v in clean]


def eligible(
    resources: Mapping[str, Mapping[str, Any]],
    cfg: SampleConfig,
    benched_until: Mapping[str, int],
    round_index: int,
) -> list[str]:
    """The children that may be sampled this round, in path order: not benched as stragglers,
    and (where they reported it when attaching) available with enough memory. A child that
    reported nothing, like every in-process child, is eligible."""
    kept = []
    for path in sorted(resources):
        reported = resources[path]
        if benched_until.get(path, -1) > round_index:
            continue
        if cfg.skip_unavailable and reported.get("available") is False:
            continue
        memory = reported.get("memory_gb")
        if cfg.min_memory_gb and isinstance(memory, int | float) and memory < cfg.min_memory_gb:
            continue
        kept.append(path)
    return kept


def update_stragglers(
    selected: Sequence[str],
    answered: set[str],
    misses: dict[str, int],
    benched_until: dict[str, int],
    cfg: SampleConfig,
    round_index: int,
) -> list[str]:
    """Count rounds in a row each selected child failed to answer; bench one that reached
    `straggler_misses` for `straggler_cooldown` rounds. Returns the children benched now."""
    benched = []
    for child in selected:
        if child in answered:
            misses.pop(child, None)
            continue
        misses[child] = misses.get(child, 0) + 1
        if cfg.straggler_misses and misses[child] >= cfg.straggler_misses:
            benched_until[child] = round_index + 1 + cfg.straggler_cooldown
            misses.pop(child)
            benched.append(child)
    return benched
