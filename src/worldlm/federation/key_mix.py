"""Where a WorldLM leaf starts a round: a share of the way from its own weights toward what it
is sent, fixed (`worldlm.key_mix`) or chosen each round on held-out text of its own
(`worldlm.key_mix_choice = "validated"`).

A fixed share treats every member alike; the study found a member whose text a model of its
own memorizes (Russian among Latin-script languages) better off alone than at any fixed share
its siblings gain from. A validated choice lets each leaf measure which start serves its text:
the loss of each candidate start on a part of its training blocks that it never trains on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from worldlm.core.messages import State
from worldlm.errors import DataError
from worldlm.seeding import generator


def mixed_start(own: State, incoming: State, share: float) -> State:
    """`own` moved `share` of the way toward `incoming` (0: own, 1: incoming), key by key."""
    if share == 1.0:
        return {key: incoming[key] for key in own}
    if share == 0.0:
        return dict(own)
    return {key: torch.lerp(v, incoming[key].to(v.dtype), share) for key, v in own.items()}


@dataclass(frozen=True)
class FixedMix:
    """The same share every round."""

    share: float

    def choose(self, loss_at: Callable[[float], float]) -> tuple[float, dict[str, float]]:
        return self.share, {}


@dataclass(frozen=True)
class ValidatedMix:
    """The candidate share whose start has the lowest loss on the leaf's held-out blocks
    (`loss_at(share)`); ties go to the earlier candidate."""

    candidates: tuple[float, ...]

    def choose(self, loss_at: Callable[[float], float]) -> tuple[float, dict[str, float]]:
        losses = {str(share): loss_at(share) for share in self.candidates}
        best = min(self.candidates, key=lambda share: losses[str(share)])
        return best, losses


MixChoice = FixedMix | ValidatedMix


def split_dev(
    blocks: torch.Tensor, fraction: float, seed: int, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(training blocks, held-out blocks): `fraction` of `blocks` (at least one, and at least
    one left to train on) picked by the run's seed and the leaf's name, the rest in order."""
    n = int(blocks.shape[0])
    if n < 2:
        raise DataError(
            f"leaf {name}: {n} training block(s); holding some out to choose the key mix on "
            "needs at least 2 (more text, a smaller model.block_size, or "
            "worldlm.key_mix_choice = 'fixed')"
        )
    held = min(n - 1, max(1, round(fraction * n)))
    order = torch.randperm(n, generator=generator(seed, name, "dev"))
    dev = torch.sort(order[:held]).values
    train = torch.sort(order[held:]).values
    return blocks[train], blocks[dev]


def mix_choice(choice: str, share: float, candidates: Sequence[float]) -> MixChoice:
    return ValidatedMix(tuple(candidates)) if choice == "validated" else FixedMix(share)
