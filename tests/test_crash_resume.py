"""Crashes for real (TESTPLAN C9-C10): SIGKILL a `worldlm run` process mid-run and resume it;
kill a process at several points of a checkpoint write and load what it left."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from worldlm.audit.log import verify
from worldlm.checkpoint import list_checkpoints, load_latest, save_checkpoint
from worldlm.config import dump_config

from .conftest import TWO_LEVEL, tiny_config

ROUNDS = 4


def _worldlm(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "worldlm.cli", *map(str, args)]


def _run_to_end(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL, [f"stop.rounds={ROUNDS}"])
    config_file = tmp_path / "config.toml"
    config_file.write_text(dump_config(config), encoding="utf-8")
    # The reference is a subprocess too, so both sides run with the same threads and settings.
    _run_to_end(_worldlm("run", config_file, "--out", tmp_path / "whole"))

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        _worldlm("run", config_file, "--out", cut),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = cut / "checkpoints" / "round-000001.wlm"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # round 2 has just begun: no chance to clean up
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    left = [p.name for p in list_checkpoints(cut / "checkpoints")]
    assert left and left[-1] != f"round-{ROUNDS:06d}.wlm", left  # killed before the end

    _run_to_end(_worldlm("run", "--resume", cut))
    for name in (f"checkpoints/round-{ROUNDS:06d}.wlm", "final/world/model.safetensors"):
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    # The audit log lost nothing it should keep and kept nothing of the replayed round twice.
    report = verify(cut / "audit.sqlite")
    assert report.ok, report.problems
    assert subprocess.run(_worldlm("audit", "verify", cut), capture_output=True).returncode == 0


# Runs in a child process: writes checkpoint 1 whole, then dies at `point` while writing 2.
_KILL_DURING_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import torch
    import worldlm.checkpoint as ck

    directory, point = Path(sys.argv[1]), sys.argv[2]
    ck.save_checkpoint(directory, 1, {"w": torch.full((256, 256), 1.0)}, {"n": 1}, keep=3)

    def die(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    real_fsync = os.fsync
    if point == "mid_write":  # half the bytes are in the temporary file, then the kill
        real_encode = ck.wire.encode
        def half_then_die(tensors, meta):
            payload = real_encode(tensors, meta)
            tmp = directory / ".round-000002.wlm.tmp"
            tmp.write_bytes(payload[: len(payload) // 2])
            die()
        ck.wire.encode = half_then_die
    elif point == "before_fsync":
        ck.os.fsync = die
    elif point == "before_rename":
        ck.os.replace = die
    elif point == "after_rename":  # renamed, directory not yet synced
        ck.fsync_dir = die
    ck.save_checkpoint(directory, 2, {"w": torch.full((256, 256), 2.0)}, {"n": 2}, keep=3)
    """
)


@pytest.mark.parametrize(
    ("point", "survivor"),
    [("mid_write", 1), ("before_fsync", 1), ("before_rename", 1), ("after_rename", 2)],
)
def test_a_kill_during_a_checkpoint_write_leaves_a_loadable_checkpoint(
    tmp_path: Path, point: str, survivor: int
) -> None:
    directory = tmp_path / "checkpoints"
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_DURING_WRITE, str(directory), point],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    path, tensors, meta = load_latest(directory)
    assert path.name == f"round-{survivor:06d}.wlm"
    assert meta["n"] == survivor
    assert torch.equal(tensors["w"], torch.full((256, 256), float(survivor)))
    # The torn temporary file is never taken for a checkpoint, and the next write replaces it.
    assert [p.name for p in list_checkpoints(directory)][-1] == path.name
    save_checkpoint(directory, 3, {"w": torch.zeros(1)}, {"n": 3}, keep=3)
    assert load_latest(directory)[0].name == "round-000003.wlm"
    assert not any(p.name.startswith(".round-000003") for p in directory.iterdir())
