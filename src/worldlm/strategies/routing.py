"""Residual embeddings and their routing between sub-federations (DESIGN §5.7).

A sub-federation's residual is, per key-layer matrix, the rank-r truncated SVD of K_p - K_ref,
kept as two factors (U S, V) so that it is tens of times smaller than K and is not K. The root
compares residuals by cosine similarity computed from the factors alone and routes to each
sub-federation its top-k most similar others, with softmax(similarity / tau) weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from worldlm.core.messages import Factors, Residual

__all__ = ["Factors", "Residual", "decode", "low_rank_factors", "route"]


def low_rank_factors(delta: torch.Tensor, rank: int) -> Factors:
    """The best rank-`rank` approximation of a matrix, as (U S, V) in float32."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).float(), vh[:r].T.float()


def decode(factors: Factors) -> torch.Tensor:
    """The matrix a pair of factors stands for."""
    left, right = factors
    return left.double() @ right.double().T


def factor_inner(a: Factors, b: Factors) -> float:
    """<A, B>_F from the factors alone: sum((Ua^T Ub) * (Va^T Vb))."""
    return float(((a[0].double().T @ b[0].double()) * (a[1].double().T @ b[1].double())).sum())


def residual_cosine(a: Residual, b: Residual) -> float:
    """Cosine similarity of two residuals over all their matrices (0 when either is zero)."""
    dot = sum(factor_inner(a[k], b[k]) for k in a)
    norm_a = math.sqrt(max(sum(factor_inner(a[k], a[k]) for k in a), 0.0))
    norm_b = math.sqrt(max(sum(factor_inner(b[k], b[k]) for k in b), 0.0))
    return dot / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else 0.0


def route(
    residuals: Mapping[str, Residual], *, top_k: int, tau: float
) -> dict[str, list[tuple[str, float]]]:
    """For each sub-federation, its `top_k` most similar others and their softmax weights."""
    names = sorted(residuals)
    routes: dict[str, list[tuple[str, float]]] = {}
    for dest in names:
        others = [
            (residual_cosine(residuals[dest], residuals[src]), src) for src in names if src != dest
        ]
        best = sorted(others, key=lambda x: (-x[0], x[1]))[:top_k]
        if not best:
            continue
        weights = torch.softmax(torch.tensor([s for s, _ in best], dtype=torch.float64) / tau, 0)
        routes[dest] = [(src, float(w)) for (_, src), w in zip(best, weights, strict=True)]
    return routes
