"""`worldlm run --resume` of a run that already finished is refused at once: before any data is
read or model built (here, its data is gone, and the refusal still names the finished run)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from worldlm.checkpoint import finished_reason
from worldlm.cli import main
from worldlm.errors import CheckpointError
from worldlm.progress import QuietProgress
from worldlm.runner import resume, run

from .conftest import tiny_config

LEAVES = {"world/a": "med", "world/b": "law"}


def test_resuming_a_finished_run_is_refused_before_reading_data(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tiny_config(tmp_path, LEAVES, ["stop.rounds=1", "train.local_steps=1"], n_docs=20)
    run_dir = run(config, QuietProgress(), out=tmp_path / "r").run_dir
    assert finished_reason(run_dir / "checkpoints") == "rounds"
    shutil.rmtree(tmp_path / "data")  # a resume that read the leaves' data would fail on this
    with pytest.raises(CheckpointError, match=r"already finished \(stopped by rounds\)"):
        resume(run_dir, QuietProgress())
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "already finished (stopped by rounds)" in err and "Traceback" not in err


def test_an_unfinished_or_torn_newest_checkpoint_is_not_finished(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    assert finished_reason(directory) == ""  # no checkpoint yet
    directory.mkdir()
    (directory / "round-000001.wlm").write_bytes(b"torn")
    assert finished_reason(directory) == ""
