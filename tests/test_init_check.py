"""`worldlm init` writes every starter config, and `worldlm check` builds what a run builds
(readers on each leaf's first records, tokenizer, model) and refuses what would fail later."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from worldlm.cli import main
from worldlm.config import to_toml
from worldlm.examples import STAND_IN_NOTE
from worldlm.templates import has_examples, template_names

from .conftest import TWO_LEVEL, tiny_config_dict
from .fake_hub import cache_tiny_model


@pytest.fixture(autouse=True)
def _offline_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches of the test's own: nothing is read from or written to the user's."""
    monkeypatch.setenv("WORLDLM_CACHE", str(tmp_path / "worldlm-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _err(capsys: pytest.CaptureFixture) -> str:
    return " ".join(capsys.readouterr().err.split())  # the console wraps long lines


def _tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("template", template_names())
def test_every_template_inits_then_checks(
    template: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "project" / "x.toml"
    assert main(["init", template, "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    text = out.read_text("utf-8")
    data_dir = tmp_path / "project" / "x-data"
    assert has_examples(template) == data_dir.is_dir()
    if has_examples(template):
        # the example inputs are named, and the config reads them from beside itself
        assert "example inputs in" in printed and "x-data" in printed
        assert "{data_dir}" not in text
        assert "FILL IN: replace the example" in text and '"x-data/' in text
        assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no leftovers
    assert main(["check", str(out)]) == 0, _err(capsys)
    printed = capsys.readouterr().out
    assert "config OK" in printed and "model:" in printed and "tokenizer:" in printed
    # init never replaces a file, nor example data
    before = _tree(out.parent)
    assert main(["init", template, "--out", str(out)]) == 2
    assert "already exists" in _err(capsys) and _tree(out.parent) == before
    if has_examples(template):
        out.unlink()
        assert main(["init", template, "--out", str(out)]) == 2
        assert "(the example data of" in _err(capsys) and not out.exists()


def test_lora_example_model_is_a_labelled_random_stand_in(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "lora.toml"
    assert main(["init", "lora", "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "RANDOM STAND-IN" in printed and "SmolLM2-135M-Instruct" in printed
    config = tomllib.loads(out.read_text("utf-8"))
    assert config["model"]["path"] == "lora-data/model"
    assert config["model"]["lora"]["enabled"] and "RANDOM STAND-IN" in out.read_text("utf-8")
    model_dir = tmp_path / "lora-data" / "model"
    assert "NOT A PRETRAINED MODEL" in (model_dir / STAND_IN_NOTE).read_text("utf-8")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    first = (tmp_path / "lora-data" / "north.jsonl").read_text("utf-8").splitlines()[0]
    assert '"prompt"' in first and '"completion"' in first


def test_examples_are_deterministic(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert main(["init", "files", "--out", str(tmp_path / name / "x.toml")]) == 0
    first, second = _tree(tmp_path / "a" / "x-data"), _tree(tmp_path / "b" / "x-data")
    assert first == second and len(first) == 5
    # the leaves differ by topic: the hospitals' notes are medical, the banks' financial
    assert (
        "patient" in first["north.jsonl"].decode() and "patient" not in first["alpine.txt"].decode()
    )


@pytest.mark.parametrize("template", [t for t in template_names() if has_examples(t)])
def test_no_example_data_leaves_check_naming_what_is_missing(
    template: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "x.toml"
    assert main(["init", template, "--out", str(out), "--no-example-data"]) == 0
    assert "fill in the lines marked FILL IN" in " ".join(capsys.readouterr().out.split())
    assert not (tmp_path / "x-data").exists()
    assert main(["check", str(out)]) == 2
    err = _err(capsys)
    assert any(key in err for key in (".data.paths", ".data.dataset", "model.path")), err
    assert "x-data/" in err and ("does not exist" in err or "Hugging Face cache" in err), err


def test_files_template_runs_at_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "x.toml"
    assert main(["init", "files", "--out", str(out)]) == 0
    small = [
        "stop.rounds=1",
        "model.preset=tiny",
        "model.block_size=32",
        "train.local_steps=2",
        "train.batch_size=4",
        "tokenizer.vocab_size=320",
        "data.max_chars=20000",
        "eval.max_blocks=4",
        "run.device=cpu",
    ]
    args = ["run", str(out), "--out", str(tmp_path / "run")]
    assert main([*args, *[a for s in small for a in ("--set", s)]]) == 0, _err(capsys)
    printed = " ".join(capsys.readouterr().out.split())
    assert "validation perplexity per leaf (1 rounds" in printed
    for leaf in ("world/hospitals/north", "world/hospitals/south", "world/banks/alpine"):
        assert leaf in printed
    assert "(all leaves)" in printed and (tmp_path / "run" / "config.toml").is_file()


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
