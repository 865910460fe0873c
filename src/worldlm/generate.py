"""Sample text from a node's final model in a run directory, or from a model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from worldlm.errors import ModelError
from worldlm.model.io import final_model_dir, is_model_dir, load_saved_model

__all__ = ["final_model_dir", "generate_text", "model_dir_of"]


def model_dir_of(path: Path, node: str | None) -> Path:
    """`path` itself when it is a model directory (e.g. from `worldlm export`), else the final
    model `node` deploys in the run directory `path`."""
    if is_model_dir(path):
        if node is not None:
            raise ModelError(f"{path} is a model directory, not a run: drop --node")
        return path
    return final_model_dir(path, node)


def generate_text(
    model_dir: Path,
    prompt: str,
    *,
    max_new_tokens: int = 60,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    base: Path | None = None,
    chat: bool = False,
) -> str:
    """The prompt followed by sampled continuation tokens, decoded; with `chat`, the prompt is
    a user message in the tokenizer's chat template and only the reply is returned. LoRA
    adapters are applied to their base (`base`, or the one they name)."""
    hf_logging.disable_progress_bar()  # keep stdout to the generated text
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model: Any = load_saved_model(model_dir, base=base)
    model.eval()
    if chat:
        if not tokenizer.chat_template:
            raise ModelError(f"{model_dir}: the tokenizer has no chat template; drop --chat")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_k=top_k if temperature > 0 else None,
            pad_token_id=tokenizer.pad_token_id,
        )
    start = inputs["input_ids"].shape[1] if chat else 0
    return str(tokenizer.decode(output[0][start:], skip_special_tokens=True))
