"""Backbone / key-layer partition by module structure, for Llama presets and a GPT-2 model."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from worldlm.config import ModelConfig
from worldlm.model.build import build_model
from worldlm.model.partition import key_layer_partition


def _tiny_llama():
    return build_model(ModelConfig.model_validate({"preset": "tiny"}), 64, seed=0)


def test_llama_key_layers_are_the_last_blocks_and_the_final_norm() -> None:
    model = _tiny_llama()  # 4 blocks: ceil(0.3 * 4) = 2 key blocks
    partition = key_layer_partition(model, 0.3)
    assert list(partition.groups) == ["model.layers.2", "model.layers.3", "model.norm"]
    assert partition.groups["model.norm"] == ("model.norm.weight",)
    names = {n for n, _ in model.named_parameters()}
    assert all(
        n.startswith(("model.layers.2.", "model.layers.3.", "model.norm."))
        for n in partition.key_names
    )
    assert "model.embed_tokens.weight" not in partition.key_names  # tied head stays in B
    assert {n for n in names if n.startswith("model.layers.3.")} <= partition.key_names


@pytest.mark.parametrize(("fraction", "blocks"), [(0.0, 0), (0.15, 1), (0.5, 2), (1.0, 4)])
def test_fraction_sets_the_number_of_key_blocks(fraction: float, blocks: int) -> None:
    groups = key_layer_partition(_tiny_llama(), fraction).groups
    assert len([g for g in groups if g.startswith("model.layers.")]) == blocks
    assert ("model.norm" in groups) == (fraction > 0)


def test_gpt2_style_models_partition_too() -> None:
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    )
    partition = key_layer_partition(model, 0.3)
    assert list(partition.groups) == ["transformer.h.2", "transformer.ln_f"]
    assert "transformer.wte.weight" not in partition.key_names
