"""A simulated leaf trained by several Ray actors together (run.leaf_ranks = 2, gloo on the
CPU): the federation ends with the model one process per leaf trains, up to float rounding;
what cannot run is refused before anything starts."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from worldlm.errors import ConfigError, TransportError
from worldlm.model.io import weights_file
from worldlm.progress import QuietProgress
from worldlm.runner import run
from worldlm.transport import ray_transport

from .conftest import tiny_config
from .test_leaf_state import _evals
from .test_ray_backend import started_ray

FLAT = {"world/a": "med", "world/b": "law"}
RANKED = ["run.method='fedavg'", "run.backend='ray'", "run.leaf_ranks=2", "stop.rounds=2"]


@pytest.fixture(scope="module")
def ray_with_four_cpus() -> Iterator[None]:
    """Two leaves of two ranks each: four actors of one CPU (Ray's count, not the cores')."""
    yield from started_ray(4)


@pytest.mark.parametrize(
    "shard", ["none", pytest.param("fsdp", marks=pytest.mark.slow)]
)  # about 15 s each: four Ray workers and two runs
def test_a_leaf_on_two_ray_processes_trains_what_one_process_trains(
    tmp_path: Path, ray_with_four_cpus: None, shard: str
) -> None:
    config = tiny_config(tmp_path, FLAT, [*RANKED, f"train.shard='{shard}'"])
    ranked = run(config, QuietProgress(), out=tmp_path / "ranked")
    single = ["run.method='fedavg'", "stop.rounds=2"]
    reference = run(tiny_config(tmp_path, FLAT, single), QuietProgress(), out=tmp_path / "one")
    got = load_file(weights_file(ranked.final_dirs["world"]))
    want = load_file(weights_file(reference.final_dirs["world"]))
    assert got.keys() == want.keys()
    assert all(got[k].shape == want[k].shape for k in want)
    gap = max(float((got[k] - want[k]).abs().max()) for k in want)
    # Not bit for bit (each rank sums its half of a step's batch, then the two are added), but
    # the same training: the gap is rounding, far below what two rounds move the weights.
    assert 0 < gap < 1e-3
    for (r1, n1, l1), (r2, n2, l2) in zip(
        _evals(ranked.run_dir), _evals(reference.run_dir), strict=True
    ):
        assert (r1, n1) == (r2, n2) and l1 == pytest.approx(l2, rel=1e-3)


def test_ranks_that_cannot_run_are_refused(tmp_path: Path, ray_with_four_cpus: None) -> None:
    with pytest.raises(
        ConfigError, match=re.escape("run.leaf_ranks = 2 needs run.backend = 'ray'")
    ):
        tiny_config(tmp_path, FLAT, ["run.leaf_ranks=2"])
    with pytest.raises(
        ConfigError, match=re.escape("train.batch_size = 4 must be a multiple of the processes (3)")
    ):
        tiny_config(tmp_path, FLAT, [*RANKED, "run.leaf_ranks=3"])
    config = tiny_config(tmp_path, FLAT, [*RANKED, "run.leaf_ranks=4"])
    with pytest.raises(
        ConfigError, match="2 leaves on 4 processes each need 8 CPUs; the Ray cluster has 4"
    ):
        run(config, QuietProgress(), out=tmp_path / "too-many")


@pytest.mark.slow
def test_a_rank_that_is_gone_fails_the_round_naming_it_instead_of_waiting(
    tmp_path: Path, ray_with_four_cpus: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 of a leaf dies once its group is formed: the leaf's first round fails at once
    (gloo sees the rank's connections close), with the rank named and how to go on, instead
    of rank 0 waiting in a collective until the group's two-hour timeout."""
    import ray

    joined = ray_transport.join_group

    def join_then_kill_rank_1(path: str, group: list) -> None:
        joined(path, group)
        if path == "world/a":
            ray.kill(group[1])

    monkeypatch.setattr(ray_transport, "join_group", join_then_kill_rank_1)
    config = tiny_config(tmp_path, FLAT, RANKED)
    started = time.monotonic()
    with pytest.raises(TransportError, match="rank 1 failed its part of the round"):
        run(config, QuietProgress(), out=tmp_path / "gone")
    assert time.monotonic() - started < 300
