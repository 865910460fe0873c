"""What the root tells its observer when a round ends: the numbers a progress line or a JSON
event shows (quality, work done, traffic, time), gathered from the round's results and rows."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from worldlm.core.messages import EvalResult
from worldlm.train.evaluate import merge_results


@dataclass(frozen=True)
class RoundSummary:
    round: int
    total: int  # stop.rounds: the most rounds the run may take (a stop condition may end it first)
    mean_ppl: float | None  # of the token-weighted mean validation loss; None: not evaluated
    worst_ppl: float | None  # the highest leaf perplexity; None: not evaluated
    worst_leaf: str | None
    tokens: float  # trained so far in the whole run (as summary.json counts them)
    bytes_sent: int | None  # model bytes over every link so far; None: no row reports traffic
    seconds: float  # this round's wall time: training and, if it ran, evaluation


def summarize_round(
    round_index: int,
    total: int,
    results: dict[str, EvalResult] | None,
    tokens: float,
    bytes_sent: int | None,
    seconds: float,
) -> RoundSummary:
    """`results` are the leaves' validation results by path, None when the round was not
    evaluated (eval.every)."""
    if not results:
        return RoundSummary(round_index, total, None, None, None, tokens, bytes_sent, seconds)
    worst_leaf = max(results, key=lambda path: results[path].ppl)
    return RoundSummary(
        round_index,
        total,
        merge_results(list(results.values())).ppl,
        results[worst_leaf].ppl,
        worst_leaf,
        tokens,
        bytes_sent,
        seconds,
    )


def wire_bytes(rows: Iterable[dict[str, Any]], before: int | None = None) -> int | None:
    """`before` plus the bytes down and up that the aggregate rows among `rows` report (each
    aggregator counts the traffic with its own children, so every link counts once); None if
    neither `before` nor any row has a number."""
    total = before
    for row in rows:
        if row.get("kind") != "aggregate":
            continue
        for key in ("bytes_down", "bytes_up"):
            value = row.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                total = (total or 0) + value
    return total
