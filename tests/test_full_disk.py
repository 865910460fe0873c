"""A full disk stops a run with one clear line, leaves no partial file behind, and keeps the
checkpoints already written, so the run continues with `--resume` once there is space
(issue 19, item 8)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from worldlm import checkpoint as checkpoint_module
from worldlm.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from worldlm.cli import main
from worldlm.config import to_toml
from worldlm.errors import CheckpointError

from .conftest import TWO_LEVEL, tiny_config_dict

_real_fsync = os.fsync


def _disk_full_after(count: int):  # type: ignore[no-untyped-def]
    """An os.fsync that fails with ENOSPC from its `count`-th call on (the bytes of a file are
    what a full disk refuses to keep)."""
    calls = {"n": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] >= count:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _real_fsync(fd)

    return fsync


def test_a_checkpoint_that_does_not_fit_leaves_the_previous_one_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = {"w": torch.ones(1000)}
    save_checkpoint(tmp_path, 1, tensors, {}, keep=2)
    monkeypatch.setattr(checkpoint_module.os, "fsync", _disk_full_after(1))
    with pytest.raises(CheckpointError, match=r"No space left on device.*previous checkpoints"):
        save_checkpoint(tmp_path, 2, tensors, {}, keep=2)
    assert [p.name for p in tmp_path.iterdir()] == ["round-000001.wlm"]
    assert torch.equal(load_checkpoint(list_checkpoints(tmp_path)[0])[0]["w"], tensors["w"])


def test_a_run_that_fills_the_disk_ends_in_one_line_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    data["stop"]["rounds"] = 3
    data["train"]["local_steps"] = 1
    config = tmp_path / "run.toml"
    config.write_text(to_toml(data), encoding="utf-8")
    # Checkpoint 1 writes each leaf's state file and the checkpoint, each file and directory
    # entry (2 fsyncs apiece); the disk is full from then (in the first leaf file of round 2).
    monkeypatch.setattr(checkpoint_module.os, "fsync", _disk_full_after(2 * len(TWO_LEVEL) + 3))
    assert main(["run", str(config), "--quiet", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err and "Traceback" not in err
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["round-000001.wlm"]
    written = [p.name for p in checkpoints.rglob("*")]
    assert not [name for name in written if name.endswith(".tmp")]
    assert len(list((checkpoints / "objects").iterdir())) == len(TWO_LEVEL)
    monkeypatch.setattr(checkpoint_module.os, "fsync", _real_fsync)  # space again
    assert main(["run", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    assert [p.name for p in list_checkpoints(checkpoints)][-1] == "round-000003.wlm"


def test_a_deeply_nested_first_data_line_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    nested = tmp_path / "nested.jsonl"
    nested.write_text("[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    data["nodes"]["world/med/a"]["data"]["paths"] = [str(nested)]
    config = tmp_path / "run.toml"
    config.write_text(to_toml(data), encoding="utf-8")
    assert main(["run", str(config), "--quiet", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "nested.jsonl" in err and "too deeply" in err and "Traceback" not in err
