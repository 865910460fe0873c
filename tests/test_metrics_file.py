"""metrics.jsonl read back after a crash (issue 19, item 8): a last line cut short is left out,
anything else unreadable is a clear error naming its line, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worldlm.errors import MetricsError
from worldlm.metrics.jsonl import MetricsWriter, read_metrics


def test_a_last_line_cut_short_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    MetricsWriter(path).write([{"round": 1, "kind": "eval"}, {"round": 2, "kind": "eval"}])
    torn = '{"round": 3, "ki'
    with path.open("a", encoding="utf-8") as fh:
        fh.write(torn)
    with pytest.raises(json.JSONDecodeError):  # what a plain reader does with it
        [json.loads(line) for line in path.read_text("utf-8").splitlines()]
    assert [r["round"] for r in read_metrics(path)] == [1, 2]


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ('{"round": 1, "ki\n', "line 2: not valid JSON"),
        ("[" * 100_000 + "]" * 100_000 + "\n", "line 2: not valid JSON"),
        ("[1, 2]\n", "line 2: a list, not an object"),
    ],
    ids=["torn-in-the-middle", "deep-nesting", "not-an-object"],
)
def test_an_unreadable_line_is_named(tmp_path: Path, line: str, named: str) -> None:
    path = tmp_path / "metrics.jsonl"
    MetricsWriter(path).write([{"round": 1}])
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line + '{"round": 2}\n')
    with pytest.raises(MetricsError, match=named) as refused:
        read_metrics(path)
    assert len(str(refused.value)) < 500 + len(str(path))
