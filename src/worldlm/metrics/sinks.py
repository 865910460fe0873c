"""Where metrics rows go besides metrics.jsonl: the experiment trackers of monitor.trackers
(`metrics.trackers`; TensorBoard by default).

A sink receives every row as it is written; metrics.jsonl stays the record the report,
`compare` and resume read. A resumed run replays the rounds after its last checkpoint, so a
sink may see a round's rows twice; TensorBoard shows the later values.
"""

from __future__ import annotations

from pathlib import Path

from worldlm.config import RunConfig
from worldlm.metrics.jsonl import MetricsSink


def make_sinks(config: RunConfig, run_dir: Path) -> list[MetricsSink]:
    """The sinks `config.monitor` asks for, started with `config` as hyperparameters; a tracker
    whose package is missing is a ConfigError naming it."""
    if not config.monitor.trackers:
        return []
    from worldlm.metrics.trackers import TrackerSink

    return [TrackerSink(config, run_dir)]
