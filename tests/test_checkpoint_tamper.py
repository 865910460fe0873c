"""A checkpoint altered after it was written is not resumed from (issue 19, item 4): its
SHA-256 no longer matches the audit log's entry, so the run falls back to the newest one that
does, and never records the altered file as if it were sound."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from worldlm import wire
from worldlm.audit.cli import AUDIT_FILE
from worldlm.audit.log import verify
from worldlm.checkpoint import load_latest
from worldlm.checkpoint_parts import PartStore
from worldlm.progress import QuietProgress
from worldlm.runner import resume, run

from .conftest import TWO_LEVEL, tiny_config
from .test_engine import StopAtRound


def _entries(run_dir: Path, event: str) -> list[dict[str, object]]:
    with sqlite3.connect(run_dir / AUDIT_FILE) as conn:
        rows = conn.execute("SELECT fields FROM entries WHERE event = ?", (event,)).fetchall()
    return [json.loads(r[0]) for r in rows]


def test_an_altered_checkpoint_is_refused_and_an_older_one_resumed(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL, ["stop.rounds=3", "train.local_steps=2"])
    whole = run(config, QuietProgress(), out=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(config, StopAtRound(3), out=tmp_path / "cut")
    checkpoints = tmp_path / "cut" / "checkpoints"
    newest = checkpoints / "round-000002.wlm"
    # Edit the header, as one would to lower a DP accountant's steps: the body still checks.
    tensors, meta = wire.decode(newest.read_bytes())
    newest.write_bytes(wire.encode(tensors, {**meta, "edited": True}))
    # The attack without the check: the altered file is what a plain resume would load.
    assert load_latest(checkpoints, parts=PartStore(checkpoints))[0] == newest

    resumed = resume(tmp_path / "cut", QuietProgress())
    (entry,) = _entries(resumed.run_dir, "run_resumed")
    assert entry["checkpoint"] == "round-000001.wlm" and entry["refused"] == ["round-000002.wlm"]
    # Rounds 2 and 3 ran again from round 1: the same bytes as the uninterrupted run.
    final = "checkpoints/round-000003.wlm"
    assert (resumed.run_dir / final).read_bytes() == (whole.run_dir / final).read_bytes()
    # The altered file was never recorded: round 2's only entries are of the sound files.
    recorded = [e["sha256"] for e in _entries(resumed.run_dir, "checkpoint")]
    assert len(recorded) == len(set(recorded))
    assert verify(resumed.run_dir / AUDIT_FILE).ok
