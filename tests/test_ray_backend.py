"""The Ray backend (run.backend = "ray"): leaves in Ray actors give the in-process results bit for
bit, checkpoints included, and a run interrupted on Ray resumes exactly."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from worldlm.cli import build_parser
from worldlm.cli_args import backend_overrides
from worldlm.config import RunConfig, dump_config
from worldlm.config_load import load_config
from worldlm.core.leaf_data import LeafData
from worldlm.core.messages import TrainTask, Update
from worldlm.errors import ConfigError
from worldlm.federation.context import SilentObserver
from worldlm.model.io import weights_file
from worldlm.outputs import RunResult
from worldlm.progress import QuietProgress
from worldlm.runner import resume, run
from worldlm.transport import ray_transport
from worldlm.transport.ray_codec import answer_batch
from worldlm.transport.ray_transport import RayTransport, RemoteLeaf

from .conftest import TWO_LEVEL, tiny_config
from .test_engine import StopAtRound


def started_ray(num_cpus: int) -> Iterator[None]:
    """A local Ray instance of `num_cpus` logical CPUs while the fixture lives: the runs find
    it started and leave it running."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray instance for the module, two CPUs."""
    yield from started_ray(2)


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


def test_leaf_state_on_the_actors_disk_gives_the_same_run_and_is_deleted_at_the_end(
    tmp_path: Path, local_ray: None
) -> None:
    """run.leaf_state = "disk" on Ray: each actor keeps its leaves' state in a directory of its
    own, which it deletes when the run stops it (ray.kill runs no exit handlers)."""
    import tempfile

    def state_dirs() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("worldlm-leaf-state-*"))

    config = tiny_config(tmp_path, TWO_LEVEL)
    config = config.model_copy(update={"run": config.run.model_copy(update={"leaf_state": "disk"})})
    before = state_dirs()
    reference = run(config, QuietProgress(), out=tmp_path / "inprocess")
    on_ray = run(_on_ray(config), QuietProgress(), out=tmp_path / "ray")
    _assert_same_results(on_ray, reference)
    assert state_dirs() == before


def test_server_optimizers_on_ray_equal_in_process(tmp_path: Path, local_ray: None) -> None:
    # The optimizers' state lives in the driver's aggregators; the leaves in the actors.
    optimizers = [
        "nodes.world.server_optimizer.name='fedyogi'",
        "nodes.world/soft.server_optimizer.name='fedavgm'",
    ]
    config = tiny_config(tmp_path, TWO_LEVEL, optimizers)
    reference = run(config, QuietProgress(), out=tmp_path / "inprocess")
    on_ray = run(_on_ray(config), QuietProgress(), out=tmp_path / "ray")
    _assert_same_results(on_ray, reference)
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


class _EchoWorker:
    """A Ray actor with `LeafWorker`'s batch call: answers each task with the state it was sent."""

    def answer(self, method: str, calls: list[Any], *models: Any) -> list[Any]:
        def echo(_method: str, task: TrainTask) -> Update:
            return Update(task.recipient, task.round, task.nonce, dict(task.state), 1.0)

        return answer_batch(echo, method, calls, models)


@pytest.mark.parametrize(
    ("calls_per_actor", "max_batch", "leaves", "most"),
    [(2, 1, 12, 4), (2, 3, 24, 12), (100, 1, 12, 12)],
)
def test_replies_waiting_in_the_object_store_stay_bounded(
    local_ray: None,
    monkeypatch: pytest.MonkeyPatch,
    calls_per_actor: int,
    max_batch: int,
    leaves: int,
    most: int,
) -> None:
    """However many leaves, at most `calls_per_actor` calls (of `max_batch` tasks) per actor are
    in flight, so the replies waiting for the aggregator do not grow with the number of
    children; the replies still come in task order, bit for bit. (The unbounded case is the
    teeth: all 12 start at once.)"""
    import ray

    paths = [f"root/leaf-{i:02d}" for i in range(leaves)]
    actors = [ray.remote(num_cpus=0)(_EchoWorker).remote() for _ in range(2)]
    transport = RayTransport(
        {"root": paths}, SilentObserver(), calls_per_actor=calls_per_actor, max_batch=max_batch
    )
    for i, path in enumerate(paths):
        blocks = torch.zeros((1, 8), dtype=torch.long)
        transport.register(RemoteLeaf(path, LeafData(path, blocks, {}), actors[i % 2]))
    submitted: list[str] = []
    real_submit = ray_transport.submit_batch

    def counting(actor: Any, method: str, messages: Any, models: Any) -> Any:
        submitted.extend(m.recipient for m in messages)
        return real_submit(actor, method, messages, models)

    monkeypatch.setattr(ray_transport, "submit_batch", counting)
    # Every dtype crosses as bytes: bfloat16 (no NumPy type), a 0-d tensor, a strided view.
    state = {
        "w": torch.arange(6.0),
        "b": torch.arange(4, dtype=torch.bfloat16) / 3,
        "s": torch.tensor(2.5),
        "t": torch.arange(12.0).reshape(3, 4).t(),
    }
    tasks = [TrainTask("run", 3, 3, "root", p, f"nonce-{p}", state) for p in paths]
    in_flight = []
    for k, update in enumerate(transport.train(tasks)):
        assert update.sender == paths[k] and update.nonce == f"nonce-{paths[k]}"
        for key, value in state.items():
            got = update.state[key]
            assert got.dtype == value.dtype and torch.equal(got, value), key
        update.state["w"].add_(1)  # the aggregator may write into what it receives
        in_flight.append(len(submitted) - k)  # started and not yet taken
    assert sorted(submitted) == paths  # each leaf asked once
    assert max(in_flight) == most
