"""The run report as markdown: header, tree, tables, and links to the plots."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from worldlm.metrics.report import (
    Fairness,
    LeafResult,
    Participation,
    Report,
    last_value,
)
from worldlm.metrics.report_plots import Plots
from worldlm.tree import FederationNode

NONE = "—"


def fmt_ppl(value: float | None) -> str:
    """Perplexities to two decimals, thousands separated (a table reader compares leaves)."""
    if value is None:
        return NONE
    return f"{value:,.2f}" if math.isfinite(value) else str(value)


def fmt_pct(value: float | None) -> str:
    return NONE if value is None else f"{value:+.1f}%"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table; '|' inside a cell is escaped so reasons cannot break the columns."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def render_markdown(report: Report, plots: Plots, report_dir: Path, run_dir: Path) -> str:
    """The whole report; plot links are relative to `report_dir`, where report.md is written."""
    sections = [
        header_section(report, run_dir),
        tree_section(report),
        leaf_section(report.leaves),
        plots_section(report, plots, report_dir),
        fairness_section(report, plots, report_dir),
        privacy_section(report),
        participation_section(report),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def header_section(report: Report, run_dir: Path) -> list[str]:
    h = report.header
    lines = [f"# Run report: {h.name}", ""]
    if not h.finished:
        lines += [
            "**Unfinished run**: there is no summary.json (the run was interrupted or is still "
            "going). The figures below are what metrics.jsonl holds so far.",
            "",
        ]
    params = f"{h.parameters:,}" if h.parameters is not None else "unknown (run unfinished)"
    tokens = f"{h.tokens:,.0f}" + ("" if h.finished else " (summed from metrics.jsonl)")
    lines += [
        f"- run directory: `{run_dir}`",
        f"- method: {h.method}",
        f"- model: {h.model}",
        f"- rounds done: {h.rounds} of {h.planned_rounds}",
        f"- stop reason: {h.stop_reason or 'none yet (unfinished)'}",
        f"- parameters: {params}",
        f"- tokens trained: {tokens}",
    ]
    return lines


def tree_text(tree: FederationNode, evals: Mapping[str, Mapping[int, float]]) -> str:
    """The tree with box characters; each node with its perplexity at its last evaluation."""

    def label(node: FederationNode) -> str:
        last = last_value(evals.get(node.path, {}))
        if last is None:
            return f"{node.name}  (not evaluated)"
        kind = "ppl" if node.is_leaf else "merged ppl"
        return f"{node.name}  {kind} {fmt_ppl(last[1])} (round {last[0]})"

    lines = [label(tree)]

    def draw(node: FederationNode, prefix: str) -> None:
        for i, child in enumerate(node.children):
            last = i == len(node.children) - 1
            lines.append(prefix + ("└── " if last else "├── ") + label(child))
            draw(child, prefix + ("    " if last else "│   "))

    draw(tree, "")
    return "\n".join(lines)


def tree_section(report: Report) -> list[str]:
    return ["## Federation tree", "", "```text", tree_text(report.tree, report.evals), "```"]


def leaf_section(leaves: Sequence[LeafResult]) -> list[str]:
    with_global = any(leaf.global_after is not None for leaf in leaves)
    header = ["leaf", "ppl before (round 0)", "ppl after", "after round", "change"]
    if with_global:
        header.append("global model ppl")
    rows = []
    for leaf in leaves:
        row = [
            leaf.leaf,
            fmt_ppl(leaf.before),
            fmt_ppl(leaf.after),
            NONE if leaf.after_round is None else str(leaf.after_round),
            fmt_pct(leaf.change_pct),
        ]
        rows.append([*row, fmt_ppl(leaf.global_after)] if with_global else row)
    intro = (
        "Validation perplexity of the model each leaf deploys, before training and at its "
        "last evaluated round (lower is better)."
    )
    if with_global:
        intro += (
            " The last column is the global (root) model on the same data (the deployed model"
            " itself for methods that do not personalize)."
        )
    return ["## Perplexity per leaf", "", intro, "", *md_table(header, rows)]


def link(path: Path, report_dir: Path) -> str:
    return Path(os.path.relpath(path, report_dir)).as_posix()


def plots_section(report: Report, plots: Plots, report_dir: Path) -> list[str]:
    lines = ["## Perplexity per round", ""]
    if not plots.per_node:
        return [*lines, "No evaluation rows yet."]
    lines.append(
        "One plot per aggregator: each leaf below it, and the aggregator's merged curve "
        "(all its leaves' validation tokens together)."
    )
    for node, path in plots.per_node.items():
        lines += ["", f"![{node}: perplexity per round]({link(path, report_dir)})"]
    return lines


def fairness_section(report: Report, plots: Plots, report_dir: Path) -> list[str]:
    lines = [
        "## Fairness",
        "",
        "Per aggregator at its last evaluated round, over the leaves below it: gap = worst - "
        "best leaf perplexity, spread = standard deviation of the leaves' perplexities. "
        "Source: the run's fairness rows (recorded), or the leaves' eval rows (computed).",
        "",
    ]
    last = [series[-1] for series in report.fairness.values() if series]
    if not last:
        return [*lines, "No evaluation rows yet."]
    lines += md_table(
        [
            "aggregator",
            "round",
            "leaves",
            "mean ppl",
            "worst leaf",
            "worst ppl",
            "best leaf",
            "best ppl",
            "gap",
            "spread",
            "source",
        ],
        [_fairness_cells(f) for f in last],
    )
    if plots.fairness is not None:
        lines += ["", f"![fairness across leaves]({link(plots.fairness, report_dir)})"]
    return lines


def _fairness_cells(f: Fairness) -> list[str]:
    return [
        f.node,
        str(f.round),
        str(f.leaves),
        fmt_ppl(f.mean_ppl),
        f.worst_leaf,
        fmt_ppl(f.worst_ppl),
        f.best_leaf,
        fmt_ppl(f.best_ppl),
        fmt_ppl(f.gap),
        fmt_ppl(f.spread),
        f.source,
    ]


def privacy_section(report: Report) -> list[str]:
    lines = ["## Privacy", ""]
    if not report.privacy:
        return [*lines, "No differential privacy configured (no privacy rows in the metrics)."]
    rows = [[p.node, str(p.round), f"{p.epsilon:.4g}", f"{p.delta:.3g}"] for p in report.privacy]
    return [
        *lines,
        "Privacy spent per node, at its last round:",
        "",
        *md_table(["node", "round", "epsilon", "delta"], rows),
    ]


def participation_cell(entries: Sequence[Participation], node: str) -> str:
    """replies/selected per aggregation, with who was missing or benched and a failed status."""
    parts = []
    for p in entries:
        text = f"{len(p.participants)}/{len(p.selected)}"
        if p.missing:
            text += " missing: " + ", ".join(m.removeprefix(node + "/") for m in p.missing)
        if p.benched:
            text += " benched: " + ", ".join(b.removeprefix(node + "/") for b in p.benched)
        if p.status != "ok":
            text += f" **{p.status}**"
        parts.append(text)
    return "; ".join(parts) if parts else NONE


def participation_section(report: Report) -> list[str]:
    lines = ["## Participation", ""]
    if not report.participation:
        lines.append("No aggregation rows.")
    else:
        order = {node.path: i for i, node in enumerate(report.tree.walk())}
        nodes = sorted({p.node for p in report.participation}, key=lambda n: (order.get(n, 1e9), n))
        rounds = sorted({p.round for p in report.participation})
        cells: dict[tuple[int, str], list[Participation]] = {}
        for p in report.participation:
            cells.setdefault((p.round, p.node), []).append(p)
        lines += [
            "Replies / selected children of each aggregation (several per round when an "
            "aggregator runs inner rounds), with the children that did not reply.",
            "",
            *md_table(
                ["round", *nodes],
                [
                    [str(r), *(participation_cell(cells.get((r, n), []), n) for n in nodes)]
                    for r in rounds
                ],
            ),
        ]
    lines += ["", "### Rejected, refused and dropped", ""]
    if not report.incidents:
        return [*lines, "None."]
    rows = [[i.kind, i.reason, str(i.count), ", ".join(i.senders)] for i in report.incidents]
    return [*lines, *md_table(["kind", "reason", "count", "senders"], rows)]
