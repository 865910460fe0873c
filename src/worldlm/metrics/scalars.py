"""Which numbers of a metrics row become curves: (tag, value) pairs for TensorBoard or MLflow.

Tags read `<figure>/<node path>`, so TensorBoard groups one figure's curves across the tree and
its tag filter can pick a subtree. Rows of kinds not listed here (refusals, drop-outs) are
events, not curves, and stay in metrics.jsonl and the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# kind -> (field, figure name)
_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "eval": (("loss", "val_loss"), ("ppl", "val_ppl")),
    "eval_global": (("loss", "val_loss_global"), ("ppl", "val_ppl_global")),
    "fairness": (
        ("worst_ppl", "fairness_worst_ppl"),
        ("best_ppl", "fairness_best_ppl"),
        ("mean_ppl", "fairness_mean_ppl"),
        ("gap", "fairness_gap"),
        ("spread", "fairness_spread"),
    ),
    "train": (("loss", "train_loss"), ("tokens", "train_tokens"), ("seconds", "train_seconds")),
    "aggregate": (
        ("seconds", "round_seconds"),
        ("tokens", "round_tokens"),
        ("bytes_down", "bytes_down"),
        ("bytes_up", "bytes_up"),
    ),
    "privacy": (("epsilon", "dp_epsilon"),),
    "checkpoint": (("bytes", "checkpoint_bytes"), ("seconds", "checkpoint_seconds")),
}


def scalars_of(row: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The finite numbers of `row` worth a curve, tagged `<figure>/<node>`."""
    fields = _FIELDS.get(str(row.get("kind")), ())
    node = str(row.get("node", ""))
    out: list[tuple[str, float]] = []
    for field, figure in fields:
        value = row.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out.append((f"{figure}/{node}", float(value)))
    if row.get("kind") == "aggregate" and isinstance(row.get("participants"), list):
        out.append((f"participants/{node}", float(len(row["participants"]))))
    return out
