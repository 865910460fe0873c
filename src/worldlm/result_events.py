"""The last JSON event of `worldlm run --json` and `worldlm compare --json`: the tables the
commands print for people, as data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worldlm.report_table import perplexity_rows

if TYPE_CHECKING:
    from worldlm.comparison import MethodResult
    from worldlm.outputs import RunResult


def run_result_event(result: RunResult) -> dict[str, Any]:
    """Per leaf: validation tokens and perplexity before and after training, and the change
    in percent; "all_leaves" the same for the token-weighted merge of every leaf."""
    rows = [
        {
            "leaf": leaf,
            "val_tokens": after.tokens,
            "ppl_before": before.ppl,
            "ppl_after": after.ppl,
            "change_pct": (after.ppl - before.ppl) / before.ppl * 100.0,
        }
        for leaf, before, after in perplexity_rows(result.before, result.after)
    ]
    merged = rows.pop()
    del merged["leaf"]
    return {
        "event": "result",
        "run_dir": str(result.run_dir),
        "rounds": result.rounds,
        "stop_reason": result.stop_reason,
        "tokens": result.tokens,
        "parameters": result.parameters,
        "leaves": rows,
        "all_leaves": merged,
    }


def compare_result_event(
    out: Path, results: Sequence[MethodResult], fedavg_to_worldlm: float | None
) -> dict[str, Any]:
    """Per method: each leaf's final validation perplexity, their mean and the worst."""
    return {
        "event": "result",
        "out": str(out),
        "methods": {
            r.method: {"leaves": dict(sorted(r.ppl.items())), "mean": r.mean, "worst": r.worst}
            for r in results
        },
        "fedavg_to_worldlm": fedavg_to_worldlm,
    }
