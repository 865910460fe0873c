"""Fairness across leaves: how the worst-served client fares against the best and the mean.

Pure functions over per-leaf perplexities. Every leaf counts once, whatever its number of
tokens: fairness is about clients, so the mean here is the unweighted mean of the leaves'
perplexities (the token-weighted figure is the node's own `eval` row).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any


def fairness_figures(ppl_by_leaf: Mapping[str, float]) -> dict[str, Any]:
    """Worst and best leaf, the gap between them, the spread (population standard deviation)
    and the unweighted mean of the leaves' perplexities. Needs at least one leaf."""
    if not ppl_by_leaf:
        raise ValueError("fairness needs at least one leaf")
    # Ties go to the first path in sorted order, so the figures do not depend on dict order.
    ordered = sorted(ppl_by_leaf.items())
    worst_leaf, worst = max(ordered, key=lambda item: item[1])
    best_leaf, best = min(ordered, key=lambda item: item[1])
    values = [ppl for _, ppl in ordered]
    finite = all(math.isfinite(v) for v in values)
    return {
        "leaves": len(values),
        "mean_ppl": statistics.fmean(values) if finite else math.inf,
        "worst_leaf": worst_leaf,
        "worst_ppl": worst,
        "best_leaf": best_leaf,
        "best_ppl": best,
        "gap": worst - best if finite else math.inf,
        "spread": statistics.pstdev(values) if finite else math.inf,
    }
