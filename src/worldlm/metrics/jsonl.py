"""Append metrics rows to `metrics.jsonl`, one JSON object per line, flushed as written, and
hand them to the configured sinks (the experiment trackers of monitor.trackers)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from worldlm.errors import MetricsError, shown


class MetricsSink(Protocol):
    """Receives every row as written (`metrics.sinks` makes them from the config)."""

    def write(self, rows: Iterable[dict[str, Any]]) -> None: ...

    def publish(self, run_dir: Path) -> None:
        """The finished run's files, to sinks that keep them."""
        ...

    def close(self) -> None: ...


class MetricsWriter:
    def __init__(self, path: Path, sinks: Sequence[MetricsSink] = ()) -> None:
        self.path = path
        self.sinks = list(sinks)
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        with self.path.open("a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(_finite(row), sort_keys=True) + "\n")
        for sink in self.sinks:
            sink.write(rows)

    def replace(self, rows: Iterable[dict[str, Any]]) -> None:
        """Make the file hold exactly `rows` (a resumed run drops the rows of rounds it will
        run again); the sinks already have them and are not told again."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with tmp.open("w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(_finite(row), sort_keys=True) + "\n")
            tmp.replace(self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)  # the old file stays whole
            raise MetricsError(f"could not rewrite {self.path}: {exc.strerror or exc}") from exc

    def publish(self, run_dir: Path) -> None:
        """Hand the finished run's files (report, summary, model cards) to the sinks that keep
        files (see `metrics.trackers`)."""
        for sink in self.sinks:
            sink.publish(run_dir)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/Inf; write them as strings rather than produce an unreadable file.
    return {
        k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every row of a metrics file. A last line without its newline is a write that a crash cut
    short: it is left out (a resumed run writes that round's rows again). Any other line that
    is not a JSON object is a `MetricsError` naming it."""
    with path.open(encoding="utf-8", newline="\n") as fh:
        lines = fh.readlines()
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise MetricsError(f"{path}, line {number}: not valid JSON ({shown(exc)})") from exc
        if not isinstance(row, dict):
            raise MetricsError(f"{path}, line {number}: a {type(row).__name__}, not an object")
        rows.append(row)
    return rows
