"""PNG plots of a run report: perplexity curves per aggregator, and the root's fairness band."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit to import

import matplotlib.pyplot as plt  # after the backend is chosen
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator

from worldlm.metrics.report import Fairness, Report
from worldlm.tree import FederationNode

FAIRNESS_FILE = "fairness.png"
MAX_LABELLED_LEAVES = 12  # past this a legend hides the plot; the tables name the leaves


@dataclass(frozen=True)
class Plots:
    per_node: dict[str, Path]  # aggregator path -> its perplexity plot
    fairness: Path | None  # the root's worst/mean/best leaf perplexity, None without evals


def node_plot_name(node_path: str) -> str:
    """A file name per node; '.' never occurs in node names, so paths cannot collide."""
    return f"ppl-{node_path.replace('/', '.')}.png"


def write_plots(report: Report, out_dir: Path, status: Callable[[str], None]) -> Plots:
    """Every plot of the report into `out_dir`, which is created."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per_node = {}
    for node in report.tree.walk():
        if node.is_leaf or not any(leaf.path in report.evals for leaf in node.leaves()):
            continue
        path = out_dir / node_plot_name(node.path)
        status(f"plotting {path.name}")
        plot_node(node, report.evals, report.global_evals, path)
        per_node[node.path] = path
    fairness = None
    root_series = report.fairness.get(report.tree.path, [])
    if root_series:
        fairness = out_dir / FAIRNESS_FILE
        status(f"plotting {fairness.name}")
        plot_fairness(root_series, fairness)
    return Plots(per_node, fairness)


def _finite(by_round: Mapping[int, float]) -> tuple[list[int], list[float]]:
    points = sorted((r, v) for r, v in by_round.items() if math.isfinite(v))
    return [r for r, _ in points], [v for _, v in points]


def _finish(fig: Figure, ax: Axes, values: Sequence[float], title: str, path: Path) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel("validation perplexity")
    if values and all(v > 0 for v in values):
        ax.set_yscale("log")  # perplexity falls by orders of magnitude early on
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(LogFormatter(labelOnlyBase=False))  # 300, not 3x10^2
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)  # pyplot keeps every open figure alive otherwise


def plot_node(
    node: FederationNode,
    evals: Mapping[str, Mapping[int, float]],
    global_evals: Mapping[str, Mapping[int, float]],
    path: Path,
) -> None:
    """Each leaf's perplexity per round below `node`, its merged curve, and the global model's
    on the same data when the run recorded it."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted: list[float] = []
    leaves = list(node.leaves())
    for leaf in leaves:
        rounds, values = _finite(evals.get(leaf.path, {}))
        label = leaf.path.removeprefix(node.path + "/")
        if len(leaves) > MAX_LABELLED_LEAVES:
            label = "_nolegend_"
        ax.plot(rounds, values, marker="o", markersize=3, linewidth=1.2, label=label)
        plotted += values
    rounds, values = _finite(evals.get(node.path, {}))
    ax.plot(rounds, values, "k--", linewidth=2.2, label=f"{node.name} (all leaves merged)")
    plotted += values
    rounds, values = _finite(global_evals.get(node.path, {}))
    if rounds:
        ax.plot(rounds, values, ":", color="grey", linewidth=2, label="global model, same data")
        plotted += values
    _finish(fig, ax, plotted, f"{node.path}: perplexity per leaf", path)


def plot_fairness(series: Sequence[Fairness], path: Path) -> None:
    """Worst, mean and best leaf perplexity per round, the band between them shaded."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rounds = [f.round for f in series]
    worst, mean, best = (
        [getattr(f, k) for f in series] for k in ("worst_ppl", "mean_ppl", "best_ppl")
    )
    ax.fill_between(rounds, best, worst, alpha=0.15, color="tab:blue")
    ax.plot(rounds, worst, marker="v", color="tab:red", label="worst leaf")
    ax.plot(rounds, mean, marker="o", color="tab:blue", label="mean of leaves")
    ax.plot(rounds, best, marker="^", color="tab:green", label="best leaf")
    values = [v for v in [*worst, *mean, *best] if math.isfinite(v)]
    _finish(fig, ax, values, f"{series[0].node}: fairness across leaves", path)
