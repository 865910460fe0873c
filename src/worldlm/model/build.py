"""Build a causal LM from a preset, or load a pretrained one from disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from worldlm.config import ModelConfig
from worldlm.data.corpora import default_cache_dir
from worldlm.errors import ModelError
from worldlm.model.pretrained import load_pretrained
from worldlm.presets import MODEL_BUILDERS, PRESETS
from worldlm.registration import add_entry

# A causal LM for a vocabulary of vocab_size tokens; model_config.block_size is the longest
# sequence it is trained and evaluated on.
ModelBuilder = Callable[[ModelConfig, int], PreTrainedModel]


def register_model_builder(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: `factory(model_config, vocab_size)` builds a random-init model selectable
    as `model.preset = name`. It runs under a global RNG seeded from run.seed, so a run is
    reproducible; the model must be a transformers PreTrainedModel with a causal LM head
    (`model(input_ids=..., labels=...).loss`)."""

    if name in PRESETS:
        raise ValueError(f"model builder {name!r} would hide the built-in preset of that name")

    def wrap(factory: ModelBuilder) -> ModelBuilder:
        return add_entry(MODEL_BUILDERS, name, factory, "model builder")

    return wrap


def build_model(
    config: ModelConfig, vocab_size: int, *, seed: int, cache_dir: Path | None = None
) -> PreTrainedModel:
    """A model from a preset (random init seeded by `seed`) or from a local HF directory or
    GGUF file (converted once into `cache_dir`, default the worldlm cache)."""
    if config.path is not None:
        return load_pretrained(config, cache_dir or default_cache_dir())
    assert config.preset is not None
    builder = MODEL_BUILDERS.get(config.preset)
    if builder is not None:
        # Same as the presets: initialization draws from a forked, seeded global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cast(ModelBuilder, builder)(config, vocab_size)
        if not isinstance(model, PreTrainedModel):
            raise ModelError(
                f"model builder {config.preset!r} returned {type(model).__name__}, not a "
                "transformers PreTrainedModel (its outputs are saved with save_pretrained)"
            )
        return model
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


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
