"""Sample text from a node's final model in a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from worldlm.errors import ModelError


def final_model_dir(run_dir: Path, node: str | None) -> Path:
    """The final model a node deploys: its own directory, or its nearest ancestor's."""
    final = run_dir / "final"
    if not final.is_dir():
        raise ModelError(f"{run_dir} has no final models (did the run finish?)")
    available = sorted(str(p.parent.relative_to(final)) for p in final.rglob("config.json"))
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


def generate_text(
    model_dir: Path,
    prompt: str,
    *,
    max_new_tokens: int = 60,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> str:
    """The prompt followed by sampled continuation tokens, decoded."""
    hf_logging.disable_progress_bar()  # keep stdout to the generated text
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    model.eval()
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
    return str(tokenizer.decode(output[0], skip_special_tokens=True))
