"""Attention aggregation of key layers (after FedAtt, Ji et al. 2019; DESIGN §5.5).

Per key layer l, with the aggregator's current K_p and each child's K_c:
    d_c = ||K_p - K_c||_2,  s_c = -d_c / (tau * median_c d_c) + log n_c,  a = softmax(s),
    K_p <- K_p + eps * sum_c a_c (K_c - K_p)
Closer children weigh more; tau -> inf gives size-weighted averaging.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def layer_distance(current: Sequence[torch.Tensor], child: Sequence[torch.Tensor]) -> float:
    """L2 distance between two layers given as lists of tensors (all of a layer's parameters)."""
    total = sum(
        float((a.double() - b.double()).pow(2).sum()) for a, b in zip(current, child, strict=True)
    )
    return total**0.5


def attention_weights(
    distances: torch.Tensor, sizes: torch.Tensor, tau: float, median: float | None = None
) -> torch.Tensor:
    """Softmax of -d / (tau * median d) + log n over children (float64). `median` may be given
    when it should not count every distance (a child's zero distance to itself)."""
    d = distances.double()
    if median is None:
        median = float(d.median()) if d.numel() else 0.0
    scale = tau * median if median > 0 else 1.0  # all children equally far: distance says nothing
    scores = -d / scale + torch.log(sizes.double())
    return torch.softmax(scores, dim=0)


def attend(
    current: torch.Tensor, children: Sequence[torch.Tensor], weights: torch.Tensor, eps: float
) -> torch.Tensor:
    """K_p + eps * sum_c a_c (K_c - K_p), computed in float64 and returned in K_p's dtype."""
    base = current.double()
    step = torch.zeros_like(base)
    for weight, child in zip(weights.tolist(), children, strict=True):
        step += weight * (child.double() - base)
    return (base + eps * step).to(current.dtype)
