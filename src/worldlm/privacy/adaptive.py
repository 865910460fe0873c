"""Adaptive clipping: move C geometrically toward a quantile of the changes' norms
(Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping").

Each round the aggregator counts how many children's changes were within C. The count is
released with Gaussian noise N(0, σ_b²) and C moves by C ← C · exp(−η (b̄ − γ)), so C grows while
too many changes are clipped and shrinks while too few are. The noisy count costs privacy too; the
update's own noise multiplier is raised to `update_noise_multiplier(z, σ_b)` so that the two
releases together are as private as one Gaussian mechanism with multiplier z (their Theorem 1).
"""

from __future__ import annotations

import math

import torch

from worldlm.errors import ConfigError


def default_count_stddev(expected_children: int) -> float:
    """σ_b = expected children / 20, the setting Andrew et al. suggest."""
    return expected_children / 20.0


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2): the noise multiplier for the update itself, so that the
    update and the noisy unclipped count together spend what multiplier z alone would.

    The count's sensitivity is 1/2 after centring (hence 2σ_b). Needs 2σ_b > z."""
    z, sigma_b = noise_multiplier, count_stddev
    if z < 0 or sigma_b < 0:
        raise ConfigError(f"noise_multiplier ({z}) and clip_count_stddev ({sigma_b}) must be >= 0")
    if z == 0:
        return 0.0  # no privacy asked for: the count's noise then only smooths the update of C
    if 2 * sigma_b <= z:
        raise ConfigError(
            f"adaptive clipping needs clip_count_stddev > noise_multiplier / 2 (Andrew et al. "
            f"2021, Thm 1), got clip_count_stddev={sigma_b:g} and noise_multiplier={z:g}: "
            f"raise clip_count_stddev (its default, expected children / 20, needs more than "
            f"{10 * z:g} expected children) or lower noise_multiplier"
        )
    return float((z**-2 - (2 * sigma_b) ** -2) ** -0.5)


class AdaptiveClip:
    """The clip bound C and its geometric update toward target quantile γ."""

    def __init__(
        self, clip: float, target_quantile: float, learning_rate: float, count_stddev: float
    ) -> None:
        if not (clip > 0 and math.isfinite(clip)):
            raise ConfigError(f"clip must be a positive finite number, got {clip}")
        if not 0 < target_quantile < 1:
            raise ConfigError(f"target_quantile must be in (0, 1), got {target_quantile}")
        if not learning_rate > 0:
            raise ConfigError(f"clip_learning_rate must be > 0, got {learning_rate}")
        if not count_stddev >= 0:
            raise ConfigError(f"clip_count_stddev must be >= 0, got {count_stddev}")
        self.clip = float(clip)
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.count_stddev = float(count_stddev)

    def update(self, unclipped_count: int, n: int, generator: torch.Generator) -> float:
        """Fold in one round: b̄ = (count + N(0, σ_b²)) / n, C ← C · exp(−η (b̄ − γ)); returns
        the new C. `n` is the expected number of children, not the number that replied, so that
        the release does not depend on who dropped out."""
        if n <= 0:
            raise ValueError(f"expected children must be positive, got {n}")
        # Drawn even when σ_b = 0, so the generator's stream does not depend on the setting.
        noise = float(torch.randn((), generator=generator, dtype=torch.float64))
        fraction = (unclipped_count + self.count_stddev * noise) / n
        self.clip *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return self.clip

    def state_dict(self) -> dict[str, float]:
        """The learned C; γ, η and σ_b come from the configuration."""
        return {"clip": self.clip}

    def load_state_dict(self, state: dict[str, float]) -> None:
        clip = float(state["clip"])
        if not (clip > 0 and math.isfinite(clip)):
            raise ValueError(f"checkpointed clip must be a positive finite number, got {clip}")
        self.clip = clip
