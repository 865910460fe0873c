"""run.leaf_state = "disk": simulated leaves keep their state between rounds in safetensors
files, not in memory; the run's results are those of a run that keeps it in memory, bit for
bit, across an interruption too."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from worldlm.config_load import validate_config
from worldlm.config_toml import apply_overrides
from worldlm.metrics.jsonl import read_metrics
from worldlm.progress import QuietProgress
from worldlm.runner import resume, run

from .conftest import TWO_LEVEL, tiny_config_dict

# FedPer: every leaf keeps personal weights (K) and its AdamW moments between rounds.
OVERRIDES = ["run.method=fedper", "stop.rounds=3"]


def _config(tmp_path: Path, where: str):  # type: ignore[no-untyped-def]
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    return validate_config(apply_overrides(data, [*OVERRIDES, f'run.leaf_state="{where}"']))


def _models(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        str(p.parent.relative_to(run_dir / "final")): load_file(p)
        for p in sorted((run_dir / "final").rglob("model.safetensors"))
    }


def _evals(run_dir: Path) -> list[tuple[int, str, float]]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    return [(r["round"], r["node"], r["loss"]) for r in rows if r["kind"] == "eval"]


def test_state_on_disk_gives_the_same_run_as_in_memory(tmp_path: Path) -> None:
    memory = run(_config(tmp_path / "m", "memory"), QuietProgress())
    disk = run(_config(tmp_path / "d", "disk"), QuietProgress())
    files = sorted(p.name for p in (disk.run_dir / "leaf-state").iterdir())
    assert len(files) == 3 * 4  # own, adapted, optimizer for each of the 4 leaves
    assert not (memory.run_dir / "leaf-state").exists()
    left, right = _models(memory.run_dir), _models(disk.run_dir)
    assert left.keys() == right.keys() and len(left) == 5  # global + 4 personalized leaves
    for node in left:
        assert all(torch.equal(left[node][k], right[node][k]) for k in left[node])
    assert _evals(memory.run_dir) == _evals(disk.run_dir)


def test_a_run_with_state_on_disk_resumes_exactly(tmp_path: Path) -> None:
    """Interrupted as round 3 starts, its leaves' files already hold round 2's state (and a
    torn file of the interrupted round's); resume restores every leaf from the checkpoint
    alone and ends where an uninterrupted run ends, bit for bit."""
    import pytest

    from .test_engine import StopAtRound

    config = _config(tmp_path, "disk")
    whole = run(config, QuietProgress(), out=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(config, StopAtRound(3), out=tmp_path / "cut")
    for file in (tmp_path / "cut" / "leaf-state").iterdir():
        file.write_bytes(b"not what the checkpoint holds")  # must not be read on resume
    resumed = resume(tmp_path / "cut", QuietProgress())
    assert resumed.rounds == 3
    final = "checkpoints/round-000003.wlm"
    assert (tmp_path / "cut" / final).read_bytes() == (tmp_path / "whole" / final).read_bytes()
    assert _evals(resumed.run_dir) == _evals(whole.run_dir)
