"""Save a node's model as a Hugging Face directory that `from_pretrained` loads."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from worldlm.data.tokenizer import to_hf_tokenizer
from worldlm.model.state import State, set_state


def save_hf_model(
    model: torch.nn.Module, state: State, tokenizer: Tokenizer, directory: Path
) -> Path:
    """Write config.json, model.safetensors and the tokenizer files for `state`."""
    assert isinstance(model, PreTrainedModel)
    set_state(model, state)
    directory.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()  # our own progress display owns the terminal
    model.save_pretrained(directory)
    to_hf_tokenizer(tokenizer).save_pretrained(directory)
    return directory
