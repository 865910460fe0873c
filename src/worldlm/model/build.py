"""Build or load a causal LM and save it as a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from worldlm.config import ModelConfig
from worldlm.errors import ModelError
from worldlm.model.presets import PRESETS


def build_model(config: ModelConfig, vocab_size: int, *, seed: int) -> PreTrainedModel:
    """A model from a preset (random init seeded by `seed`) or from a local HF directory."""
    if config.path is not None:
        return load_local_model(Path(config.path))
    assert config.preset is not None
    if config.preset not in PRESETS:
        raise ModelError(
            f"model.preset: unknown preset {config.preset!r}; choose one of {', '.join(PRESETS)}"
        )
    p = PRESETS[config.preset]
    hf_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=p.hidden,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.heads,
        intermediate_size=p.intermediate,
        max_position_embeddings=max(config.block_size, 256),
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    # Initialization draws from the global RNG; fork it so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_config)
    return model


def load_local_model(path: Path) -> PreTrainedModel:
    """Load a local Hugging Face causal LM directory without touching any hub."""
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model.path: {path} is not a Hugging Face model directory (no config.json)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=torch.float32
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path: cannot load {path}: {exc}") from exc
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
