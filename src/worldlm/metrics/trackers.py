"""Experiment trackers (TensorBoard, W&B, MLflow, ...) through accelerate's tracker classes.

At the start each tracker gets the resolved config as hyperparameters; every metrics row's
curves (`metrics.scalars`) follow as they are written, stepped by the root round; at the end
the trackers that keep files (MLflow, W&B) get the report, summary, config and model cards.
metrics.jsonl stays the record; a tracker only mirrors it.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worldlm.config import MonitorConfig, RunConfig
from worldlm.errors import ConfigError
from worldlm.metrics.scalars import scalars_of

if TYPE_CHECKING:
    from accelerate.tracking import GeneralTracker

# tracker -> (module it imports, package to pip install)
PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "comet_ml": ("comet_ml", "comet_ml"),
    "aim": ("aim", "aim"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
    "trackio": ("trackio", "trackio"),
}
# Trackers that keep files; the others (TensorBoard, Aim, ...) get the numbers only.
KEEPS_ARTIFACTS = ("mlflow", "wandb")
Params = dict[str, bool | int | float | str | None]


def check_trackers(monitor: MonitorConfig) -> None:
    """A ConfigError naming the package to install for each tracker that lacks it."""
    missing = [
        (name, PACKAGES[name][1])
        for name in monitor.trackers
        if importlib.util.find_spec(PACKAGES[name][0]) is None
    ]
    if missing:
        names = ", ".join(name for name, _ in missing)
        packages = " ".join(package for _, package in missing)
        raise ConfigError(
            f"monitor.trackers has {names} but the package is not installed: "
            f"pip install {packages} (or take it out of monitor.trackers)"
        )


class TrackerSink:
    """The configured trackers of one run, started with its config as hyperparameters."""

    def __init__(self, config: RunConfig, run_dir: Path) -> None:
        check_trackers(config.monitor)
        self.names: list[str] = []
        self.trackers: list[GeneralTracker] = []
        try:
            for name in config.monitor.trackers:
                self.trackers.append(_start(name, config.monitor, run_dir))
                self.names.append(name)
            params = flat_params(config.model_dump(mode="json"))
            for tracker in self.trackers:
                tracker.store_init_configuration(params)
        except BaseException:
            self.close()  # the ones already started are not left open (a running W&B run)
            raise

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        for step, values in batches(rows):
            for name, tracker in zip(self.names, self.trackers, strict=True):
                if name == "mlflow":
                    tracker.log({mlflow_key(k): v for k, v in values.items()}, step=step)
                else:
                    tracker.log(values, step=step)

    def publish(self, run_dir: Path) -> None:
        """The run's report, summary, config and model cards to the trackers that keep files."""
        pairs = zip(self.names, self.trackers, strict=True)
        keepers = [(name, tracker) for name, tracker in pairs if name in KEEPS_ARTIFACTS]
        if not keepers:
            return
        files = run_files(run_dir)
        for name, tracker in keepers:
            if name == "mlflow":
                for path in files:
                    parent = path.relative_to(run_dir).parent
                    tracker.log_artifact(str(path), None if parent == Path() else str(parent))
            else:
                _wandb_artifact(tracker, run_dir, files)

    def close(self) -> None:
        """Finish every tracker, each even if another fails; then raise the first failure."""
        failures: list[BaseException] = []
        for tracker in self.trackers:
            try:
                tracker.finish()
            except (
                Exception
            ) as exc:  # one tracker's server being down must not keep the others open
                failures.append(exc)
        self.trackers, self.names = [], []
        if failures:
            raise failures[0]


def _start(name: str, monitor: MonitorConfig, run_dir: Path) -> GeneralTracker:
    # Imported here: accelerate's trackers are needed only where a run reports to one.
    from accelerate import tracking
    from accelerate.state import PartialState

    # accelerate's trackers log through a logger that refuses to run before its process state
    # exists; in one process (the root) that state just says "one process, the main one".
    PartialState()

    run_name = run_dir.name
    tracker: GeneralTracker
    if name == "tensorboard":
        # logging_dir/run_name: the run's tensorboard/ as before trackers were accelerate's
        tracker = tracking.TensorBoardTracker("tensorboard", str(run_dir))
    elif name == "wandb":
        tracker = tracking.WandBTracker(monitor.project, name=run_name, dir=str(run_dir))
    elif name == "mlflow":
        tracker = tracking.MLflowTracker(monitor.mlflow_experiment, run_name=run_name)
    elif name == "aim":
        tracker = tracking.AimTracker(run_name, str(run_dir))
    elif name == "dvclive":
        tracker = tracking.DVCLiveTracker(dir=str(run_dir / "dvclive"))
    elif name == "clearml":
        tracker = tracking.ClearMLTracker(task_name=run_name, project_name=monitor.project)
    else:  # comet_ml, swanlab, trackio: a project, the run named by the tracker
        tracker = tracking.LOGGER_TYPE_TO_CLASS[name](monitor.project)
    tracker.start()
    return tracker


def flat_params(data: dict[str, Any], prefix: str = "") -> Params:
    """Nested config tables as dotted keys; lists as JSON text (trackers take scalars)."""
    out: Params = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        elif isinstance(value, list):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def batches(rows: Iterable[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """The rows' curves as (round, {tag: value}) in order; a tag seen again in the same round
    (an inner federation's second local round) starts a new batch rather than overwrite."""
    out: list[tuple[int, dict[str, float]]] = []
    for row in rows:
        step = int(row.get("round", 0))
        for tag, value in scalars_of(row):
            if not out or out[-1][0] != step or tag in out[-1][1]:
                out.append((step, {}))
            out[-1][1][tag] = value
    return out


def mlflow_key(tag: str) -> str:
    """`val_ppl/world/med` as `val_ppl/world.med`: MLflow's file store keeps a metric in a file
    named by its key, so `val_ppl/world` could not be a file and a directory at once. (Node
    names hold no dots: letters, digits, '_' and '-'.)"""
    figure, _, node = tag.partition("/")
    return f"{figure}/{node.replace('/', '.')}" if node else figure


def run_files(run_dir: Path) -> list[Path]:
    """report.md and its plots (written now), summary.json, config.toml and the model cards."""
    from worldlm.metrics.report_cli import PLOTS_DIR, write_report

    report = write_report(run_dir)
    files = [report, *sorted((run_dir / PLOTS_DIR).glob("*.png"))]
    files += [run_dir / name for name in ("summary.json", "config.toml")]
    files += sorted((run_dir / "final").glob("**/README.md"))
    return [path for path in files if path.is_file()]


def _wandb_artifact(tracker: GeneralTracker, run_dir: Path, files: list[Path]) -> None:
    import wandb

    # Artifact names allow letters, digits, '-', '_' and '.'.
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{run_dir.name}-outputs")
    artifact = wandb.Artifact(name, type="worldlm-run")
    for path in files:
        artifact.add_file(str(path), name=path.relative_to(run_dir).as_posix())
    tracker.tracker.log_artifact(artifact)
