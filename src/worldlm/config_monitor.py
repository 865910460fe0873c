"""`[monitor]`: the experiment trackers a run reports to besides metrics.jsonl (the record).

`trackers` names accelerate's tracker classes (`worldlm.metrics.trackers`). The older switches
`tensorboard` and `mlflow` still work: each adds its tracker to `trackers` when true and
removes it when false; the saved config holds the resulting `trackers` only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from worldlm.config_section import Section

# Every tracker accelerate 1.15 ships (accelerate.tracking.LOGGER_TYPE_TO_CLASS).
Tracker = Literal[
    "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"
]
_LEGACY_SWITCHES = ("tensorboard", "mlflow")


class MonitorConfig(Section):
    trackers: list[Tracker] = Field(
        ["tensorboard"],
        description="Experiment trackers, through accelerate's tracker classes: each gets the "
        "resolved config as hyperparameters at the start, every metrics row's curves per round, "
        "and (mlflow, wandb) report.md, its plots, summary.json, config.toml and the model "
        "cards as artifacts at the end; the others keep no artifacts. Any of tensorboard "
        "(<run>/tensorboard), wandb, mlflow, comet_ml, aim (a repository in the run "
        "directory), clearml, dvclive (<run>/dvclive), swanlab, trackio; [] = metrics.jsonl "
        "only. Each needs its package (pip install NAME); accounts, servers and keys come from "
        "the tracker's own settings and environment variables.",
    )
    project: str = Field(
        "worldlm",
        min_length=1,
        description="Project the run is logged under in wandb, comet_ml, clearml, swanlab and "
        "trackio (mlflow: mlflow_experiment); the tracker's run is named after the run "
        "directory.",
    )
    mlflow_experiment: str = Field(
        "worldlm",
        min_length=1,
        description="MLflow experiment (MLFLOW_EXPERIMENT_NAME overrides it; the tracking URI "
        "comes from MLFLOW_TRACKING_URI). MLflow metric keys write node paths with dots "
        "(val_ppl/world.med.a): its file store keeps one file per key.",
    )
    tensorboard: bool | None = Field(
        None,
        description="Deprecated, use trackers: true adds tensorboard to monitor.trackers, "
        "false removes it.",
    )
    mlflow: bool | None = Field(
        None,
        description="Deprecated, use trackers: true adds mlflow to monitor.trackers, false "
        "removes it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _fold_legacy_switches(cls, data: Any) -> Any:
        if not isinstance(data, dict) or all(data.get(k) is None for k in _LEGACY_SWITCHES):
            return data
        trackers = data.get("trackers", ["tensorboard"])
        switches = [data.get(k) for k in _LEGACY_SWITCHES]
        if not isinstance(trackers, list) or not all(isinstance(s, bool | None) for s in switches):
            return data  # the fields' own checks name the key and the type
        trackers = list(trackers)
        for name, on in zip(_LEGACY_SWITCHES, switches, strict=True):
            if on and name not in trackers:
                trackers.append(name)
            elif on is False:
                trackers = [t for t in trackers if t != name]
        rest = {k: v for k, v in data.items() if k not in _LEGACY_SWITCHES}
        return {**rest, "trackers": trackers}

    @model_validator(mode="after")
    def _each_tracker_once(self) -> MonitorConfig:
        twice = sorted({t for t in self.trackers if self.trackers.count(t) > 1})
        if twice:
            raise ValueError(f"monitor.trackers names {', '.join(twice)} more than once")
        return self
