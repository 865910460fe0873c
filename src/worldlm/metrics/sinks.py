"""Where metrics rows go besides metrics.jsonl: TensorBoard always available, MLflow if asked.

A sink receives every row as it is written and keeps its own files; metrics.jsonl stays the
record the report, `compare` and resume read. A resumed run replays the rounds after its last
checkpoint, so a sink may see a round's rows twice; TensorBoard shows the later values.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from worldlm.config import MonitorConfig
from worldlm.errors import ConfigError
from worldlm.metrics.scalars import scalars_of


class MetricsSink(Protocol):
    def write(self, rows: Iterable[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """Scalars under `log_dir`, stepped by the root round; `tensorboard --logdir RUN_DIR`."""

    def __init__(self, log_dir: Path) -> None:
        # Imported here: the writer pulls in TensorBoard's protobufs, which only it needs.
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            step = int(row.get("round", 0))
            for tag, value in scalars_of(row):
                self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MlflowSink:
    """Metrics of one MLflow run named after the run directory."""

    def __init__(self, experiment: str, run_name: str) -> None:
        import mlflow

        self._mlflow = mlflow
        mlflow.set_experiment(experiment)
        self._run = mlflow.start_run(run_name=run_name)

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            step = int(row.get("round", 0))
            for tag, value in scalars_of(row):
                # MLflow keys allow '/', but not every character a node path may hold.
                self._mlflow.log_metric(tag.replace(" ", "_"), value, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


def make_sinks(config: MonitorConfig, run_dir: Path) -> list[MetricsSink]:
    """The sinks `config` asks for; MLflow that is asked for but not installed is an error."""
    sinks: list[MetricsSink] = []
    if config.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    if config.mlflow:
        if importlib.util.find_spec("mlflow") is None:
            raise ConfigError(
                "monitor.mlflow is on but MLflow is not installed: `pip install mlflow`, or set "
                "monitor.mlflow = false"
            )
        sinks.append(MlflowSink(config.mlflow_experiment, run_dir.name))
    return sinks
