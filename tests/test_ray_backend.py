"""The Ray backend (run.backend = "ray"): leaves in Ray actors give the in-process results bit for
bit, checkpoints included, and a run interrupted on Ray resumes exactly."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from worldlm.cli import build_parser
from worldlm.cli_args import backend_overrides
from worldlm.config import RunConfig, dump_config, load_config
from worldlm.errors import ConfigError
from worldlm.model.io import weights_file
from worldlm.progress import QuietProgress
from worldlm.run import RunResult, resume, run

from .conftest import TWO_LEVEL, tiny_config
from .test_engine import StopAtRound


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray instance for the module: the runs find it started and leave it running."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _on_ray(config: RunConfig) -> RunConfig:
    return config.model_copy(update={"run": config.run.model_copy(update={"backend": "ray"})})


def _assert_same_results(ray_run: RunResult, reference: RunResult) -> None:
    assert ray_run.after == reference.after and ray_run.before == reference.before
    assert ray_run.final_dirs.keys() == reference.final_dirs.keys()
    for node, directory in reference.final_dirs.items():
        expected = load_file(weights_file(directory))
        got = load_file(weights_file(ray_run.final_dirs[node]))
        assert got.keys() == expected.keys(), node
        assert all(torch.equal(got[k], expected[k]) for k in expected), node


def test_ray_run_equals_in_process_run(tmp_path: Path, local_ray: None) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL)  # 2 rounds, 4 leaves on the 2 actors
    reference = run(config, QuietProgress(), out=tmp_path / "inprocess")
    on_ray = run(_on_ray(config), QuietProgress(), out=tmp_path / "ray")
    _assert_same_results(on_ray, reference)
    # The backend is not part of the run's identity: the checkpoints, leaves' optimizer
    # moments and counters included, are the same bytes.
    final = "checkpoints/round-000002.wlm"
    assert (tmp_path / "ray" / final).read_bytes() == (tmp_path / "inprocess" / final).read_bytes()


@pytest.mark.slow
def test_a_run_interrupted_on_ray_resumes_exactly(tmp_path: Path, local_ray: None) -> None:
    # WorldLM: key layers per sub-federation and leaves that keep theirs, which the
    # checkpoints and the final export read from the actors.
    config = tiny_config(tmp_path, TWO_LEVEL, ["run.method=worldlm", "stop.rounds=3"])
    reference = run(config, QuietProgress(), out=tmp_path / "inprocess")
    with pytest.raises(KeyboardInterrupt):  # as round 3 starts: resumes from checkpoint 2
        run(_on_ray(config), StopAtRound(3), out=tmp_path / "cut")
    resumed = resume(tmp_path / "cut", QuietProgress())
    _assert_same_results(resumed, reference)
    final = "checkpoints/round-000003.wlm"
    assert (tmp_path / "cut" / final).read_bytes() == (tmp_path / "inprocess" / final).read_bytes()


def test_cli_flags_map_to_the_run_section(tmp_path: Path) -> None:
    args = build_parser().parse_args(["run", "--ray-address", "127.0.0.1:6379"])
    overrides = backend_overrides(args)
    config = load_config(None, overrides)
    assert (config.run.backend, config.run.ray_address) == ("ray", "127.0.0.1:6379")
    args = build_parser().parse_args(["run", "--resume", str(tmp_path), "--backend", "inprocess"])
    assert backend_overrides(args) == ["run.backend=inprocess"]


def test_without_ray_installed_the_error_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    config = _on_ray(tiny_config(tmp_path, TWO_LEVEL))
    with pytest.raises(ConfigError, match=r"pip install 'worldlm\[ray\]'"):
        run(config, QuietProgress(), out=tmp_path / "run")


def test_resume_may_change_the_backend_and_nothing_else(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL)
    (tmp_path / "config.toml").write_text(dump_config(config), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"only run\.backend and run\.ray_address"):
        resume(tmp_path, QuietProgress(), backend=["stop.rounds=5"])
