"""`worldlm export`: a node's final model out of a run, as a merged model or as adapters.

A LoRA run keeps only adapters under `final/<node>/`. Exporting merges them into the base
(`merge_and_unload`) and writes a plain Hugging Face directory, or copies the adapters in PEFT
format naming the base they apply to; either way with the tokenizer. The base comes from the
run's config (for a GGUF file, its cached conversion, converted again if the cache is gone).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from worldlm.config_load import load_config
from worldlm.data.corpora import default_cache_dir
from worldlm.errors import ConfigError, ModelError
from worldlm.model.io import adapter_base, final_model_dir, load_saved_model
from worldlm.model.lora import ADAPTER_CONFIG
from worldlm.model.pretrained import base_model_dir

CARD = "README.md"


def export_model(
    run_dir: Path,
    out: Path,
    *,
    node: str | None = None,
    adapters: bool = False,
    base: Path | None = None,
) -> Path:
    """Write `node`'s deployed model (default: the global one) of the run in `run_dir` to
    `out` (new or empty): merged with its base, or with `adapters` the adapters alone."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} already holds files; choose a new directory")
    source = final_model_dir(run_dir, node)
    lora = (source / ADAPTER_CONFIG).is_file()
    if not lora:
        if adapters:
            raise ModelError(f"{source} is a whole model, not LoRA adapters: drop --adapters")
        shutil.copytree(source, out, dirs_exist_ok=True)
        return out
    base_dir = adapter_base(source, base if base is not None else run_base(run_dir))
    if adapters:
        shutil.copytree(source, out, dirs_exist_ok=True)
        config_path = out / ADAPTER_CONFIG
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = str(base_dir.resolve())
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return out
    hf_logging.disable_progress_bar()
    merged = load_saved_model(source, base=base_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(out)
    if (source / CARD).is_file():
        card = (source / CARD).read_text(encoding="utf-8")
        card = card.replace('library_name: "peft"', 'library_name: "transformers"')
        card += (
            f"\nThis directory: the adapters of `{source.relative_to(run_dir)}` merged into "
            f"the base `{base_dir}` by `worldlm export`.\n"
        )
        (out / CARD).write_text(card, encoding="utf-8")
    return out


def run_base(run_dir: Path) -> Path | None:
    """The base model directory of a run's config, if it has a pretrained one."""
    config_file = run_dir / "config.toml"
    if not config_file.is_file():
        return None
    config = load_config(config_file)
    if config.model.path is None:
        return None
    cache_dir = Path(config.run.cache_dir) if config.run.cache_dir else default_cache_dir()
    return base_model_dir(config.model, cache_dir)
