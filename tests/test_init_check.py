"""`worldlm init` writes every starter config, and `worldlm check` builds what a run builds
(readers on each leaf's first records, tokenizer, model) and refuses what would fail later."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from worldlm.cli import main
from worldlm.config import to_toml
from worldlm.templates import template_names

from .conftest import (
    TWO_LEVEL,
    save_topic_dataset,
    synthetic_documents,
    tiny_config_dict,
    write_jsonl,
)
from .fake_hub import cache_tiny_model


@pytest.fixture(autouse=True)
def _offline_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches of the test's own: nothing is read from or written to the user's."""
    monkeypatch.setenv("WORLDLM_CACHE", str(tmp_path / "worldlm-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _err(capsys: pytest.CaptureFixture) -> str:
    return " ".join(capsys.readouterr().err.split())  # the console wraps long lines


def _stand_ins(config_file: Path, tmp_path: Path) -> None:
    """What a user fills in, made up: every leaf file the template names, the dataset a
    [partition] splits, and a tiny model in the hub cache for a model.path that is a hub id."""
    data = tomllib.loads(config_file.read_text("utf-8"))
    if "partition" in data:
        save_topic_dataset(config_file.parent / data["partition"]["data"]["dataset"])
    model_path = data.get("model", {}).get("path")
    if model_path is not None:
        cache_tiny_model(tmp_path / "hf-cache", model_path)
    instructions = data.get("model", {}).get("lora", {}).get("enabled", False)
    for i, node in enumerate(data.get("nodes", {}).values()):
        for raw in node.get("data", {}).get("paths", []):
            path = config_file.parent / raw
            docs = synthetic_documents("med" if i % 2 else "law", 30, seed=i)
            if raw.endswith("/"):
                write_jsonl(path / "part1.jsonl", docs[:15])
                (path / "part2.txt").write_text(" ".join(docs[15:]), encoding="utf-8")
            elif raw.endswith(".txt"):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("\n".join(docs), encoding="utf-8")
            elif instructions:
                path.parent.mkdir(parents=True, exist_ok=True)
                rows = [{"prompt": f"Say: {d[:40]}", "completion": d} for d in docs]
                path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            else:
                write_jsonl(path, docs)


@pytest.mark.parametrize("template", template_names())
def test_every_template_inits_then_checks(
    template: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "project" / f"{template}.toml"
    assert main(["init", template, "--out", str(out)]) == 0
    text = out.read_text("utf-8")
    if "FILL IN" in text:
        # unfilled, check names what to fill in
        assert main(["check", str(out)]) == 2
        err = _err(capsys)
        assert any(key in err for key in (".data.paths", ".data.dataset", "model.path")), err
        assert "does not exist" in err or "Hugging Face cache" in err, err
        _stand_ins(out, tmp_path)
    capsys.readouterr()
    assert main(["check", str(out)]) == 0, _err(capsys)
    printed = capsys.readouterr().out
    assert "config OK" in printed and "model:" in printed and "tokenizer:" in printed
    # init never replaces a file
    assert main(["init", template, "--out", str(out)]) == 2
    assert "already exists" in _err(capsys) and out.read_text("utf-8") == text


def test_init_lists_the_templates_and_refuses_an_unknown_one(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["init", "--list"]) == 0
    listed = capsys.readouterr().out
    assert {"default", "files", "lora", "deployment", "partitioned"} <= set(template_names())
    for name in template_names():
        assert name in listed
    assert main(["init", "nope", "--out", str(tmp_path / "x.toml")]) == 2
    assert "unknown template 'nope'" in _err(capsys) and not (tmp_path / "x.toml").exists()


def _check(tmp_path: Path, data: dict) -> int:
    path = tmp_path / "run.toml"
    path.write_text(to_toml(data), encoding="utf-8")
    return main(["check", str(path)])


def test_check_reads_the_first_records_and_names_a_bad_one(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    assert _check(tmp_path, data) == 0
    out = capsys.readouterr().out
    assert "world/med/a: read 60 documents" in " ".join(out.split())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n', encoding="utf-8")
    data["nodes"]["world/soft/c"]["data"]["paths"] = [str(bad)]
    assert _check(tmp_path, data) == 2
    err = _err(capsys)
    assert "bad.jsonl: line 2 has no field 'text'" in err


def test_check_refuses_an_unknown_preset_and_a_missing_model(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    data["model"]["preset"] = "huge"
    assert _check(tmp_path, data) == 2
    err = _err(capsys)
    assert "model.preset: unknown preset 'huge'; choose one of tiny, mini" in err
    data["model"] = {"path": str(tmp_path / "no-such-model")}
    assert _check(tmp_path, data) == 2
    assert f"model.path: {tmp_path / 'no-such-model'} does not exist" in _err(capsys)


def test_check_builds_the_model_and_its_adapters(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cache_tiny_model(tmp_path / "hf-cache", "TinyOrg/base")
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    data["model"] = {"path": "TinyOrg/base", "block_size": 32, "lora": {"enabled": True}}
    assert _check(tmp_path, data) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "tokenizer: the model's own" in out and "LoRA" in out
    data["model"]["lora"]["target_modules"] = ["no_such_proj"]
    assert _check(tmp_path, data) == 2
    assert "model.lora" in _err(capsys)
    data["model"] = {"path": "TinyOrg/base", "block_size": 1024}  # beyond its 512 positions
    assert _check(tmp_path, data) == 2
    assert "model.block_size: 1024 is longer than the model's 512 positions" in _err(capsys)
