"""model.path may name a hub id, read offline from the local Hugging Face cache; a local path
that exists wins, and an id that is not cached fails naming the id and the cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from worldlm.config_load import load_config
from worldlm.errors import ModelError
from worldlm.hub import is_hub_id, resolve_model_path
from worldlm.model.build import build_model
from worldlm.model.pretrained import pretrained_dir

from .fake_hub import cache_tiny_model, save_tiny_model

REPO = "TinyOrg/tiny-llama"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # were anything to try the network, it fails
    return cache


def _config_file(directory: Path, model_path: str) -> Path:
    (directory / "a.txt").write_text("some text for the leaf", encoding="utf-8")
    path = directory / "run.toml"
    nodes = '[nodes.w]\n[nodes."w/a"]\ndata = { paths = ["a.txt"] }\n'
    path.write_text(f'[model]\npath = "{model_path}"\n{nodes}', encoding="utf-8")
    return path


def test_a_hub_id_resolves_to_its_cached_snapshot(tmp_path: Path, hub_cache: Path) -> None:
    snapshot = cache_tiny_model(hub_cache, REPO)
    assert resolve_model_path(REPO) == snapshot
    config = load_config(_config_file(tmp_path, REPO))
    assert config.model.path == REPO  # kept as an id, not made a path beside the config
    assert pretrained_dir(config.model, tmp_path / "cache") == snapshot
    model = build_model(config.model, 320, seed=0, cache_dir=tmp_path / "cache")
    assert model.config.hidden_size == 32


def test_hf_home_locates_the_cache_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snapshot = cache_tiny_model(tmp_path / "home" / "hub", REPO)
    assert resolve_model_path(REPO) == snapshot


def test_a_local_directory_wins_over_a_hub_id(tmp_path: Path, hub_cache: Path) -> None:
    cache_tiny_model(hub_cache, REPO, hidden=32)
    local = save_tiny_model(tmp_path / REPO, hidden=48)  # ./TinyOrg/tiny-llama beside the config
    config = load_config(_config_file(tmp_path, REPO))
    assert config.model.path == str(local)
    model = build_model(config.model, 320, seed=0, cache_dir=tmp_path / "cache")
    assert model.config.hidden_size == 48


def test_an_id_not_in_the_cache_names_the_id_and_the_cache(tmp_path: Path, hub_cache: Path) -> None:
    config = load_config(_config_file(tmp_path, "NoOrg/absent-model"))
    with pytest.raises(ModelError) as info:
        pretrained_dir(config.model, tmp_path / "cache")
    message = str(info.value)
    assert "model.path" in message and "'NoOrg/absent-model'" in message
    assert str(hub_cache) in message and "HF_HUB_CACHE" in message


def test_a_missing_path_that_is_no_hub_id_is_named(tmp_path: Path, hub_cache: Path) -> None:
    config = load_config(_config_file(tmp_path, "./models/../gone"))
    with pytest.raises(ModelError, match=r"model\.path: .*gone does not exist"):
        pretrained_dir(config.model, tmp_path / "cache")


def test_what_counts_as_a_hub_id() -> None:
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M") and is_hub_id("gpt2")
    for not_an_id in ("/abs/path", "./rel", "a/b/c", "../x", "org/-x", "a--b/c", "x.git", ""):
        assert not is_hub_id(not_an_id), not_an_id
