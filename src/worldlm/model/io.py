"""Save a node's model as a Hugging Face directory that `from_pretrained` loads, find a run's
final models, and load one (whole, or LoRA adapters on their base) for inference."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from peft import PeftModel
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from worldlm.core.state import State, set_state
from worldlm.data.tokenizer import to_hf_tokenizer
from worldlm.errors import ModelError
from worldlm.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, base_of, is_lora, save_adapters

MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"


def save_hf_model(
    model: torch.nn.Module,
    state: State,
    tokenizer: Tokenizer | PreTrainedTokenizerBase,
    directory: Path,
    *,
    base_dir: Path | None = None,
) -> Path:
    """Write `state` with the tokenizer files: config.json and model.safetensors, or for a
    LoRA model the adapters alone in PEFT format, naming `base_dir` as their base."""
    assert isinstance(model, PreTrainedModel)
    hf_logging.disable_progress_bar()  # our own progress display owns the terminal
    if is_lora(model):
        save_adapters(model, state, directory, base_dir)
    else:
        set_state(model, state)
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(directory)
    hf_tokenizer = (
        tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else to_hf_tokenizer(tokenizer)
    )
    hf_tokenizer.save_pretrained(directory)
    return directory


def weights_file(directory: Path) -> Path:
    """The weights of a saved model directory: model.safetensors, or a LoRA adapter's."""
    adapter = directory / ADAPTER_WEIGHTS
    return adapter if adapter.is_file() else directory / MODEL_WEIGHTS


def is_model_dir(path: Path) -> bool:
    """A saved model: a whole one (config.json) or LoRA adapters (adapter_config.json)."""
    return (path / MODEL_CONFIG).is_file() or (path / ADAPTER_CONFIG).is_file()


def final_model_dir(run_dir: Path, node: str | None) -> Path:
    """The final model a node deploys: its own directory, or its nearest ancestor's."""
    final = run_dir / "final"
    if not final.is_dir():
        raise ModelError(f"{run_dir} has no final models (did the run finish?)")
    available = sorted(
        {
            str(p.parent.relative_to(final))
            for name in (MODEL_CONFIG, ADAPTER_CONFIG)
            for p in final.rglob(name)
        }
    )
    if node is None:
        roots = [p for p in available if "/" not in p]
        if not roots:
            raise ModelError(f"no global model under {final}")
        return final / roots[0]
    parts = node.strip("/").split("/")
    for depth in range(len(parts), 0, -1):
        candidate = "/".join(parts[:depth])
        if candidate in available:
            return final / candidate
    raise ModelError(f"no final model for node {node!r}; models exist for: {', '.join(available)}")


def adapter_base(adapter_dir: Path, base: Path | None = None) -> Path:
    """The base model directory of LoRA adapters: `base` if given, else the one they name."""
    found = base if base is not None else base_of(adapter_dir)
    if found is None or not (found / MODEL_CONFIG).is_file():
        raise ModelError(
            f"{adapter_dir} holds LoRA adapters whose base model ({found}) is not a Hugging "
            "Face model directory here; pass the base directory with --base"
        )
    return found


def load_saved_model(model_dir: Path, *, base: Path | None = None) -> PreTrainedModel:
    """A saved model in float32 for inference: a whole model, or LoRA adapters applied (not
    merged) to their base with PEFT."""
    hf_logging.disable_progress_bar()
    if not (model_dir / ADAPTER_CONFIG).is_file():
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, dtype=torch.float32
        )
        assert isinstance(model, PreTrainedModel)
        return model
    base_model = AutoModelForCausalLM.from_pretrained(
        adapter_base(model_dir, base), local_files_only=True, dtype=torch.float32
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations PEFT calls
        peft_model = PeftModel.from_pretrained(base_model, model_dir)
    merged = peft_model.merge_and_unload()  # one matrix per layer again: plain transformers
    assert isinstance(merged, PreTrainedModel)
    return merged
