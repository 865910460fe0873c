"""`worldlm report RUN_DIR`: report.md plus PNG plots from a run directory (finished or not)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from worldlm.errors import WorldLMError

REPORT_FILE = "report.md"
PLOTS_DIR = "report"


def add_report_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = sub.add_parser(
        "report",
        help="write report.md and PNG plots for a run directory",
        description="Write a run report (markdown with PNG plots; no HTML output) from a run "
        "directory's config.toml, metrics.jsonl and summary.json: the tree, perplexity per leaf "
        "and per round, fairness, privacy and participation. An unfinished run is reported "
        "from the metrics it has so far.",
    )
    report.add_argument("run_dir", type=Path, help="a run directory made by `worldlm run`")
    report.add_argument(
        "--out",
        type=Path,
        help="directory for report.md and report/*.png (default: the run directory)",
    )


def write_report(
    run_dir: Path, out: Path | None = None, status: Callable[[str], None] = lambda _: None
) -> Path:
    """Write report.md into `out` (default `run_dir`) and its plots under report/; return the
    markdown file's path."""
    # Loaded here so that `worldlm --help` does not import matplotlib.
    from worldlm.metrics.report import build_report, load_run
    from worldlm.metrics.report_markdown import render_markdown
    from worldlm.metrics.report_plots import write_plots

    status(f"reading {run_dir}")
    report = build_report(load_run(run_dir))
    out_dir = out if out is not None else run_dir
    plots = write_plots(report, out_dir / PLOTS_DIR, status)
    path = out_dir / REPORT_FILE
    path.write_text(render_markdown(report, plots, out_dir, run_dir), encoding="utf-8")
    return path


def run_report(args: argparse.Namespace, console: Console) -> int:
    def status(message: str) -> None:
        console.print(message, highlight=False, markup=False, soft_wrap=True)

    try:
        path = write_report(args.run_dir, args.out, status)
    except WorldLMError as exc:
        Console(stderr=True).print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        return 2
    status(f"wrote {path}")
    return 0
