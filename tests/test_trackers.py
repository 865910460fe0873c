"""Experiment trackers through accelerate: TensorBoard holds the round curves and the config as
hyperparameters; a tracker whose package is missing is refused naming it; the old
monitor.tensorboard / monitor.mlflow switches map onto monitor.trackers; MLflow, where it is
installed, gets params, curves and the run's files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from worldlm.cli import main
from worldlm.config import dump_config, to_toml
from worldlm.errors import ConfigError
from worldlm.metrics.jsonl import read_metrics
from worldlm.metrics.trackers import batches, flat_params
from worldlm.progress import QuietProgress
from worldlm.runner import run

from .conftest import TWO_LEVEL, tiny_config, tiny_config_dict

ROUNDS = 2


def _hparams(tb_dir: Path) -> dict[str, object]:
    """The hyperparameters TensorBoard's HParams dashboard shows for the run."""
    found: dict[str, object] = {}
    # add_hparams writes them to an event file in a subdirectory of its own
    for sub in (p for p in tb_dir.iterdir() if any(p.glob("events.out.tfevents.*"))):
        events = EventAccumulator(str(sub))
        events.Reload()
        for content in events.PluginTagToContent("hparams").values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            for key, value in data.session_start_info.hparams.items():
                found[key] = getattr(value, value.WhichOneof("kind"))
    return found


def test_tensorboard_holds_the_round_curves_and_the_config(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL, [f"stop.rounds={ROUNDS}"])
    assert config.monitor.trackers == ["tensorboard"]  # the default
    result = run(config, QuietProgress(), out=tmp_path / "r")
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    tb_dir = result.run_dir / "tensorboard"

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    for tag, kind, field in (
        ("val_ppl/world/med/a", "eval", "ppl"),
        ("bytes_up/world", "aggregate", "bytes_up"),
    ):
        node = tag.split("/", 1)[1]
        expected = [(r["round"], r[field]) for r in rows if r["kind"] == kind and r["node"] == node]
        curve = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in curve] == [s for s, _ in expected]
        assert [v for _, v in curve] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert {s for s, _ in expected} == set(range(1, ROUNDS + 1))

    hparams = _hparams(tb_dir)
    assert hparams["stop.rounds"] == ROUNDS
    assert hparams["train.lr"] == pytest.approx(config.train.lr)
    assert hparams["model.preset"] == "tiny"
    assert hparams["run.method"] == config.run.method
    assert json.loads(str(hparams["monitor.trackers"])) == ["tensorboard"]


def test_a_tracker_without_its_package_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    absent = [n for n in ("aim", "comet_ml", "swanlab") if importlib.util.find_spec(n) is None]
    if not absent:
        pytest.skip("aim, comet_ml and swanlab are all installed")
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    data["monitor"] = {"trackers": ["tensorboard", *absent]}
    path = tmp_path / "run.toml"
    path.write_text(to_toml(data), encoding="utf-8")
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"pip install {' '.join(absent)}" in err and "monitor.trackers" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before a run directory was made


def test_old_switches_map_onto_trackers(tmp_path: Path) -> None:
    def trackers(*overrides: str) -> list[str]:
        return list(tiny_config(tmp_path, TWO_LEVEL, list(overrides)).monitor.trackers)

    assert trackers("monitor.tensorboard=false") == []
    assert trackers("monitor.mlflow=true") == ["tensorboard", "mlflow"]
    assert trackers("monitor.mlflow=true", "monitor.tensorboard=false") == ["mlflow"]
    assert trackers('monitor.trackers=["wandb"]', "monitor.tensorboard=true") == [
        "wandb",
        "tensorboard",
    ]
    # the saved config holds the trackers, not the old switches
    saved = dump_config(tiny_config(tmp_path, TWO_LEVEL, ["monitor.mlflow=true"]))
    assert 'trackers = ["tensorboard", "mlflow"]' in saved and "mlflow = true" not in saved


@pytest.mark.parametrize(
    ("value", "message"),
    [('["tensorbord"]', "monitor.trackers"), ('["wandb", "wandb"]', "more than once")],
)
def test_unknown_or_repeated_trackers_are_config_errors(
    tmp_path: Path, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, TWO_LEVEL, [f"monitor.trackers={value}"])


def test_params_and_batches() -> None:
    params = flat_params({"a": {"b": 1, "c": [1, 2], "d": None}, "e": "x"})
    assert params == {"a.b": 1, "a.c": "[1, 2]", "a.d": None, "e": "x"}
    rows = [
        {"round": 1, "node": "w", "kind": "aggregate", "seconds": 1.0, "local_round": 1},
        {"round": 1, "node": "w", "kind": "aggregate", "seconds": 2.0, "local_round": 2},
        {"round": 2, "node": "w", "kind": "eval", "loss": 1.0, "ppl": 2.7},
    ]
    # an inner federation's second local round keeps its own value in a new batch
    assert batches(rows) == [
        (1, {"round_seconds/w": 1.0}),
        (1, {"round_seconds/w": 2.0}),
        (2, {"val_loss/w": 1.0, "val_ppl/w": 2.7}),
    ]


def test_mlflow_gets_params_curves_and_the_run_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow = pytest.importorskip("mlflow")
    # a file store: no server, no database package (MLflow 3 asks for the opt-in)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    config = tiny_config(
        tmp_path, TWO_LEVEL, [f"stop.rounds={ROUNDS}", 'monitor.trackers=["mlflow"]']
    )
    result = run(config, QuietProgress(), out=tmp_path / "r")
    assert not (result.run_dir / "tensorboard").exists()
    client = mlflow.tracking.MlflowClient()
    (found,) = mlflow.search_runs(experiment_names=["worldlm"], output_format="list")
    assert found.info.run_name == "r"
    assert found.data.params["stop.rounds"] == str(ROUNDS)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    for node in ("world", "world/med/a"):  # node paths with dots in MLflow keys
        history = client.get_metric_history(found.info.run_id, f"val_ppl/{node.replace('/', '.')}")
        expected = {r["round"]: r["ppl"] for r in rows if r["kind"] == "eval" and r["node"] == node}
        assert {m.step: m.value for m in history} == pytest.approx(expected)
    stored = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"report.md", "summary.json", "config.toml", "final"} <= stored
    cards = {a.path for a in client.list_artifacts(found.info.run_id, "final/world")}
    assert "final/world/README.md" in cards


def test_wandb_offline_keeps_the_curves_and_the_run_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no account, no network: files to sync later
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_config(
        tmp_path, TWO_LEVEL, [f"stop.rounds={ROUNDS}", 'monitor.trackers=["wandb"]']
    )
    result = run(config, QuietProgress(), out=tmp_path / "r")
    (offline,) = (result.run_dir / "wandb").glob("offline-run-*")
    (log,) = offline.glob("*.wandb")
    data = log.read_bytes()
    for expected in (
        b"val_ppl/world/med/a",
        b"stop.rounds",
        b"r-outputs",
        b"final/world/README.md",
    ):
        assert expected in data
