"""The model a process trains and evaluates on: built once per process from the run config,
the same seed giving every process the same initial weights."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from worldlm.config import RunConfig
from worldlm.data.corpora import default_cache_dir
from worldlm.errors import ModelError
from worldlm.model.build import build_model
from worldlm.model.lora import wrap_lora
from worldlm.seeding import derive_seed


def cache_dir_of(config: RunConfig) -> Path:
    """Where corpora, tokenizers and converted models are cached for this run."""
    return Path(config.run.cache_dir) if config.run.cache_dir else default_cache_dir()


def build_workspace(config: RunConfig, vocab_size: int, device: torch.device) -> PreTrainedModel:
    """The model every node of this process trains or reads: same seed, same initial weights.
    With LoRA, the base is loaded once here and only the adapters are trained and federated
    (see `model.lora`)."""
    model = build_model(
        config.model,
        vocab_size,
        seed=derive_seed(config.run.seed, "init"),
        cache_dir=cache_dir_of(config),
    )
    if config.model.load_in == "full":  # a quantized base is already on its GPU
        model.to(device)  # type: ignore[arg-type]  # transformers' stub of .to is too narrow
    check_model_fits(model, config, vocab_size)
    if config.train.precision == "bf16" and config.model.load_in == "full":  # all nodes here
        model.to(torch.bfloat16)  # type: ignore[arg-type]  # transformers' stub of .to
    if config.train.activation_checkpointing:
        # Non-reentrant: also right for a frozen base under LoRA, whose inputs need no grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.model.lora.enabled:
        wrap_lora(model, config.model.lora, seed=derive_seed(config.run.seed, "lora"))
    return model


def check_model_fits(model: PreTrainedModel, config: RunConfig, vocab_size: int) -> None:
    """ModelError unless `model` embeds every token id and holds a block of positions."""
    if int(model.config.vocab_size) < vocab_size:
        raise ModelError(
            f"the tokenizer's vocabulary ({vocab_size}) is larger than the model's embedding "
            f"table ({model.config.vocab_size}); use the model's own tokenizer"
        )
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and int(positions) < config.model.block_size:
        raise ModelError(
            f"model.block_size: {config.model.block_size} is longer than the model's "
            f"{positions} positions; lower it"
        )
