"""One run from a config: prepare data, build the federation, loop over root rounds, save.

The loop is explicit: each root round trains the whole tree once, then evaluates, checkpoints
and checks the stop conditions.
"""

from __future__ import annotations

from pathlib import Path

from worldlm.checkpoint import finished_reason
from worldlm.config import RunConfig, dump_config
from worldlm.config_load import load_config
from worldlm.data.prepare import check_sources
from worldlm.errors import CheckpointError, ConfigError
from worldlm.metrics.trackers import check_trackers
from worldlm.outputs import RunResult
from worldlm.root_loop import continue_session, evaluate_tree, round_loop
from worldlm.session import (
    RunObserver,
    audit_run_start,
    config_digest,
    make_run_dir,
    open_session,
)
from worldlm.tree import build_tree

__all__ = ["RunObserver", "RunResult", "resume", "run"]


def run(config: RunConfig, observer: RunObserver, *, out: Path | None = None) -> RunResult:
    """Execute a whole run and leave its directory behind (see DESIGN §7)."""
    check_sources(build_tree(config.nodes))
    check_trackers(config.monitor)  # a missing tracker package: before a run directory exists
    run_dir = make_run_dir(config, out)
    (run_dir / "config.toml").write_text(dump_config(config), encoding="utf-8")
    observer.status(f"run directory: {run_dir}")
    session = open_session(config, observer, run_dir)
    try:
        audit_run_start(session)
        observer.status("evaluating the initial model")
        before = evaluate_tree(session, session.fed.root.state, 0)
        return round_loop(session, observer, before, first_round=1, tokens=0.0)
    finally:
        session.fed.close()


def resume(run_dir: Path, observer: RunObserver, *, backend: list[str] | None = None) -> RunResult:
    """Continue a run from its newest usable checkpoint; the result equals an uninterrupted run.
    `backend` overrides (run.backend, run.ray_address) may move it to another backend.

    The time budget (stop.max_seconds) restarts with the resumed process."""
    if reason := finished_reason(run_dir / "checkpoints"):
        # Refused before any data is read or model built: there is nothing left to run.
        raise CheckpointError(
            f"the run in {run_dir} already finished (stopped by {reason}); its results are in "
            "summary.json and final/: start a new run instead"
        )
    config = load_config(run_dir / "config.toml", backend)
    if config_digest(config) != config_digest(load_config(run_dir / "config.toml")):
        raise ConfigError("on resume only run.backend and run.ray_address may change")
    session = open_session(config, observer, run_dir)
    try:
        return continue_session(session, observer)
    finally:
        session.fed.close()
