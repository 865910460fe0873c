"""The figures of a run report, gathered from a run directory's metrics rows.

Everything past `load_run` is a pure function from rows (and the configured tree) to small
frozen records, so the report's numbers can be tested without drawing or rendering anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worldlm.config import RunConfig
from worldlm.config_load import load_config
from worldlm.errors import WorldLMError
from worldlm.metrics.fairness import fairness_figures
from worldlm.metrics.jsonl import read_metrics
from worldlm.tree import FederationNode, build_tree

Row = Mapping[str, Any]
Series = dict[str, dict[int, float]]  # node path -> round -> perplexity

INCIDENT_KINDS = ("rejected", "refused", "dropped")


class ReportError(WorldLMError):
    """A directory cannot be reported on (missing, or not a run directory)."""


@dataclass(frozen=True)
class RunFiles:
    """What a run directory holds for a report; `summary` is None while a run is unfinished."""

    run_dir: Path
    config: RunConfig
    summary: dict[str, Any] | None
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class RunHeader:
    name: str
    method: str
    model: str
    finished: bool
    rounds: int  # rounds done (from the summary, else the last round with metrics)
    planned_rounds: int
    stop_reason: str | None
    parameters: int | None
    tokens: float  # tokens trained (from the summary, else summed from the metrics)


@dataclass(frozen=True)
class LeafResult:
    leaf: str
    before: float | None  # round 0, the untrained model
    after: float | None  # the leaf's last evaluated round, the model it deploys
    after_round: int | None
    global_after: float | None  # the global model on this leaf's data, at that round

    @property
    def change_pct(self) -> float | None:
        if self.before is None or self.after is None or self.before == 0:
            return None
        return (self.after - self.before) / self.before * 100.0


@dataclass(frozen=True)
class Fairness:
    """How evenly an aggregator's leaves are served at one round (perplexities, lower = better)."""

    node: str
    round: int
    leaves: int
    mean_ppl: float
    worst_leaf: str
    worst_ppl: float
    best_leaf: str
    best_ppl: float
    gap: float  # worst_ppl - best_ppl
    spread: float  # population standard deviation of the leaves' perplexities
    source: str  # "recorded" (the run's fairness rows) or "computed" (from leaf eval rows)


@dataclass(frozen=True)
class PrivacyFigure:
    node: str
    round: int
    epsilon: float
    delta: float


@dataclass(frozen=True)
class Participation:
    """One aggregation by one aggregator (several per root round when inner_rounds > 1)."""

    round: int
    node: str
    local_round: int
    status: str
    selected: tuple[str, ...]
    participants: tuple[str, ...]
    missing: tuple[str, ...]
    benched: tuple[str, ...]


@dataclass(frozen=True)
class IncidentCount:
    kind: str  # rejected, refused or dropped
    reason: str
    count: int
    senders: tuple[str, ...]


@dataclass(frozen=True)
class Report:
    header: RunHeader
    tree: FederationNode
    evals: Series
    global_evals: Series
    leaves: list[LeafResult]
    fairness: dict[str, list[Fairness]]  # aggregator path -> per evaluated round
    privacy: list[PrivacyFigure]
    participation: list[Participation]
    incidents: list[IncidentCount]


def load_run(run_dir: Path) -> RunFiles:
    """Read config.toml, metrics.jsonl and (if the run finished) summary.json."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{run_dir}: not a run directory (no metrics.jsonl)")
    if not (run_dir / "config.toml").is_file():
        raise ReportError(f"{run_dir}: not a run directory (no config.toml)")
    config = load_config(run_dir / "config.toml")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text("utf-8")) if summary_path.is_file() else None
    return RunFiles(run_dir, config, summary, read_rows(metrics))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The metrics rows; a torn last line (a run killed mid-write) is dropped, not fatal."""
    try:
        return read_metrics(path)
    except json.JSONDecodeError:
        lines = [line for line in path.read_text("utf-8").splitlines() if line.strip()]
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if number != len(lines):
                    raise ReportError(f"{path}: line {number} is not JSON") from None
        return rows


def build_report(files: RunFiles) -> Report:
    """Every figure of the report from a loaded run directory."""
    tree = build_tree(files.config.nodes)
    rows = files.rows
    evals, global_evals = ppl_series(rows, "eval"), ppl_series(rows, "eval_global")
    return Report(
        header=run_header(files.config, files.summary, rows),
        tree=tree,
        evals=evals,
        global_evals=global_evals,
        leaves=leaf_results([leaf.path for leaf in tree.leaves()], evals, global_evals),
        fairness=fairness_series(rows, tree),
        privacy=last_privacy(rows),
        participation=participation(rows),
        incidents=incident_counts(rows),
    )


def run_header(
    config: RunConfig, summary: Mapping[str, Any] | None, rows: Sequence[Row]
) -> RunHeader:
    """The run's identity and totals; an unfinished run's totals come from its metrics."""
    if summary is None:
        root = build_tree(config.nodes).path
        rounds = max((int(r["round"]) for r in rows), default=0)
        stop_reason, parameters, tokens = None, None, tokens_from_rows(rows, root)
    else:
        rounds = int(summary["rounds"])
        stop_reason, parameters = str(summary["stop_reason"]), int(summary["parameters"])
        tokens = float(summary["tokens"])
    return RunHeader(
        name=config.run.name,
        method=config.run.method,
        model=config.model.path or config.model.preset or "?",
        finished=summary is not None,
        rounds=rounds,
        planned_rounds=config.stop.rounds,
        stop_reason=stop_reason,
        parameters=parameters,
        tokens=tokens,
    )


