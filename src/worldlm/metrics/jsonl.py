"""Append metrics rows to `metrics.jsonl`, one JSON object per line, flushed as written."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(_finite(row), sort_keys=True) + "\n")


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/Inf; write them as strings rather than produce an unreadable file.
    return {
        k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every row of a metrics file."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
