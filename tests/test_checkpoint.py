from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worldlm.checkpoint import list_checkpoints, load_latest, save_checkpoint
from worldlm.errors import CheckpointError


def test_keeps_the_newest_and_skips_a_torn_file(tmp_path: Path) -> None:
    for r in range(1, 5):
        save_checkpoint(tmp_path, r, {"w": torch.full((3,), float(r))}, {"x": r}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-000003.wlm", "round-000004.wlm"]
    newest = list_checkpoints(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[:-7])  # torn write
    path, tensors, meta = load_latest(tmp_path)
    assert path.name == "round-000003.wlm"
    assert meta["round"] == 3 and torch.equal(tensors["w"], torch.full((3,), 3.0))


def test_no_usable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest(tmp_path)
    (tmp_path / "round-000001.wlm").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="round-000001"):
        load_latest(tmp_path)


def test_temporary_files_are_ignored(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {}, keep=3)
    (tmp_path / ".round-000002.wlm.tmp").write_bytes(b"partial")
    assert load_latest(tmp_path)[0].name == "round-000001.wlm"