def tokens_from_rows(rows: Iterable[Row], root: str) -> float:
    """Tokens trained so far: the root's aggregated weights (as the summary counts them), or
    the leaves' training tokens when nothing aggregates (method local)."""
    rows = list(rows)
    at_root = [float(r["tokens"]) for r in rows if r["kind"] == "aggregate" and r["node"] == root]
    if at_root:
        return sum(at_root)
    return sum(float(r["tokens"]) for r in rows if r["kind"] == "train")


def ppl_series(rows: Iterable[Row], kind: str) -> Series:
    """Perplexity per node per round from the rows of `kind` ("eval" or "eval_global")."""
    series: Series = {}
    for row in rows:
        if row["kind"] == kind and "ppl" in row:
            series.setdefault(str(row["node"]), {})[int(row["round"])] = float(row["ppl"])
    return series


def last_value(by_round: Mapping[int, float]) -> tuple[int, float] | None:
    if not by_round:
        return None
    last = max(by_round)
    return last, by_round[last]


def leaf_results(leaves: Sequence[str], evals: Series, global_evals: Series) -> list[LeafResult]:
    """Per leaf: perplexity before training, at its last evaluated round, and the global
    model's perplexity on the same data at that round (when the run recorded it)."""
    results = []
    for leaf in leaves:
        own = evals.get(leaf, {})
        last = last_value(own)
        if last is None:
            results.append(LeafResult(leaf, own.get(0), None, None, None))
            continue
        global_after = global_evals.get(leaf, {}).get(last[0])
        results.append(LeafResult(leaf, own.get(0), last[1], last[0], global_after))
    return results


def fairness_of(node: str, round_index: int, ppl_by_leaf: Mapping[str, float]) -> Fairness:
    """The run's own fairness figures (`metrics.fairness`), for runs that did not record them."""
    if not ppl_by_leaf:
        raise ValueError(f"{node}: no leaf perplexities at round {round_index}")
    figures = fairness_figures(ppl_by_leaf)
    return Fairness(node=node, round=round_index, source="computed", **figures)


def recorded_fairness(row: Row) -> Fairness:
    """A "fairness" row as written by the run."""
    return Fairness(
        node=str(row["node"]),
        round=int(row["round"]),
        leaves=int(row["leaves"]),
        mean_ppl=float(row["mean_ppl"]),
        worst_leaf=str(row["worst_leaf"]),
        worst_ppl=float(row["worst_ppl"]),
        best_leaf=str(row["best_leaf"]),
        best_ppl=float(row["best_ppl"]),
        gap=float(row["gap"]),
        spread=float(row["spread"]),
        source="recorded",
    )


def computed_fairness(evals: Series, node: FederationNode) -> list[Fairness]:
    """`node`'s fairness at every round where at least one leaf below it was evaluated."""
    leaves = [leaf.path for leaf in node.leaves()]
    rounds = sorted({r for leaf in leaves for r in evals.get(leaf, {})})
    return [
        fairness_of(
            node.path, r, {leaf: evals[leaf][r] for leaf in leaves if r in evals.get(leaf, {})}
        )
        for r in rounds
    ]


def fairness_series(rows: Sequence[Row], tree: FederationNode) -> dict[str, list[Fairness]]:
    """Per aggregator and evaluated round: the run's fairness row where there is one (older
    runs have none), otherwise the same figures computed from the leaves' eval rows."""
    evals = ppl_series(rows, "eval")
    recorded = {
        (str(row["node"]), int(row["round"])): recorded_fairness(row)
        for row in rows
        if row["kind"] == "fairness"
    }
    series: dict[str, list[Fairness]] = {}
    for node in tree.walk():
        if node.is_leaf:
            continue
        by_round = {f.round: f for f in computed_fairness(evals, node)}
        by_round.update({r: f for (path, r), f in recorded.items() if path == node.path})
        series[node.path] = [by_round[r] for r in sorted(by_round)]
    return series


def last_privacy(rows: Iterable[Row]) -> list[PrivacyFigure]:
    """Each node's privacy budget spent so far: its "privacy" row of the latest round."""
    latest: dict[str, PrivacyFigure] = {}
    for row in rows:
        if row["kind"] != "privacy":
            continue
        figure = PrivacyFigure(
            str(row["node"]), int(row["round"]), float(row["epsilon"]), float(row["delta"])
        )
        if figure.node not in latest or figure.round >= latest[figure.node].round:
            latest[figure.node] = figure
    return [latest[node] for node in sorted(latest)]


def participation(rows: Iterable[Row]) -> list[Participation]:
    """Every aggregation in round, node and local-round order."""
    found = [
        Participation(
            round=int(row["round"]),
            node=str(row["node"]),
            local_round=int(row.get("local_round", 0)),
            status=str(row.get("status", "ok")),
            selected=tuple(row.get("selected", ())),
            participants=tuple(row.get("participants", ())),
            missing=tuple(row.get("missing", ())),
            benched=tuple(row.get("benched", ())),
        )
        for row in rows
        if row["kind"] == "aggregate"
    ]
    return sorted(found, key=lambda p: (p.round, p.node, p.local_round))


def incident_counts(rows: Iterable[Row]) -> list[IncidentCount]:
    """Rejected updates, refused messages and dropped children, counted by kind and reason."""
    groups: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        if row["kind"] in INCIDENT_KINDS:
            key = (str(row["kind"]), str(row.get("reason", "")))
            groups.setdefault(key, []).append(str(row.get("sender", "?")))
    return [
        IncidentCount(kind, reason, len(senders), tuple(sorted(set(senders))))
        for (kind, reason), senders in sorted(groups.items())
    ]
