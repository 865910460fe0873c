"""User-level DP-FedAvg at one aggregator (McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models"), with optional adaptive clipping (Andrew et al. 2021).

Each child's change to the current model is clipped to L2 norm C and added to a float64 sum with
weight 1. Equal weights are what make the sum's sensitivity C: adding or removing one child moves
it by at most C, whatever that child claims about its token count (a token-weighted mean would let
one child's weight, and so its influence, be unbounded). Gaussian noise N(0, (z C)²) is added to
the sum once per round, and the sum is divided by the *expected* number of children, a public
constant, rather than by the number that replied: dividing by the count would release the count,
and with it whether a given child took part (McMahan et al.'s fixed-denominator estimator).

Updates are folded in one at a time, so memory holds one float64 sum beyond the inputs.
"""

from __future__ import annotations

import math
import secrets

import torch

from worldlm.core.messages import State, Update
from worldlm.errors import UpdateRejected
from worldlm.privacy.adaptive import AdaptiveClip
from worldlm.privacy.clipping import clip_delta, clip_factor, l2_norm
from worldlm.seeding import derive_seed


def noise_generator(seeded: bool, seed: int, *parts: object) -> torch.Generator:
    """The generator DP noise is drawn from.

    Seeded from `derive_seed(seed, *parts)` when `seeded`: reproducible runs and bit-exact
    resume, for experiments only, since anyone who knows the run seed can subtract the noise.
    Otherwise seeded from 63 bits of the OS's secure randomness (`secrets`). The draws themselves
    come from torch's Mersenne Twister, which is not a cryptographic generator."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *parts) if seeded else secrets.randbits(63))
    return gen


def gaussian_like(x: torch.Tensor, stddev: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, stddev²) per coordinate, float64, shaped like `x` (drawn even when stddev is 0, so
    the generator's stream does not depend on the noise level)."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float64).mul_(stddev)


def local_dp(delta: State, clip: float, z_local: float, generator: torch.Generator) -> State:
    """A leaf's own privatization of its change: clip to C, then add N(0, (z_local C)²) per
    coordinate (float64). The parent sees only the noisy change."""
    if not z_local >= 0:
        raise ValueError(f"local noise multiplier must be >= 0, got {z_local}")
    clipped = clip_delta(delta, clip)
    return {k: v.add_(gaussian_like(v, z_local * clip, generator)) for k, v in clipped.items()}


class DPRound:
    """One DP-FedAvg round: a RoundAggregation whose result is the current model plus the noisy
    mean of the clipped changes, in float64 with scale 1.0 (the caller casts)."""

    def __init__(
        self,
        current: State,
        clip: float,
        noise_multiplier: float,
        expected_children: int,
        generator: torch.Generator,
        adaptive: AdaptiveClip | None = None,
    ) -> None:
        clip_factor(0.0, clip)  # validates C
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise multiplier must be a finite number >= 0: {noise_multiplier}")
        if expected_children < 1:
            raise ValueError(f"expected children must be >= 1, got {expected_children}")
        if adaptive is not None and adaptive.clip != clip:
            raise ValueError(f"clip {clip} is not the adaptive clip's current {adaptive.clip}")
        self.current = current
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_children = int(expected_children)
        self.generator = generator
        self.adaptive = adaptive
        self.clipped = 0  # updates whose change was scaled down this round
        self.last_norm: float | None = None  # the latest update's change norm, before clipping
        self.last_clip_factor: float | None = None  # min(1, C / last_norm)
        self._sums: State = {}
        self._count = 0
        self._result: tuple[State, float] | None = None

    @property
    def count(self) -> int:
        return self._count

    @property
    def noise_stddev(self) -> float:
        """Standard deviation of the noise on each coordinate of the clipped sum: z C."""
        return self.noise_multiplier * self.clip

    @property
    def mean_noise_stddev(self) -> float:
        """Standard deviation of the noise on each coordinate of the new model: z C / n."""
        return self.noise_stddev / self.expected_children

    def _change(self, update: Update, key: str) -> torch.Tensor:
        """One key of the child's change (model - current), a fresh float64 tensor."""
        return update.state[key].double() / update.scale - self.current[key].double()

    def add(self, update: Update) -> tuple[float, float]:
        """Clip the child's change to C and fold it into the sum; returns (norm, clip factor)."""
        if self._result is not None:
            raise RuntimeError("DPRound.add after result(): the round's noise is already drawn")
        try:
            norm = l2_norm(self._change(update, k) for k in update.state)
        except ValueError as exc:
            raise UpdateRejected(update.sender, str(exc)) from exc
        factor = clip_factor(norm, self.clip)
        # Two passes over the keys (norm, then sum) keep memory at one key's change.
        for key in update.state:
            change = self._change(update, key)
            if key in self._sums:
                self._sums[key].add_(change, alpha=factor)
            else:
                self._sums[key] = change.mul_(factor)
        self._count += 1
        self.clipped += int(factor < 1.0)
        self.last_norm, self.last_clip_factor = norm, factor
        return norm, factor

    def add_sum(self, changes: State, count: int, clipped: int) -> None:
        """Fold in the sum of `count` changes that their children clipped to C themselves, of
        which `clipped` were scaled down (secure aggregation: the parent sees only the sum)."""
        if self._result is not None:
            raise RuntimeError("DPRound.add_sum after result(): the round's noise is drawn")
        for key, total in changes.items():
            if key in self._sums:
                self._sums[key].add_(total.double())
            else:
                self._sums[key] = total.double().clone()
        self._count += count
        self.clipped += clipped

    def result(self) -> tuple[State, float]:
        """current + (sum + N(0, (z C)²)) / expected children, float64, scale 1.0.

        The noise is drawn once: later calls return the same result. Noise is added even when
        no update arrived, so the output does not reveal that. With adaptive clipping, C is then
        updated from this round's noisy unclipped count, for the next round."""
        if self._result is None:
            self._result = (self._noisy_model(), 1.0)
            if self.adaptive is not None:
                unclipped = self._count - self.clipped
                self.adaptive.update(unclipped, self.expected_children, self.generator)
        return self._result

    def _noisy_model(self) -> State:
        # The replies' keys (one set per round); with no reply, every key of the current model.
        keys = list(self._sums) if self._sums else list(self.current)
        model: State = {}
        for key in keys:
            base = self.current[key].to(torch.float64, copy=True)  # never alias `current`
            total = self._sums.get(key, torch.zeros_like(base))
            noisy = total.add_(gaussian_like(base, self.noise_stddev, self.generator))
            model[key] = base.add_(noisy, alpha=1.0 / self.expected_children)
        return model
