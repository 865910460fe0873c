"""Models named by a Hugging Face hub id ("HuggingFaceTB/SmolLM2-135M"), read offline from the
local hub cache: worldlm never downloads a model, so a hub id names a model that `hf download`
(or any transformers program) already put in the cache.

A module at the top of the package, below both the config loader (which must keep a hub id as
it is instead of making it a path) and the model package (which resolves it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from worldlm.errors import ModelError

# Hugging Face's rules for a repo id (huggingface_hub.utils.validate_repo_id): "name" or
# "namespace/name" of letters, digits, "-", "_" and ".", neither starting nor ending with "-"
# or ".", without "--" or "..", at most 96 characters.
_REPO_ID = re.compile(r"^(?:[\w.-]{1,96}/)?[\w.-]{1,96}$", re.ASCII)


def is_hub_id(value: str) -> bool:
    """Whether `value` may be a hub id (it may also be a relative path: a path that exists
    is read first, see `resolve_model_path`)."""
    if not _REPO_ID.match(value) or "--" in value or ".." in value or value.endswith(".git"):
        return False
    return all(part[0] not in "-." and part[-1] not in "-." for part in value.split("/"))


def hub_cache_dir() -> Path:
    """The hub cache, read from the environment now (huggingface_hub reads it once, at
    import): HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_model_path(value: str, key: str = "model.path") -> Path:
    """The directory `value` names: itself when it exists, else the cached snapshot of the
    hub id it is; ModelError naming the id and the cache when neither is there."""
    path = Path(value).expanduser()
    if path.exists() or not is_hub_id(value):
        if not path.exists():
            raise ModelError(f"{key}: {path} does not exist; set it to a model directory")
        return path
    return hub_snapshot(value, key)


def cached_snapshot(repo_id: str, repo_type: str = "model") -> Path | None:
    """The cached snapshot (the `main` revision) of hub repo `repo_id`, or None when it is
    not in the cache (or is no valid id); never downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        found = snapshot_download(
            repo_id, repo_type=repo_type, cache_dir=hub_cache_dir(), local_files_only=True
        )
    except (LocalEntryNotFoundError, HFValidationError):
        return None
    return Path(found)


def hub_snapshot(repo_id: str, key: str = "model.path") -> Path:
    """The cached snapshot of hub model `repo_id`; ModelError naming the id and the cache."""
    found = cached_snapshot(repo_id)
    if found is None:
        raise ModelError(
            f"{key}: {repo_id!r} is neither a local directory nor a model in the Hugging Face "
            f"cache {hub_cache_dir()} (HF_HUB_CACHE, or HF_HOME/hub); worldlm never downloads "
            f"a model: fetch it once where there is a network (`hf download {repo_id}`, into "
            f"that cache), or set {key} to a local model directory"
        )
    return found
