"""The per-leaf perplexity table printed at the end of a run."""

from __future__ import annotations

from rich.table import Table

from worldlm.core.messages import EvalResult
from worldlm.train.evaluate import merge_results


def perplexity_table(
    before: dict[str, EvalResult], after: dict[str, EvalResult], title: str
) -> Table:
    """One row per leaf: validation perplexity before and after training, and the change."""
    table = Table(title=title)
    table.add_column("leaf")
    table.add_column("val tokens", justify="right")
    table.add_column("ppl before", justify="right")
    table.add_column("ppl after", justify="right")
    table.add_column("change", justify="right")
    for path, b, a in perplexity_rows(before, after):
        change = (a.ppl - b.ppl) / b.ppl * 100.0
        table.add_row(path, str(a.tokens), f"{b.ppl:,.1f}", f"{a.ppl:,.1f}", f"{change:+.1f}%")
    return table


def perplexity_rows(
    before: dict[str, EvalResult], after: dict[str, EvalResult]
) -> list[tuple[str, EvalResult, EvalResult]]:
    """(leaf, before, after) per leaf by path, then ("(all leaves)", merged, merged)."""
    rows = [(path, before[path], after[path]) for path in sorted(after)]
    rows.append(
        ("(all leaves)", merge_results(list(before.values())), merge_results(list(after.values())))
    )
    return rows
