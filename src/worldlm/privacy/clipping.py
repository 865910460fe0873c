"""L2 clipping of a child's change to the model (DP-FedAvg, McMahan et al. 2018).

Clipping bounds each child's influence on the sum by C, which is what the Gaussian noise is
calibrated to; the bound must therefore hold for any input an adversarial child can send. Norms
are computed in float64 with per-tensor rescaling, so finite values as large as 1e300 neither
overflow to inf nor let an unclipped change through. A non-finite norm is an error: the
aggregator's validation refuses NaN and infinite replies before they reach here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from worldlm.core.state import State


def tensor_norm(x: torch.Tensor) -> float:
    """L2 norm of one tensor in float64, rescaled by its largest magnitude so that squaring
    cannot overflow; NaN or inf in `x` give a non-finite result."""
    if x.numel() == 0:
        return 0.0
    x = x.double()
    scale = float(x.abs().max())
    if scale == 0.0 or not math.isfinite(scale):
        return scale
    return scale * float(torch.linalg.vector_norm(x / scale))


def l2_norm(tensors: Iterable[torch.Tensor]) -> float:
    """L2 norm over several tensors taken as one vector; raises ValueError if not finite."""
    # math.hypot scales its arguments itself, so the combination cannot overflow either.
    norm = math.hypot(*(tensor_norm(t) for t in tensors))
    if not math.isfinite(norm):
        raise ValueError(f"change norm is {norm}: NaN or infinite values reached clipping")
    return norm


def delta_norm(model: State, current: State) -> float:
    """L2 norm of `model - current` over every key of `model`, in float64."""
    # One key's difference at a time: memory stays at one tensor beyond the inputs.
    return l2_norm(model[k].double() - current[k].double() for k in model)


def clip_factor(norm: float, clip: float) -> float:
    """min(1, C / norm): the factor that brings a change of L2 norm `norm` within C."""
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"clip bound C must be a positive finite number, got {clip}")
    if not (norm >= 0 and math.isfinite(norm)):
        raise ValueError(f"norm must be a non-negative finite number, got {norm}")
    return 1.0 if norm <= clip else clip / norm


def clip_delta(delta: State, clip: float) -> State:
    """`delta` scaled to L2 norm at most C, in float64 (unchanged values if already within)."""
    factor = clip_factor(l2_norm(delta.values()), clip)
    return {k: v.double() * factor for k, v in delta.items()}
