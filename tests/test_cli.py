"""The command line: clear errors for bad input, and the main commands working end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worldlm.cli import main
from worldlm.config import to_toml

from .conftest import TWO_LEVEL, tiny_config_dict


def _write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(to_toml(data), encoding="utf-8")
    return path


def test_misspelled_key_fails_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    data["train"]["lerning_rate"] = 0.1
    code = main(["run", str(_write_config(tmp_path, data)), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.lerning_rate" in err and "unknown key" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_bad_override_fails_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write_config(tmp_path, tiny_config_dict(tmp_path, TWO_LEVEL))
    assert main(["check", str(path), "--set", "stop.rounds=-1"]) == 2
    assert "stop.rounds" in capsys.readouterr().err


def test_missing_data_file_fails_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    data["nodes"]["world/med/a"]["data"]["paths"] = [str(tmp_path / "nope.jsonl")]
    code = main(["run", str(_write_config(tmp_path, data)), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "nope.jsonl" in err and "world/med/a" in err
    assert not (tmp_path / "runs").exists()


def test_malformed_data_file_fails_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field here"}\n', encoding="utf-8")
    data["nodes"]["world/soft/c"]["data"]["paths"] = [str(bad)]
    assert main(["run", str(_write_config(tmp_path, data)), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "text" in err and "Traceback" not in err


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml" in capsys.readouterr().err


def test_run_prints_the_table_then_generate_samples(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = _write_config(tmp_path, tiny_config_dict(tmp_path, TWO_LEVEL))
    assert main(["run", str(path), "--quiet", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "validation perplexity per leaf" in out
    for leaf in TWO_LEVEL:
        assert leaf in out
    assert (
        main(
            [
                "generate",
                str(tmp_path / "r"),
                "The fever of",
                "--node",
                "world/med/a",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("The fever of") and len(text.strip()) > len("The fever of")
    assert main(["generate", str(tmp_path / "r"), "x", "--node", "elsewhere"]) == 2
    assert "no final model for node 'elsewhere'" in capsys.readouterr().err


def test_console_script_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "worldlm", "presets"], capture_output=True, text=True, check=True
    ).stdout
    assert "tiny" in out and "small" in out and "125m" in out


def test_resume_needs_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["run", "other.toml", "--resume", str(tmp_path)]) == 2
    assert "--resume uses the run's own config.toml" in capsys.readouterr().err


def test_resume_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write_config(tmp_path, tiny_config_dict(tmp_path, TWO_LEVEL))
    assert main(["run", str(path), "--quiet", "--out", str(tmp_path / "r")]) == 0
    (tmp_path / "r" / "checkpoints" / "round-000002.wlm").unlink()  # as if cut during round 2
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "r"), "--quiet"]) == 0
    assert "validation perplexity per leaf (2 rounds" in capsys.readouterr().out
    assert (tmp_path / "r" / "checkpoints" / "round-000002.wlm").is_file()


def test_compare_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write_config(tmp_path, tiny_config_dict(tmp_path, TWO_LEVEL))
    out = tmp_path / "cmp"
    args = ["compare", str(path), "--quiet", "--out", str(out), "--methods", "fedavg,worldlm"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "FedAvg / WorldLM mean per-leaf perplexity" in printed
    assert (out / "results.md").is_file() and (out / "perplexity.png").is_file()
    assert main([*args[:-1], "fedavg,magic"]) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err


def test_data_build_calls_the_tree_builder(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worldlm.data.build.domains as domains

    calls = []

    def fake_build(out: Path, cache: Path, *, leaves: list[str] | None, max_docs: int | None):
        calls.append((out, cache, leaves, max_docs))
        return {"general/brown": 3}

    monkeypatch.setattr(domains, "build", fake_build)
    code = main(
        [
            "data",
            "build",
            "domains",
            "--out",
            str(tmp_path),
            "--cache",
            str(tmp_path / "c"),
            "--leaves",
            "general/brown",
            "--max-docs",
            "3",
        ]
    )
    assert code == 0
    assert calls == [(tmp_path / "domains", tmp_path / "c", ["general/brown"], 3)]
    assert "data.root=" in capsys.readouterr().out
